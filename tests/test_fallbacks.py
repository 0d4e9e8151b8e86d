"""The pure numpy / constriction paths that stand in when a seqkv_ext module is missing give what the
compiled ones give (and the same errors), so a machine without the extensions decodes the same caches."""
from __future__ import annotations

import numpy as np
import pytest

from seqkv import ans_coding, wire
from seqkv.errors import FormatError
from seqkv.stages import context_ans
from seqkv.stages.context_ans import ContextANS


def _read_uvarints(buf: bytes, count: int):
    reader = wire.Reader(buf)
    try:
        return reader.uvarint_array(count).tolist(), reader.pos
    except FormatError as exc:
        return type(exc), str(exc).split(":")[1].split("(")[0].strip()


@pytest.mark.parametrize("seed", range(3))
def test_uvarint_arrays_read_the_same_without_the_extension(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    values = [int(v) for v in rng.integers(0, 2**62, 50) >> rng.integers(0, 62, 50)]
    buf = bytearray()
    for v in values:
        wire.write_uvarint(buf, v)
    cases = [(bytes(buf), len(values)), (bytes(buf[:-1]), len(values)),       # whole; truncated
             (b"\xff" * 9 + b"\x01", 1), (b"\x05" + b"\xff" * 12, 2)]       # 10-byte varints: too long
    compiled = [_read_uvarints(b, n) for b, n in cases]
    monkeypatch.setattr(wire, "_ext_uvarints", None)
    fallback = [_read_uvarints(b, n) for b, n in cases]
    # the last case is both too long and unterminated: either message is right
    assert fallback[:3] == compiled[:3] and fallback[3][0] is FormatError
    assert compiled[0] == (values, len(buf))
    assert compiled[1][0] is FormatError and "truncated" in compiled[1][1]
    assert compiled[2][0] is compiled[3][0] is FormatError


@pytest.mark.parametrize("seed", range(3))
def test_context_coder_round_trips_without_the_extensions(monkeypatch, seed):
    """Channel centring/classes (seqkv_ext.channels) and decoding into rows (seqkv_ext.ans) both have
    numpy stand-ins; every mix of compiled and stand-in encoder and decoder gives the symbols back."""
    rng = np.random.default_rng(seed)
    heads, tokens, dim = 2, 300, 16
    spread = rng.uniform(0.2, 40, (heads, 1, dim))
    q = np.round(rng.standard_normal((heads, tokens, dim)) * spread + rng.integers(-50, 50, (heads, 1, dim)))
    q = q.astype(np.int32)
    coder = ContextANS(classes_per_octave=4)
    compiled = coder.encode(q)
    monkeypatch.setattr(context_ans, "_ext_channels", None)
    fallback = coder.encode(q)
    monkeypatch.undo()
    # the offsets are exact either way; a spread summed in another order may only move a class boundary
    assert len(fallback) == pytest.approx(len(compiled), rel=0.01)
    for blob in (compiled, fallback):
        for ext in (True, False):
            if not ext:
                monkeypatch.setattr(ans_coding, "_ext_ans", None)
            out = coder.decode(wire.Reader(blob), (heads, tokens, dim))
            monkeypatch.undo()
            assert np.array_equal(out, q)


def test_decode_into_rows_stand_in_matches(monkeypatch):
    rng = np.random.default_rng(5)
    symbols = rng.integers(-3, 9, 4 * 50)
    table = ans_coding.table_from_symbols(symbols)
    words = ans_coding.encode_symbols(symbols, table)
    rows = np.array([4, 0, 2, 5])
    offsets = np.array([10, -20, 0, 7])
    outs = []
    for ext in (True, False):
        if not ext:
            monkeypatch.setattr(ans_coding, "_ext_ans", None)
        out = np.zeros((6, 50), np.int32)
        ans_coding.decode_symbols_into_rows(words, table, out, rows, offsets)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])
    assert np.array_equal(outs[0][rows], symbols.reshape(4, 50) + offsets[:, None])
    with pytest.raises(FormatError):  # a stream cut short is refused by both
        ans_coding.decode_symbols_into_rows(words[:-1], table, np.zeros((6, 50), np.int32), rows, offsets)
