"""The ``layer.{i}.kept`` section of a pruned container: the positions each head of a layer kept
(docs/format.md §9.2).  One list shared by every head, or one per head; each as a bitmap over the span
``[start, next)`` or as gaps, whichever is smaller."""
from __future__ import annotations

import numpy as np
import torch

from ..bitpacking import pack_low_bits, unpack_low_bits
from ..errors import FormatError
from ..wire import Reader, write_uvarint


def kept_section_name(layer: int) -> str:
    return f"layer.{layer}.kept"


def encode_kept(lists: list[torch.Tensor], start: int, span: int) -> bytes:
    shared = all(torch.equal(lists[0], p) for p in lists[1:])
    out = bytearray([1 if shared else 0])
    for pos in lists[:1] if shared else lists:
        off = (pos - start).numpy().astype(np.int64)
        write_uvarint(out, len(off))
        gaps = bytearray()
        prev = -1
        for o in off.tolist():
            write_uvarint(gaps, o - prev - 1)
            prev = o
        bitmap_len = (span + 7) // 8
        if bitmap_len <= len(gaps):
            bits = np.zeros(span, dtype=np.uint32)
            bits[off] = 1
            out.append(0)
            out += pack_low_bits(bits, 1)
        else:
            out.append(1)
            out += gaps
    return bytes(out)


def decode_kept(payload, heads: int, width: int, start: int, span: int, what: str) -> list[torch.Tensor]:
    r = Reader(payload, what=what)
    shared = r.u8()
    if shared > 1:
        raise FormatError(f"{what}: shared flag must be 0 or 1")
    lists = []
    for _ in range(1 if shared else heads):
        count = r.uvarint(max_value=width)
        if count < 1:
            raise FormatError(f"{what}: a head keeps no token")
        mode = r.u8()
        if mode == 0:
            nbytes = (span + 7) // 8
            bits = unpack_low_bits(r.bytes(nbytes), 1, span)
            off = np.flatnonzero(bits).astype(np.int64)
            if len(off) != count:
                raise FormatError(f"{what}: the bitmap has {len(off)} ones, expected {count}")
        elif mode == 1:
            gaps = r.uvarint_array(count, max_value=span)
            off = np.cumsum(gaps + 1) - 1
            if int(off[-1]) >= span:
                raise FormatError(f"{what}: a kept position lies outside [start, next)")
        else:
            raise FormatError(f"{what}: unknown positions mode {mode}")
        lists.append(torch.from_numpy(off + start))
    r.expect_end()
    return (lists * heads if shared else lists), bool(shared)
