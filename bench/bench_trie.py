"""TokenTrie (seqkv_ext.trie) insert and longest-prefix throughput, next to a pure-Python dict trie.

Run:  python -m pytest bench/bench_trie.py --benchmark-only

Corpus (real text present on any machine): the bytes of CPython's stdlib ``.py`` sources
(``sysconfig.get_paths()["stdlib"]``, site-/dist-packages left out, files in sorted
relative-path order, files that are not valid UTF-8 skipped), the first 2**20 bytes used
as token ids 0..255 and cut into 4096 sequences of 256 tokens.  The stdlib differs
between Python versions, so ``corpus_crc32``, the first/last file and the Python version
are recorded in ``extra_info``.

* insert: build a fresh trie from the whole corpus (every sequence once);
* lookup: ``longest_prefix`` of 10,000 queries on the full trie: 5,000 corpus sequences
  (a full 256-token match each) and 5,000 256-token windows at random unaligned offsets
  (short matches).

Each side gets its natural, pre-converted input (TokenTrie: int32 numpy rows; the Python
trie: lists of ints); ``test_trie_lookup_from_lists`` gives TokenTrie the lists too.
``extra_info`` holds tokens/s (inserts) or matched tokens/s (lookups), sequences or
lookups per second, nodes, bytes per node (TokenTrie: ``nbytes``, allocated capacity
included; Python: ``sys.getsizeof`` of its lists and dicts) and ``speedup_vs_python``
(against the baseline measured in the same run, which runs first).
"""
from __future__ import annotations

import os
import sys
import sysconfig
import zlib

import numpy as np
import pytest

from seqkv_ext.trie import TokenTrie

N_TOKENS = 1 << 20
SEQ_LEN = 256
N_QUERIES = 10_000
_SECONDS: dict[str, float] = {}


# --------------------------------------------------------------------------- corpus


def _stdlib_corpus() -> tuple[np.ndarray, dict]:
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        for name in filenames:
            if name.endswith(".py"):
                rels.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    rels.sort()
    buf = bytearray()
    used = []
    for rel in rels:
        with open(os.path.join(root, *rel.split("/")), "rb") as f:
            data = f.read()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        buf += data
        used.append(rel)
        if len(buf) >= N_TOKENS:
            break
    if len(buf) < N_TOKENS:
        pytest.skip(f"only {len(buf)} bytes of stdlib sources under {root}")
    raw = bytes(buf[:N_TOKENS])
    rows = np.frombuffer(raw, dtype=np.uint8).astype(np.int32).reshape(-1, SEQ_LEN)
    info = {"corpus_tokens": N_TOKENS, "corpus_sequences": rows.shape[0], "corpus_crc32": zlib.crc32(raw),
            "corpus_files": len(used), "first_file": used[0], "last_file": used[-1],
            "python": sys.version.split()[0]}
    return rows, info


@pytest.fixture(scope="module")
def corpus():
    rows, info = _stdlib_corpus()
    return [np.ascontiguousarray(r) for r in rows], [r.tolist() for r in rows], info


