"""Decode must raise only DecodeError subclasses on damaged input: never crash, hang or allocate without bound.

Three kinds of damage: raw (truncation, bit flips, overwrites: caught by lengths and checksums),
and *resealed* damage, where the checksums are recomputed after mutating a section or the header,
so the mutation reaches the parsers behind the checksums.
"""
import functools
import os
import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import seqkv
from seqkv.checksum import crc32c
from seqkv.format.container import FLAG_PRUNED, MAGIC, PREAMBLE, Container
from seqkv.errors import DecodeError
from seqkv.profile import ProfileMismatchError

from conftest import tiny_cache, tiny_profile

FUZZ = settings(max_examples=int(os.environ.get("SEQKV_FUZZ_EXAMPLES", "150")), deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=None)
def sample(kind: str) -> bytes:
    if kind == "lossless16":
        model, cache = tiny_cache("llama", tokens=12, dtype=torch.float16)
        return seqkv.encode(cache, preset="lossless", model=model)
    if kind == "lossless32":
        model, cache = tiny_cache("qwen2", tokens=9)
        return seqkv.encode(cache, preset="lossless", model=model, positions=[0, 2, 4, 6, 8, 10, 12, 14, 16])
    if kind == "calibrated":
        model, cache = tiny_cache("llama", tokens=40, dtype=torch.float16)
        return seqkv.encode(cache, model=model, profile=tiny_profile(), scale=0.03)
    if kind == "pruned":  # 1.1: PRUNED flag, kept positions ragged per head
        model, cache = tiny_cache("llama", tokens=40, dtype=torch.float16)
        return seqkv.encode(cache, preset="balanced", model=model,
                            prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))
    if kind == "pruned_calibrated":  # 1.2: pruned (one set of positions per layer) and calibrated
        model, cache = tiny_cache("llama", tokens=40, dtype=torch.float16)
        return seqkv.encode(cache, model=model, profile=tiny_profile(), scale=0.03,
                            prune=seqkv.pruner("key_norm", ratio=0.5, level="layer"))
    if kind == "lloydmax":
        model, cache = tiny_cache("llama", tokens=12)
        return seqkv.encode(cache, preset="balanced", model=model, rotation="hadamard", quantizer="lloydmax", bits=3)
    model, cache = tiny_cache("llama", tokens=12, dtype=torch.bfloat16)
    return seqkv.encode(cache, preset=kind, model=model)


ALL_KINDS = ["lossless16", "lossless32", "balanced", "small", "lloydmax", "calibrated", "pruned", "pruned_calibrated"]
KINDS = st.sampled_from(ALL_KINDS)


@pytest.fixture(autouse=True, scope="module")
def _warm_samples():
    """Build every sample (and the profile) before hypothesis starts timing examples."""
    for kind in ALL_KINDS:
        sample(kind)


def decode(data, **kw):
    """Every sample decodes with the tiny profile at hand (ignored by uncalibrated containers)."""
    return seqkv.decode(data, profile=tiny_profile(), **kw)


def reseal(header: dict, sections: list[bytes], like: bytes | None = None) -> bytes:
    """Rebuild a container from a (mutated) header and sections, with the flags of ``like`` (the original
    container) and the minor version the writer would give such contents, so that mutations reach past
    the reader's version checks (docs/format.md §2: calibrated or pruned 1.1, both 1.2)."""
    table = []
    offset = 0
    for entry, payload in zip(header["sections"], sections):
        table.append(dict(entry, offset=offset, length=len(payload), crc32c=crc32c(payload)))
        offset += len(payload)
    header = dict(header, sections=table)
    hb = json.dumps(header).encode()
    flags = 0 if like is None else PREAMBLE.unpack_from(like, 0)[3]
    calibrated, pruned = "profile" in header, bool(flags & FLAG_PRUNED)
    minor = 2 if calibrated and pruned else int(calibrated or pruned)
    return PREAMBLE.pack(MAGIC, 1, minor, flags, len(hb), crc32c(hb)) + hb + b"".join(sections)


def split(data: bytes):
    c = Container(data)
    return c.header, [bytes(c.section(e["name"])) for e in c.header["sections"]]


def must_decode_or_refuse(data):
    try:
        cache = decode(data, max_decoded_bytes=1 << 26)
    except (DecodeError, ProfileMismatchError):  # a mutated profile reference asks for another profile
        return
    assert len(cache.layers) >= 1
    try:
        seqkv.inspect(data)
    except DecodeError:
        pass


@FUZZ
@given(KINDS, st.data())
def test_truncated(kind, data):
    blob = sample(kind)
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(DecodeError):
        decode(blob[:cut])


@FUZZ
@given(KINDS, st.data())
def test_bit_flips(kind, data):
    blob = bytearray(sample(kind))
    positions = data.draw(st.sets(st.integers(0, len(blob) - 1), min_size=1, max_size=4))
    for i in positions:  # distinct bytes, so two flips never cancel
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(DecodeError):  # every byte is covered by a length, the magic or a checksum
        decode(bytes(blob))


