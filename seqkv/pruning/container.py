"""Pruned caches in the container (format 1.1, flag bit 0 ``PRUNED``; bytes in docs/format.md §9).

Per layer: a ``layer.{i}.kept`` section lists the kept positions (one list shared by
every head, or one per head), and the ``layer.{i}.keys`` / ``layer.{i}.values``
sections code only the kept tokens: one pipeline payload ``[H, n, D]`` when the
heads share their positions, else one payload ``[1, n_h, D]`` per head, each
prefixed by its length.  Nothing is padded or masked in the bytes.
"""
from __future__ import annotations

import numpy as np
import torch

from ..bitpacking import pack_low_bits, unpack_low_bits
from ..errors import AlreadyPrunedError, ConfigError, EncodeError, FormatError
from ..stages.base import TensorContext
from ..wire import Reader, write_uvarint
from .state import PruneState, build_pruned_cache, pruned_state, ragged_layers

HEADER_VERSION = 1
MAX_SPAN = 1 << 40
LEVELS = ("token", "layer", "chunk")
CALIBRATED_PRUNED_MINOR = 2   # format 1.2: a pruned container coded with the calibrated codec (docs/format.md §9.3)


def kept_section_name(layer: int) -> str:
    return f"layer.{layer}.kept"


# -- kept positions ------------------------------------------------------------------------------

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


# -- encode ----------------------------------------------------------------------------------------

def encode_pruned(cache, prune, *, preset, model, config, positions, progress, profile=None, target=None,
                  kl_margin=None, **options) -> bytes:
    """A pruned container; with ``profile`` (the calibrated codec) every head of a layer must keep the
    same positions, and ``target`` / ``kl_margin`` drive its rate control."""
    from .. import codec
    from ..container import FLAG_PRUNED, write_container
    from ..hf_adapter import SUPPORTED_DTYPES, cache_layers
    from ..presets import pipeline_config
    from ..progress import progress_bar

    if prune is not None:
        if pruned_state(cache) is not None:
            raise AlreadyPrunedError("this cache was pruned already; encode it without prune=, or prune the original")
        cache = prune.prune(cache, model=model, positions=positions)
    elif positions is not None:
        raise EncodeError("a pruned cache carries its own positions; do not pass positions=")
    state = pruned_state(cache)
    layers = cache_layers(cache)
    heads, _, dim = layers[0][0].shape
    dtype_name = SUPPORTED_DTYPES[layers[0][0].dtype]
    per_layer, next_position = ragged_layers(cache)
    start = min(int(p[0]) for layer in per_layer for _, _, p in layer)
    span = next_position - start
    width = max(int(p.numel()) for layer in per_layer for _, _, p in layer)
    kept_sections = [encode_kept([p for _, _, p in hs], start, span) for hs in per_layer]

    def header_of(pipeline, layout) -> dict:
        header = codec._header(pipeline, layout, dtype_name, len(layers), heads, dim, width,
                               {"start": start, "next": next_position, "contiguous": False})
        header["pruning"] = {"version": HEADER_VERSION, "level": state.level, "pruner": state.pruner,
                             "source_tokens": state.source_tokens}
        return header

    if profile is not None:
        if any(k[0] != 1 for k in kept_sections):
            raise ConfigError(
                f"the calibrated profile's KLT mixes the KV heads of a layer, so every head of a layer must keep "
                f"the same positions; this cache was pruned per head ({state.pruner.get('id')!r}, level "
                f"{state.level!r}, head_budget {state.pruner.get('head_budget')!r}): prune with level='layer' "
                f"(or 'chunk'), or encode with a preset")
        tensors = [(torch.stack([h[0] for h in hs]), torch.stack([h[1] for h in hs])) for hs in per_layer]
        pipeline, layout = codec.calibrated_setup(profile, model, config, tensors, kl_margin, options)

        def write(sections, extra_header):
            pairs = [sections[2 * i:2 * i + 2] for i in range(len(per_layer))]
            out = [s for i, pair in enumerate(pairs) for s in [(kept_section_name(i), kept_sections[i]), *pair]]
            return write_container(dict(header_of(pipeline, layout), **extra_header), out, flags=FLAG_PRUNED,
                                   min_minor=CALIBRATED_PRUNED_MINOR)

        return codec.calibrated_search(pipeline, profile, layout, tensors, [hs[0][2] for hs in per_layer], target,
                                       kl_margin, write, progress=progress,
                                       elements=len(layers) * 2 * heads * dim * state.source_tokens)
    pipeline = codec._Pipeline(pipeline_config(preset, **options))
    layout = codec._layout_for(model, config, layers, pipeline.lossless)
    sections = []
    for i, hs in progress_bar(list(enumerate(per_layer)), desc=f"encode {preset} (pruned)", enabled=progress):
        lists = [p for _, _, p in hs]
        kept = kept_sections[i]
        sections.append((kept_section_name(i), kept))
        shared = kept[0] == 1
        for kind_i, kind in enumerate(codec.KINDS):
            if shared:
                x = torch.stack([h[kind_i] for h in hs])
                ctx = TensorContext(layer=i, kind=kind, positions=lists[0], layout=layout)
                payload = pipeline.encode_tensor(x.cpu(), ctx, dtype_name)
            else:
                out = bytearray()
                for h in hs:
                    ctx = TensorContext(layer=i, kind=kind, positions=h[2], layout=layout)
                    part = pipeline.encode_tensor(h[kind_i].unsqueeze(0).cpu(), ctx, dtype_name)
                    write_uvarint(out, len(part))
                    out += part
                payload = bytes(out)
            sections.append((codec.section_name(i, kind), payload))
    return write_container(header_of(pipeline, layout), sections, flags=FLAG_PRUNED)


