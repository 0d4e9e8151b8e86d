"""Pruned caches in the container (format 1.1, flag bit 0 ``PRUNED``; bytes in docs/format.md §9): a client of
the format layer.

Per layer: a ``layer.{i}.kept`` section lists the kept positions (:mod:`seqkv.format.kept_positions`), and the
``layer.{i}.keys`` / ``layer.{i}.values`` sections code only the kept tokens: ``plain`` (one pipeline payload
``[H, n, D]``) when the heads share their positions, else ``per_head`` (:mod:`seqkv.format.plan`).  Nothing is
padded or masked in the bytes.
"""
from __future__ import annotations

import torch

from ..calibrated_encoder import calibrated_search, calibrated_setup
from ..errors import AlreadyPrunedError, ConfigError, EncodeError
from ..format import FLAG_PRUNED, Header, Pipeline, PositionsInfo, PruningInfo, write_container
from ..format.kept_positions import encode_kept
from ..format.pipeline import KINDS, section_name
from ..format.plan import encode_per_head, kept_section_name
from ..hf_adapter import SUPPORTED_DTYPES, cache_layers
from ..layout import layout_for_cache
from ..presets import pipeline_config
from ..progress import progress_bar
from ..stages.base import TensorContext
from ..version import __version__
from .state import PruneState, build_pruned_cache, pruned_state, ragged_layers


# -- encode ----------------------------------------------------------------------------------------

def encode_pruned(cache, prune, *, preset, model, config, positions, progress, profile=None, target=None,
                  kl_margin=None, **options) -> bytes:
    """A pruned container; with ``profile`` (the calibrated codec) every head of a layer must keep the
    same positions, and ``target`` / ``kl_margin`` drive its rate control."""
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
    pruning = PruningInfo(level=state.level, pruner=state.pruner, source_tokens=state.source_tokens)

    def write(pipeline, layout, sections: dict, **header_fields) -> bytes:
        for i, kept in enumerate(kept_sections):
            sections[kept_section_name(i)] = kept
        header = Header(pipeline=pipeline.full_config(), layout=layout, dtype=dtype_name, layers=len(layers),
                        kv_heads=heads, head_dim=dim, tokens=width, positions=PositionsInfo(start, next_position, False),
                        created_by=f"seqkv {__version__}", pruning=pruning, **header_fields)
        return write_container(header, pipeline, sections, flags=FLAG_PRUNED)

    if profile is not None:
        if any(k[0] != 1 for k in kept_sections):
            raise ConfigError(
                f"the calibrated profile's KLT mixes the KV heads of a layer, so every head of a layer must keep "
                f"the same positions; this cache was pruned per head ({state.pruner.get('id')!r}, level "
                f"{state.level!r}, head_budget {state.pruner.get('head_budget')!r}): prune with level='layer' "
                f"(or 'chunk'), or encode with a preset")
        tensors = [(torch.stack([h[0] for h in hs]), torch.stack([h[1] for h in hs])) for hs in per_layer]
        pipeline, layout = calibrated_setup(profile, model, config, tensors, kl_margin, options)
        return calibrated_search(
            pipeline, profile, layout, tensors, [hs[0][2] for hs in per_layer], target, kl_margin,
            lambda sections, ref, rate_control: write(pipeline, layout, sections, profile=ref, rate_control=rate_control),
            progress=progress, elements=len(layers) * 2 * heads * dim * state.source_tokens)
    pipeline = Pipeline(pipeline_config(preset, **options))
    layout = layout_for_cache(model, config, layers, pipeline.lossless)
    sections = {}
    for i, hs in progress_bar(list(enumerate(per_layer)), desc=f"encode {preset} (pruned)", enabled=progress):
        lists = [p for _, _, p in hs]
        shared = kept_sections[i][0] == 1
        for kind_i, kind in enumerate(KINDS):
            if shared:
                x = torch.stack([h[kind_i] for h in hs])
                ctx = TensorContext(layer=i, kind=kind, positions=lists[0], layout=layout)
                payload = pipeline.encode_tensor(x.cpu(), ctx, dtype_name)
            else:
                payload = encode_per_head(pipeline, [h[kind_i] for h in hs], lists, i, kind, layout, dtype_name)
            sections[section_name(i, kind)] = payload
    return write(pipeline, layout, sections)


# -- decode ----------------------------------------------------------------------------------------

def decode_pruned(reader, indices, device=None, dtype=None, progress: bool = False):
    """The pruned cache of layers ``indices`` from an open container (:class:`seqkv.format.ContainerReader`)."""
    per_layer, kept = [], []
    for i in progress_bar(list(indices), desc="decode (pruned)", enabled=progress):
        tensors, lists = reader.pruned_layer(i)   # in layer order where sections chain across layers
        if dtype is not None:
            tensors = [(k.to(dtype), v.to(dtype)) for k, v in tensors]
        per_layer.append(tensors)
        kept.append(lists)
    h = reader.header
    width = max(len(p) for layer in kept for p in layer)
    state = PruneState(kept=kept, next_position=h.positions.next, source_tokens=h.pruning.source_tokens,
                       width=width, level=h.pruning.level, pruner=h.pruning.pruner)
    return build_pruned_cache(per_layer, state, device=device)
