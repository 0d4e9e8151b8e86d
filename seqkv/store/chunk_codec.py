"""The payload of a store entry: one chunk's KV, each section coded plainly or as a residual.

The payload is a seqkv container (preamble, JSON header, crc32c-checked sections; docs/format.md §1-3)
whose header says ``"seqkv_store_chunk": 1`` and carries its pipeline under ``"chunk_pipeline"`` (not
``"pipeline"``): :func:`seqkv.decode` refuses it, because a residual section means nothing without its
base.  Header fields: ``chunk_pipeline``, ``model`` (the layout), ``dtype``, ``layers``, ``kv_heads``,
``head_dim``, ``tokens``, ``positions`` ({"start", "contiguous"}; a ``positions`` section of int64
when not contiguous), ``modes`` (one character per section ``layer.{i}.{keys,values}`` in that order:
``p`` plain, ``r`` residual), ``base`` (null, or the key of the base entry: an entry with the same
tokens at other positions / under another prefix), ``token_code`` (how the ``tokens`` section codes
the chunk's token ids: ``"trie"``, ``"zstd"``, or ``"base"`` when there is no such section because the
tokens are the base's) and, for the calibrated pipeline only, ``calibrated``: {"profile": {"sha256",
"bytes"}, "scale"} (the profile the chunk was coded with, and the quantizer's fixed knob).

A plain section is exactly the codec's section for that tensor (docs/format.md §6, §8).  A residual
section codes the tensor's difference from the decoded base tensor:

* lossy pipelines (``prerope`` then the ``uniform`` quantizer): keys are taken to pre-RoPE at their own
  positions and the base's keys at the base's positions, ``r = x - base``; the quantizer steps are
  ``channel_steps`` of the pre-RoPE base tensor (so no side info is stored), ``q = round(r / step)``
  coded by the pipeline's symbol coder.  Decoding: ``base + q * step``, RoPE re-applied at the chunk's
  positions.  The error bound is the plain section's (half a step).
* the calibrated pipeline (``prerope``, ``klt``, ``klt_uniform``; a model profile and a fixed ``scale``):
  the residual lives in the KLT domain.  ``z_x`` are the KLT coefficients of the chunk (keys pre-RoPE at
  its positions), ``z_b`` those of the decoded base (pre-RoPE at the base's positions);
  ``q = round((z_x - z_b) / step)`` with exactly the per-component steps ``scale / sqrt(sensitivity *
  weight_c)`` the plain section uses, so each coefficient's error is bounded by half a step either way.
  The section is laid out like a lossy section without quantizer side info (exact sink tokens, the
  temporal predictor's side info, the coder's bytes).  Decoding: ``z_b + q * step``, inverse KLT, RoPE at
  the chunk's positions.  Residual sections do not use cross-layer prediction themselves, but their
  reconstruction is what the next layer's plain section predicts from, as in the decoder.  Where the
  base's coefficients lie on the step lattice (a base section without cross-layer prediction, decoded
  to float32) the residual reconstructs exactly what the plain section would: only its symbols (the
  differences of the two chunks' symbols) are cheaper.
* lossless: the XOR of the IEEE bit patterns of tensor and base, coded by the pipeline's lossless
  coder; decoding XORs back, bit-exact.

The encoder codes every section both ways and keeps the smaller, so a residual entry is never larger
than a plain one (apart from the header's base key).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, SeqKVError
from ..format import ChunkInfo, ContainerReader, Header, Pipeline, PositionsInfo, ProfileRef, open_container, write_container
from ..format.chunk_run import ChunkSections, assemble, decode_sections
from ..format.pipeline import KINDS, section_name
from ..format.residual import encode_klt_residual, encode_residual, is_calibrated, residual_capable
from ..layout import ModelLayout
from ..profile import Profile
from ..stages.base import CodingState, TensorContext
from ..stages.quantize_klt import remember_reconstruction

CHUNK_FORMAT = 1


def coding_state_for(pipeline: Pipeline, profile, scale) -> CodingState:
    """The coding state a chunk is coded with (the calibrated pipeline: profile, scale, the cross-layer chain)."""
    if not is_calibrated(pipeline):
        if pipeline.needs_profile:
            raise ConfigError("the store codes profile pipelines only as the calibrated pipeline (prerope, klt, klt_uniform)")
        return CodingState()
    if not isinstance(profile, Profile):
        raise ConfigError("the calibrated pipeline needs profile= (a seqkv.Profile)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"the calibrated pipeline needs a fixed positive scale, got {scale!r}")
    return CodingState(profile=profile, scale=float(np.float32(scale)), chain={})


def encode_chunk(layers, positions: torch.Tensor, pipeline_config: dict, layout: ModelLayout, dtype_name: str, *,
                 token_section: bytes | None, token_code: str, base=None, profile=None, scale=None):
    """(payload bytes, info).  ``layers``: [(K, V)] of [H, T, D] tensors (batch dim removed);
    ``base``: None or (base key, base layers, base positions) of a chunk with the same tokens;
    ``profile`` and ``scale``: the calibrated pipeline's model profile and fixed quantizer knob.
    ``info``: residual_sections, plain_section_bytes (what plain coding of every section costs).  A chunk coded
    against a base whose token ids are the base's (``token_code="base"``) but with no section smaller as a
    residual has no valid container (no base, no tokens): the payload is then None, and the caller codes the
    chunk plainly with its own token ids."""
    pipeline = Pipeline(pipeline_config)
    state = coding_state_for(pipeline, profile, scale)
    calibrated = is_calibrated(pipeline)
    heads, tokens, dim = layers[0][0].shape
    use_base = base is not None and residual_capable(pipeline)
    if use_base:
        _, base_layers, base_pos = base
        if len(base_layers) != len(layers) or base_layers[0][0].shape != layers[0][0].shape:
            raise ConfigError("the base chunk's shape differs from this chunk's")
    sections, modes = {}, []
    plain_total = 0
    for i, (k, v) in enumerate(layers):
        for j, (kind, x) in enumerate(zip(KINDS, (k, v))):
            ctx = TensorContext(layer=i, kind=kind, positions=positions, layout=layout, state=state)
            plain = pipeline.encode_tensor(x, ctx, dtype_name)  # the calibrated quantizer chains its reconstruction
            plain_total += len(plain)
            best, mode = plain, "p"
            if use_base:
                recon = None
                try:
                    if calibrated:
                        res, recon = encode_klt_residual(pipeline, x, base_layers[i][j], ctx, base_pos)
                    else:
                        res = encode_residual(pipeline, x, base_layers[i][j], ctx, base_pos, dtype_name)
                except (ValueError, SeqKVError):
                    res = None
                if res is not None and len(res) < len(plain):
                    best, mode = res, "r"
                    if recon is not None:  # the next layer predicts from what the decoder will hold
                        remember_reconstruction(ctx, recon)
            sections[section_name(i, kind)] = best
            modes.append(mode)
    residual = modes.count("r")
    if residual == 0 and token_code == "base":
        return None, {"residual_sections": 0, "plain_section_bytes": plain_total,
                      "section_bytes": sum(len(b) for b in sections.values())}
    contiguous = bool(tokens == 0 or torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + tokens)))
    section_bytes = sum(len(b) for b in sections.values())
    if token_section is not None:
        sections["tokens"] = token_section
    if not contiguous:
        sections["positions"] = positions.numpy().astype("<i8").tobytes()
    ref = None if not calibrated else ProfileRef(**profile.ref())
    header = Header(pipeline=pipeline.full_config(), layout=layout, dtype=dtype_name, layers=len(layers),
                    kv_heads=heads, head_dim=dim, tokens=tokens, positions=PositionsInfo(int(positions[0]), None, contiguous),
                    profile=ref, chunk=ChunkInfo(modes="".join(modes), base=base[0] if (use_base and residual) else None,
                                                 token_code=token_code, scale=state.scale if calibrated else None))
    payload = write_container(header, pipeline, sections)
    return payload, {"residual_sections": residual, "plain_section_bytes": plain_total, "section_bytes": section_bytes}


class ParsedChunk:
    """A validated chunk payload; ``decode(base)`` gives its layers."""

    def __init__(self, payload):
        self.reader: ContainerReader = open_container(payload, dialect="store_chunk")
        h = self.reader.header
        self.dtype, self.layers, self.heads, self.dim, self.tokens = h.dtype, h.layers, h.kv_heads, h.head_dim, h.tokens
        self.layout = h.layout
        self.modes, self.base, self.token_code = h.chunk.modes, h.chunk.base, h.chunk.token_code
        self.pipeline = self.reader.pipeline
        self.positions = self.reader.positions
        # {"profile": {"sha256", "bytes"}, "scale"} for the calibrated pipeline, else None
        self.calibrated = None if h.profile is None else {"profile": h.profile.to_json(), "scale": h.chunk.scale}

    def token_section(self):
        return self.reader.token_section()

    def sections(self, base=None, profile=None) -> ChunkSections:
        """The chunk decoded up to its inverse transforms (:mod:`seqkv.format.chunk_run`): what
        :func:`~seqkv.format.chunk_run.assemble` joins with the next chunks' into one cache.  ``base``:
        (layers, positions) of the base chunk when it has one; ``profile``: the profile a calibrated chunk
        was coded with (ProfileMismatchError otherwise)."""
        if profile is not None or self.reader.header.profile is not None:
            self.reader.use_profile(profile)
        return decode_sections(self.reader, base)

    def decode(self, base=None, profile=None):
        """[(K, V)] of [H, T, D] (arguments as :meth:`sections`)."""
        return assemble([self.sections(base, profile)])