# -- decode ----------------------------------------------------------------------------------------

class PrunedInfo:
    """The validated ``pruning`` header object of a container."""

    def __init__(self, parsed):
        h = parsed.container.header
        try:
            p = h["pruning"]
            self.version = int(p["version"])
            self.level = str(p["level"])
            self.pruner = dict(p["pruner"])
            self.source_tokens = p["source_tokens"]
            if not isinstance(self.source_tokens, int) or isinstance(self.source_tokens, bool):
                raise TypeError("source_tokens must be an integer")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"the pruning header is missing or invalid: {exc}") from None
        if self.version != HEADER_VERSION:
            raise FormatError(f"pruning header version {self.version} is unknown to this reader")
        if self.level not in LEVELS:
            raise FormatError(f"unknown pruning level {self.level!r}")
        if parsed.contiguous:
            raise FormatError("a pruned container must have positions.contiguous == false")
        self.start, self.span = parsed.start, parsed.next_position - parsed.start
        if parsed.start < 0 or not 1 <= self.span <= MAX_SPAN:
            raise FormatError("pruned positions start/next are out of range")
        if not parsed.tokens <= self.source_tokens <= 1 << 26:
            raise FormatError("pruning source_tokens is inconsistent with the positions")


def decode_layer(parsed, i: int):
    """Per head ``(keys [n, D], values [n, D])`` and the kept positions of layer ``i``."""
    from .. import codec

    info = parsed.pruning
    lists, shared = decode_kept(parsed.container.section(kept_section_name(i)), parsed.heads, parsed.tokens,
                                info.start, info.span, kept_section_name(i))
    if parsed.pipeline.needs_profile and not shared:
        raise FormatError(f"{kept_section_name(i)}: a calibrated pruned container keeps the same positions in every head")
    extra = {"profile": parsed.profile, "chain": parsed.chain}
    tensors = []
    for kind in codec.KINDS:
        name = codec.section_name(i, kind)
        payload = parsed.container.section(name)
        try:
            if shared:
                ctx = TensorContext(layer=i, kind=kind, positions=lists[0], layout=parsed.layout, extra=extra)
                x = parsed.pipeline.decode_tensor(payload, ctx, parsed.dtype, (parsed.heads, len(lists[0]), parsed.dim))
                tensors.append(list(x))
            else:
                r = Reader(payload, what=name)
                per_head = []
                for pos in lists:
                    n = r.uvarint(max_value=r.remaining())
                    part = r.bytes(n)
                    ctx = TensorContext(layer=i, kind=kind, positions=pos, layout=parsed.layout)
                    per_head.append(parsed.pipeline.decode_tensor(part, ctx, parsed.dtype, (1, len(pos), parsed.dim))[0])
                r.expect_end()
                tensors.append(per_head)
        except (ValueError, TypeError, IndexError, RuntimeError, OverflowError, MemoryError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{name}: cannot decode: {exc}") from None
    return list(zip(tensors[0], tensors[1])), lists


def decode_pruned(parsed, indices, device=None, dtype=None, progress: bool = False):
    from ..progress import progress_bar

    per_layer, kept = [], []
    for i in progress_bar(list(indices), desc="decode (pruned)", enabled=progress):
        tensors, lists = parsed.decode_layer(i)   # in layer order where sections chain across layers
        if dtype is not None:
            tensors = [(k.to(dtype), v.to(dtype)) for k, v in tensors]
        per_layer.append(tensors)
        kept.append(lists)
    info = parsed.pruning
    width = max(len(p) for layer in kept for p in layer)
    state = PruneState(kept=kept, next_position=parsed.next_position, source_tokens=info.source_tokens,
                       width=width, level=info.level, pruner=info.pruner)
    return build_pruned_cache(per_layer, state, device=device)