@FUZZ
@given(KINDS, st.data())
def test_resealed_section_mutations(kind, data):
    blob = sample(kind)
    header, sections = split(blob)
    i = data.draw(st.integers(0, len(sections) - 1))
    payload = bytearray(sections[i])
    op = data.draw(st.sampled_from(["flip", "overwrite", "truncate", "extend", "insert"]))
    if op == "flip" and payload:
        j = data.draw(st.integers(0, len(payload) - 1))
        payload[j] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "overwrite" and payload:
        j = data.draw(st.integers(0, len(payload) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        payload[j:j + len(chunk)] = chunk
    elif op == "truncate":
        del payload[data.draw(st.integers(0, len(payload))):]
    elif op == "extend":
        payload += data.draw(st.binary(min_size=1, max_size=64))
    else:
        j = data.draw(st.integers(0, len(payload)))
        payload[j:j] = data.draw(st.binary(min_size=1, max_size=8))
    sections[i] = bytes(payload)
    must_decode_or_refuse(reseal(header, sections, blob))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                        st.text(max_size=8), st.lists(st.integers(-5, 5), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


@FUZZ
@given(KINDS, st.data())
def test_resealed_header_mutations(kind, data):
    blob = sample(kind)
    header, sections = split(blob)
    paths = [("tokens",), ("layers",), ("kv_heads",), ("head_dim",), ("dtype",), ("batch",), ("positions",),
             ("positions", "start"), ("positions", "next"), ("positions", "contiguous"), ("model",), ("model", "layers"),
             ("model", "head_dim"), ("model", "rope_inv_freq"), ("model", "rope_attention_scaling"), ("pipeline",),
             ("pipeline", "mode"), ("pipeline", "coder"), ("pipeline", "quantizer"), ("pipeline", "sink_tokens"),
             ("pipeline", "transforms"), ("pipeline", "predictor"), ("profile",), ("profile", "sha256"),
             ("profile", "bytes"), ("rate_control",), ("pruning",), ("pruning", "source_tokens")]
    path = data.draw(st.sampled_from(paths))
    target = header
    for key in path[:-1]:
        target = target.setdefault(key, {}) if isinstance(target, dict) else {}
    if isinstance(target, dict):
        if data.draw(st.booleans()):
            target[path[-1]] = data.draw(JSON_VALUES)
        else:
            target.pop(path[-1], None)
    must_decode_or_refuse(reseal(header, sections, blob))


@pytest.mark.parametrize("tokens", [2**26, 2**40])
def test_absurd_sizes_refused_before_allocating(tokens):
    header, sections = split(sample("balanced"))
    header["tokens"] = tokens
    header["positions"] = {"start": 0, "next": tokens, "contiguous": True}
    with pytest.raises(DecodeError, match="max_decoded_bytes|outside|elements per byte"):
        seqkv.decode(reseal(header, sections))


def test_unknown_stage_and_future_major_version():
    header, sections = split(sample("balanced"))
    header["pipeline"]["coder"] = {"id": "brotli-9000"}
    with pytest.raises(DecodeError, match="unknown"):
        seqkv.decode(reseal(header, sections))
    blob = bytearray(sample("balanced"))
    blob[8] = 2
    with pytest.raises(seqkv.UnsupportedVersionError):
        seqkv.decode(bytes(blob))


def test_stage_in_the_wrong_place_is_refused():
    header, sections = split(sample("balanced"))
    header["pipeline"]["coder"] = {"id": "lossless_float"}
    with pytest.raises(DecodeError, match="needs a symbol_coder"):
        seqkv.decode(reseal(header, sections))
    header["pipeline"]["coder"] = {"id": "context_ans"}
    header["pipeline"]["transforms"] = [{"id": "uniform"}]
    with pytest.raises(DecodeError, match="needs a transform"):
        seqkv.decode(reseal(header, sections))


# -- issue 16: the decoder bounded by its input ---------------------------------------------------------------

def _load_harness():
    """bench/fuzz.py: the mutations, the seed corpus (tests/fuzz_corpus/) and the per-input checks."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "fuzz.py")
    spec = importlib.util.spec_from_file_location("seqkv_bench_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def _doubled(blob: bytes, factor: int = 2) -> bytes:
    header, sections = split(blob)
    header["tokens"] *= factor
    header["positions"]["next"] = header["positions"]["start"] + header["tokens"]
    return reseal(header, sections, blob)


@pytest.mark.parametrize("preset", ["balanced", "small", "near_lossless"])
@pytest.mark.parametrize("factor", [2, 1000])
def test_lossy_token_count_edits_are_refused(preset, factor):
    """Finding 1: a resealed lossy container with its token count multiplied decoded to a longer cache of
    garbage.  Each context_ans class's table must be the histogram of the symbols it codes (§6.3): the
    extra symbols an exhausted ANS stream yields change it."""
    model, cache = tiny_cache("llama", tokens=12, dtype=torch.bfloat16)
    blob = seqkv.encode(cache, preset=preset, model=model)
    with pytest.raises(DecodeError, match="histogram|elements per byte"):
        seqkv.decode(_doubled(blob, factor))


def test_an_exhausted_ans_stream_decodes_more_symbols_cleanly_so_the_table_is_checked():
    """The property behind finding 1, which the format cannot change for existing containers: an ANS stream
    that has run out of words keeps yielding its table's first symbol from state 0, and ends cleanly (§7.2's
    test vector: any number of 0s from state 0 gives no word).  What refuses the extra symbols is the check
    that the table is the quantised histogram of the symbols decoded with it."""
    import numpy as np
    from seqkv.ans_coding import check_table_is_histogram, decode_symbols, table_and_words

    symbols = np.array([0, 3, 1, 1, 2, 0, 1, 2, 3, 3, 1], dtype=np.int64)
    table, words = table_and_words(symbols)
    longer = decode_symbols(words, table, 2 * len(symbols))   # no error: clean
    assert np.array_equal(longer[:len(symbols)], symbols) and not longer[len(symbols):].any()
    check_table_is_histogram(table, np.bincount(symbols, minlength=table.size), "ok")
    with pytest.raises(DecodeError, match="histogram"):
        check_table_is_histogram(table, np.bincount(longer, minlength=table.size), "doubled")


@pytest.mark.parametrize("tokens", [2**18, 2**20])
def test_decode_is_bounded_by_the_input_size(tokens):
    """The expansion bound: at most MAX_ELEMENTS_PER_BYTE elements per container byte, checked when the
    container is opened (inspect and token_positions too), before anything is allocated."""
    from seqkv.format.header import MAX_ELEMENTS_PER_BYTE

    blob = sample("balanced")
    header, sections = split(blob)
    header["tokens"] = tokens
    header["positions"] = {"start": 0, "next": tokens, "contiguous": True}
    bad = reseal(header, sections)
    assert 2 * 2 * 2 * tokens * 16 > MAX_ELEMENTS_PER_BYTE * len(bad)
    for call in (seqkv.decode, seqkv.inspect, seqkv.token_positions):
        with pytest.raises(DecodeError, match="elements per byte"):
            call(bad)


def test_every_corpus_seed_decodes():
    """The seed corpus is current (after a format change: python bench/fuzz.py --write-corpus)."""
    for kind in harness.KINDS:
        outcome, exc = harness.run_one(kind, harness.seed(kind))
        assert (outcome, exc) == ("decoded", None), kind


@pytest.mark.parametrize("kind", harness.KINDS)
def test_short_fuzz_pass(kind):
    """A short pass of bench/fuzz.py's built-in engine per kind (the long one: python bench/fuzz.py
    --mutations 100000 --kind KIND): every input decodes or raises a DecodeError, within the bound."""
    stats = harness.run_builtin(kind, int(os.environ.get("SEQKV_FUZZ_MUTATIONS", "1000")), seed_value=16, out_dir=None)
    assert not stats.unexpected, stats.unexpected[0][1]
    assert stats.outcomes["decoded"] >= 1 and sum(stats.outcomes.values()) == stats.runs


CHUNK_KINDS = st.sampled_from(list(harness.CHUNK_KINDS))


@FUZZ
@given(CHUNK_KINDS, st.data())
def test_store_chunk_resealed_mutations(kind, data):
    """Store chunk payloads (plain, residual on a base, calibrated), mutated by hypothesis through the
    harness's operators, resealed."""
    rng_seed = data.draw(st.integers(0, 2**32 - 1))
    import random

    blob = harness.mutate(harness.RandomChooser(random.Random(rng_seed)), harness.seed(kind))
    outcome, exc = harness.run_one(kind, blob)
    assert exc is None, f"{outcome}: {exc!r}"


def test_decode_rows_counts_the_symbols_it_decodes():
    """The compiled decoder's histogram (what the table check reads) is the decoded symbols' bincount."""
    import numpy as np
    from seqkv.ans_coding import decode_symbols, decode_symbols_into_rows, table_and_words

    rng = np.random.default_rng(16)
    symbols = rng.integers(-3, 9, size=5 * 40)
    table, words = table_and_words(symbols)
    out = np.zeros((7, 40), dtype=np.int32)
    rows = np.array([6, 0, 3, 2, 5])
    hist = decode_symbols_into_rows(words, table, out, rows, np.arange(5, dtype=np.int64))
    assert np.array_equal(hist, np.bincount(symbols - table.lo, minlength=table.size))
    assert np.array_equal(out[rows] - np.arange(5)[:, None], symbols.reshape(5, 40))
    assert np.array_equal(decode_symbols(words, table, symbols.size), symbols)
