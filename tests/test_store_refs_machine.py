"""A state machine over a directory PrefixStore with near-duplicate residuals: random puts of sequences that
share documents under different prefixes, evictions and budgets, against invariants that must always hold:
every residual's base is stored and holds its reference record; a referenced base is never evicted; every
lookup returns the requested tokens' cache (up to float noise, see below) or a shorter one."""
from __future__ import annotations

import tempfile

import torch
from conftest import tiny_model
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from test_store import slice_cache

from seqkv.hf_adapter import cache_layers
from seqkv.model_calls import cache_of

from seqkv.store import PrefixStore
from seqkv.store.envelope import unpack_entry

_GEN = torch.Generator().manual_seed(77)
DOCS = [torch.randint(1, 96, (24,), generator=_GEN).tolist() for _ in range(2)]
PREFIXES = [[1], [1, 5, 6], [1, 7, 8, 9, 10], [1, 11]]  # then token 0, a boundary token: the document starts a chunk


@torch.no_grad()
def _cache(ids):
    return cache_of(tiny_model("llama")(torch.tensor([ids]), use_cache=True))


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = PrefixStore("file://" + self.dir.name, model=tiny_model("llama"), chunk_tokens=8,
                                 chunking="content", boundary_tokens=[0])
        self.seen = {}

    def teardown(self):
        self.store.close()
        self.dir.cleanup()

    @initialize(d=st.integers(0, len(DOCS) - 1))
    def two_histories(self, d):
        # every run starts with one document under two histories: residuals and their bases exist from step 1
        self.put(0, d, 24)
        self.put(1, d, 24)

    @rule(p=st.integers(0, len(PREFIXES) - 1), d=st.integers(0, len(DOCS) - 1), cut=st.integers(8, 24))
    def put(self, p, d, cut):
        ids = PREFIXES[p] + [0] + DOCS[d][:cut]
        key = tuple(ids)
        if key not in self.seen:
            self.seen[key] = _cache(ids)
        self.store.put(ids, self.seen[key])

    @rule(i=st.integers(0, 50), bases_only=st.booleans())
    def evict_one(self, i, bases_only):
        entries = sorted(k for k, _, _ in self.store.backend.list())
        if bases_only:
            entries = [k for k in entries if self.store.metadata.refs(k)] or entries
        if entries:
            key = entries[i % len(entries)]
            referenced = bool(self.store.metadata.refs(key))
            removed = self.store.evict(key)
            assert not (referenced and removed), "a referenced base was evicted"

    @rule(frac=st.floats(0.0, 1.0))
    def budget(self, frac):
        total = self.store.stats()["bytes_stored"]
        self.store.gc(max_bytes=int(total * frac))

    @rule()
    def drop_stale(self):
        self.store.drop_stale_refs(older_than=-1.0)  # every record is "old": only live referrers keep theirs

    @invariant()
    def residuals_have_bases_and_records(self):
        present = {k for k, _, _ in self.store.backend.list()}
        for key in present:
            header, _ = unpack_entry(self.store.backend.get(key), key)
            if header["base"] is not None:
                assert header["base"] in present
                assert header["base_ref"] in self.store.metadata.refs(header["base"])

    @invariant()
    def lookups_are_right_or_shorter(self):
        # a shared prefix comes back as its first writer computed it: a prefill of another length may differ
        # in the last bits (float reduction order), so the check is "the same up to 1e-5", where another
        # sequence's cache would differ by O(1)
        for ids, cache in list(self.seen.items())[:3]:
            n, got = self.store.longest_prefix(list(ids))
            if n:
                for (gk, gv), (wk, wv) in zip(cache_layers(got), cache_layers(slice_cache(cache, 0, n))):
                    assert torch.allclose(gk, wk, rtol=0, atol=1e-5) and torch.allclose(gv, wv, rtol=0, atol=1e-5)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=15, stateful_step_count=10, deadline=None,
                                     suppress_health_check=list(HealthCheck))
