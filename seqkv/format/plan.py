"""The section plan: which sections a container has, in which order, and how a layer's tensors are laid out
in them (docs/format.md §6, §9.2, §10.1).

Per layer, the keys and the values each get one section ``layer.{i}.{kind}``, coded one of three ways:

* ``plain``: one pipeline payload of the layer's tensor [H, T, D] (every head at the same positions);
* ``per_head``: a pruned layer whose heads kept different positions: one pipeline payload [1, n_h, D] per
  head, each prefixed by its length as a uvarint;
* ``residual``: a store chunk's section coded against its base entry (:mod:`seqkv.format.residual`).

A pruned container adds ``layer.{i}.kept`` before each layer's tensors; a container whose positions are not
consecutive adds ``positions`` (int64 each) after them; a store chunk puts ``tokens`` and ``positions`` first.
"""
from __future__ import annotations

import torch

from ..errors import FormatError
from ..wire import Reader, write_uvarint
from .header import Header
from .pipeline import KINDS, Pipeline, section_name
from ..stages.base import CodingState, TensorContext

PLAIN, PER_HEAD, RESIDUAL = "plain", "per_head", "residual"


def kept_section_name(layer: int) -> str:
    return f"layer.{layer}.kept"


def section_order(header: Header, pruned: bool) -> list[str]:
    """Every section the container must hold, in the order the writer lays them out."""
    layers = []
    for i in range(header.layers):
        layers += ([kept_section_name(i)] if pruned else []) + [section_name(i, kind) for kind in KINDS]
    if header.chunk is not None:
        lead = ([] if header.chunk.token_code == "base" else ["tokens"]) + ([] if header.positions.contiguous else ["positions"])
        return lead + layers
    return layers + ([] if header.positions.contiguous or pruned else ["positions"])


def encode_per_head(pipeline: Pipeline, tensors: list[torch.Tensor], positions: list[torch.Tensor], layer: int,
                    kind: str, layout, dtype_name: str) -> bytes:
    """A ``per_head`` section: one length-prefixed payload per head (``tensors[h]``: [n_h, D])."""
    out = bytearray()
    for x, pos in zip(tensors, positions):
        ctx = TensorContext(layer=layer, kind=kind, positions=pos, layout=layout)
        part = pipeline.encode_tensor(x.unsqueeze(0).cpu(), ctx, dtype_name)
        write_uvarint(out, len(part))
        out += part
    return bytes(out)


def decode_per_head(pipeline: Pipeline, payload, positions: list[torch.Tensor], layer: int, kind: str, layout,
                    dtype_name: str, dim: int) -> list[torch.Tensor]:
    """The heads of a ``per_head`` section, [n_h, D] each."""
    r = Reader(payload, what=section_name(layer, kind))
    per_head = []
    for pos in positions:
        n = r.uvarint(max_value=r.remaining())
        part = r.bytes(n)
        ctx = TensorContext(layer=layer, kind=kind, positions=pos, layout=layout, state=CodingState())
        per_head.append(pipeline.decode_tensor(part, ctx, dtype_name, (1, len(pos), dim))[0])
    r.expect_end()
    return per_head


def check_sections(present, expected: list[str]) -> None:
    """The reader's check that a container holds exactly the sections its header plans."""
    present = list(present)
    if present != expected:
        missing = [n for n in expected if n not in present]
        extra = [n for n in present if n not in expected]
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}" if extra else "out of order"
        raise FormatError(f"the section table does not match the header's plan ({detail})")