@pytest.fixture(scope="module")
def queries(corpus):
    rows, _, _ = corpus
    flat = np.concatenate(rows)
    rng = np.random.default_rng(20240601)
    full = [rows[i] for i in rng.integers(0, len(rows), N_QUERIES // 2)]
    starts = rng.integers(0, len(flat) - SEQ_LEN, N_QUERIES - N_QUERIES // 2)
    windows = [flat[s : s + SEQ_LEN].copy() for s in starts]
    arrays = full + windows
    return arrays, [a.tolist() for a in arrays]


# --------------------------------------------------------------------------- the Python baseline


class PyTrie:
    """The straightforward pure-Python counting trie: node = [count, {token: child node}]."""

    def __init__(self):
        self.root = [0, {}]
        self.nodes = 0

    def insert(self, seq, count=1):
        node = self.root
        node[0] += count
        new = 0
        for t in seq:
            kids = node[1]
            nxt = kids.get(t)
            if nxt is None:
                nxt = kids[t] = [0, {}]
                new += 1
            nxt[0] += count
            node = nxt
        self.nodes += new
        return new

    def longest_prefix(self, seq):
        node = self.root
        m = 0
        for t in seq:
            node = node[1].get(t)
            if node is None:
                break
            m += 1
        return m

    def nbytes(self):
        """Bytes of the lists and dicts (the small cached ints are not counted)."""
        total = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            total += sys.getsizeof(node) + sys.getsizeof(node[1])
            stack.extend(node[1].values())
        return total


def _build_py(lists):
    trie = PyTrie()
    for seq in lists:
        trie.insert(seq)
    return trie


def _build_c(arrays):
    trie = TokenTrie()
    for a in arrays:
        trie.insert(a)
    return trie


def _lookup_all(trie, queries):
    lp = trie.longest_prefix
    return sum(lp(q) for q in queries)


def _record(benchmark, key, tokens, items, item_name, token_name="tokens"):
    secs = benchmark.stats.stats.median
    _SECONDS[key] = secs
    info = benchmark.extra_info
    info[f"{token_name}_per_s"] = tokens / secs
    info[f"{item_name}_per_s"] = items / secs
    base = "py_" + key.split("_", 1)[1]
    if not key.startswith("py_") and base in _SECONDS:
        info["speedup_vs_python"] = _SECONDS[base] / secs


# --------------------------------------------------------------------------- benchmarks (baselines first)


def test_py_insert(benchmark, corpus):
    _, lists, info = corpus
    trie = benchmark.pedantic(_build_py, args=(lists,), rounds=3, iterations=1)
    _record(benchmark, "py_insert", N_TOKENS, len(lists), "sequences")
    benchmark.extra_info.update(info)
    benchmark.extra_info["nodes"] = trie.nodes
    benchmark.extra_info["bytes_per_node"] = trie.nbytes() / trie.nodes


def test_trie_insert(benchmark, corpus):
    arrays, _, info = corpus
    trie = benchmark.pedantic(_build_c, args=(arrays,), rounds=5, iterations=1)
    _record(benchmark, "c_insert", N_TOKENS, len(arrays), "sequences")
    benchmark.extra_info.update(info)
    benchmark.extra_info["nodes"] = len(trie)
    benchmark.extra_info["nbytes"] = trie.nbytes
    benchmark.extra_info["bytes_per_node"] = trie.nbytes / len(trie)
    benchmark.extra_info["serialized_bytes_per_node"] = len(trie.tobytes()) / len(trie)
    assert trie.total_tokens == N_TOKENS and trie.count([]) == len(arrays)


def test_py_lookup(benchmark, corpus, queries):
    trie = _build_py(corpus[1])
    matched = benchmark.pedantic(_lookup_all, args=(trie, queries[1]), rounds=5, iterations=1)
    _record(benchmark, "py_lookup", matched, N_QUERIES, "lookups", "matched_tokens")
    benchmark.extra_info["matched_tokens"] = matched


def test_trie_lookup(benchmark, corpus, queries):
    trie = _build_c(corpus[0])
    matched = benchmark.pedantic(_lookup_all, args=(trie, queries[0]), rounds=10, iterations=1)
    _record(benchmark, "c_lookup", matched, N_QUERIES, "lookups", "matched_tokens")
    benchmark.extra_info["matched_tokens"] = matched
    assert matched == _lookup_all(_build_py(corpus[1]), queries[1])


def test_trie_lookup_from_lists(benchmark, corpus, queries):
    """The same lookups given Python lists (includes the list -> int32 array conversion)."""
    trie = _build_c(corpus[0])
    matched = benchmark.pedantic(_lookup_all, args=(trie, queries[1]), rounds=5, iterations=1)
    _record(benchmark, "c_lookup_lists", matched, N_QUERIES, "lookups", "matched_tokens")
    if "py_lookup" in _SECONDS:
        benchmark.extra_info["speedup_vs_python"] = _SECONDS["py_lookup"] / benchmark.stats.stats.median
