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

from ..codec import _BITS_DTYPE, KINDS, _Pipeline, section_name
from ..container import Container, write_container
from ..errors import ConfigError, FormatError, SeqKVError
from ..hf_adapter import DTYPES_BY_NAME
from ..layout import ModelLayout
from ..profile import Profile, ProfileMismatchError
from ..stages.base import TensorContext
from ..stages.klt import profile_part
from ..stages.quantize_klt import component_steps, remember_reconstruction
from ..stages.quantize_uniform import quantize_symbols
from ..stages.rope import keys_to_post_rope, keys_to_pre_rope
from ..wire import Reader

CHUNK_FORMAT = 1
MAX_CHUNK_TOKENS = 1 << 20


def calibrated(pipeline: _Pipeline) -> bool:
    """The calibrated pipeline (pre-RoPE, the profile's KLT, profile-stepped quantizer)."""
    return (not pipeline.lossless and pipeline.quantizer.id == "klt_uniform"
            and [t.id for t in pipeline.transforms] == ["prerope", "klt"])


def residual_capable(pipeline: _Pipeline) -> bool:
    if pipeline.lossless or calibrated(pipeline):
        return True
    return (pipeline.quantizer.id == "uniform" and [t.id for t in pipeline.transforms] == ["prerope"])


class _KLTResidual:
    """Residual sections of the calibrated pipeline: KLT coefficients minus the decoded base's,
    quantized with the plain section's steps (see the module docstring)."""

    def __init__(self, pipeline: _Pipeline, extra: dict):
        self.pipeline, self.extra = pipeline, extra

    def _parts(self, b, ctx: TensorContext, bpos, tokens: int):
        """(sink count, the base's KLT coefficients after the sinks, the steps)."""
        sinks = min(self.pipeline.sink_tokens, tokens)
        base_ctx = TensorContext(layer=ctx.layer, kind=ctx.kind, positions=bpos, layout=ctx.layout, extra=self.extra)
        z_b = self.pipeline.transform(b, base_ctx)[:, sinks:]
        steps = component_steps(profile_part(ctx), float(np.float32(self.extra["scale"])), b.shape[0], b.shape[2])
        return sinks, z_b, steps

    def encode(self, x, b, ctx: TensorContext, bpos) -> tuple:
        """(section bytes, the reconstruction of the KLT coefficients after the sinks)."""
        sinks, z_b, steps = self._parts(b, ctx, bpos, x.shape[1])
        q = quantize_symbols(self.pipeline.transform(x, ctx)[:, sinks:] - z_b, steps, self.pipeline.quantizer.rounding)
        if not torch.isfinite(q).all() or (q.numel() and q.abs().max() > 2**30):
            raise ValueError("residual out of range")
        return self.pipeline.pack(x[:, :sinks], b"", q.to(torch.int32).numpy(), ctx), z_b + q * steps[:, None, :]

    def decode(self, payload, b, ctx: TensorContext, bpos, dtype_name: str, shape):
        sinks, z_b, steps = self._parts(b, ctx, bpos, shape[1])
        parts = self.pipeline.read_symbols(payload, ctx, dtype_name, shape, quantizer_side=False)
        recon = z_b + torch.from_numpy(np.ascontiguousarray(parts.symbols)).to(torch.float32) * steps[:, None, :]
        remember_reconstruction(ctx, recon)
        return self.pipeline.restore(recon, parts.sinks, ctx, dtype_name)


def _bits(x: torch.Tensor, dtype_name: str) -> np.ndarray:
    torch_int, np_uint = _BITS_DTYPE[dtype_name]
    return x.contiguous().view(torch_int).numpy().view(np_uint)


def _encode_residual(pipeline: _Pipeline, x, b, kind, pos, bpos, layout, dtype_name) -> bytes:
    if pipeline.lossless:
        return pipeline.coder.encode(np.bitwise_xor(_bits(x, dtype_name), _bits(b, dtype_name)), dtype_name)
    xp = keys_to_pre_rope(x, kind, pos, layout)
    bp = keys_to_pre_rope(b, kind, bpos, layout)
    q_stage = pipeline.quantizer
    steps = q_stage.channel_steps(bp, kind).to(torch.float32)
    q = quantize_symbols(xp - bp, steps, q_stage.rounding)
    if not torch.isfinite(q).all() or (q.numel() and q.abs().max() > 2**30):
        raise ValueError("residual out of range")
    return pipeline.coder.encode(q.to(torch.int32).numpy())


def _decode_residual(pipeline: _Pipeline, payload, b, kind, pos, bpos, layout, dtype_name, shape, what):
    if pipeline.lossless:
        torch_int, _ = _BITS_DTYPE[dtype_name]
        bits = np.bitwise_xor(pipeline.coder.decode(payload, dtype_name, shape), _bits(b, dtype_name))
        return torch.from_numpy(np.ascontiguousarray(bits)).view(torch_int).view(DTYPES_BY_NAME[dtype_name])
    reader = Reader(payload, what=what)
    q = pipeline.coder.decode(reader, shape)
    reader.expect_end()
    bp = keys_to_pre_rope(b, kind, bpos, layout)
    steps = pipeline.quantizer.channel_steps(bp, kind).to(torch.float32)
    y = bp + torch.from_numpy(np.ascontiguousarray(q)).to(torch.float32) * steps[:, None, :]
    return keys_to_post_rope(y, kind, pos, layout).to(DTYPES_BY_NAME[dtype_name])


def _calibrated_extra(pipeline: _Pipeline, profile, scale) -> dict:
    """The stage context a calibrated chunk is coded with (profile, scale, the cross-layer chain)."""
    if not calibrated(pipeline):
        if pipeline.needs_profile:
            raise ConfigError("the store codes profile pipelines only as the calibrated pipeline (prerope, klt, klt_uniform)")
        return {}
    if not isinstance(profile, Profile):
        raise ConfigError("the calibrated pipeline needs profile= (a seqkv.Profile)")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale) or scale <= 0:
        raise ConfigError(f"the calibrated pipeline needs a fixed positive scale, got {scale!r}")
    return {"profile": profile, "scale": float(np.float32(scale)), "chain": {}}


def encode_chunk(layers, positions: torch.Tensor, pipeline_config: dict, layout: ModelLayout, dtype_name: str, *,
                 token_section: bytes | None, token_code: str, base=None, profile=None, scale=None):
    """(payload bytes, info).  ``layers``: [(K, V)] of [H, T, D] tensors (batch dim removed);
    ``base``: None or (base key, base layers, base positions) of a chunk with the same tokens;
    ``profile`` and ``scale``: the calibrated pipeline's model profile and fixed quantizer knob.
    ``info``: residual_sections, plain_section_bytes (what plain coding of every section costs)."""
    pipeline = _Pipeline(pipeline_config)
    extra = _calibrated_extra(pipeline, profile, scale)
    klt_residual = _KLTResidual(pipeline, extra) if extra else None
    heads, tokens, dim = layers[0][0].shape
    use_base = base is not None and residual_capable(pipeline)
    if use_base:
        _, base_layers, base_pos = base
        if len(base_layers) != len(layers) or base_layers[0][0].shape != layers[0][0].shape:
            raise ConfigError("the base chunk's shape differs from this chunk's")
    sections, modes = [], []
    plain_total = 0
    for i, (k, v) in enumerate(layers):
        for j, (kind, x) in enumerate(zip(KINDS, (k, v))):
            ctx = TensorContext(layer=i, kind=kind, positions=positions, layout=layout, extra=extra)
            plain = pipeline.encode_tensor(x, ctx, dtype_name)  # the calibrated quantizer chains its reconstruction
            plain_total += len(plain)
            best, mode = plain, "p"
            if use_base:
                recon = None
                try:
                    if klt_residual is not None:
                        res, recon = klt_residual.encode(x, base_layers[i][j], ctx, base_pos)
                    else:
                        res = _encode_residual(pipeline, x, base_layers[i][j], kind, positions, base_pos, layout, dtype_name)
                except (ValueError, SeqKVError):
                    res = None
                if res is not None and len(res) < len(plain):
                    best, mode = res, "r"
                    if recon is not None:  # the next layer predicts from what the decoder will hold
                        remember_reconstruction(ctx, recon)
            sections.append((section_name(i, kind), best))
            modes.append(mode)
    residual = modes.count("r")
    contiguous = bool(tokens == 0 or torch.equal(positions, torch.arange(int(positions[0]), int(positions[0]) + tokens)))
    extra_sections = []
    if token_section is not None:
        extra_sections.append(("tokens", token_section))
    if not contiguous:
        extra_sections.append(("positions", positions.numpy().astype("<i8").tobytes()))
    header = {
        "seqkv_store_chunk": CHUNK_FORMAT,
        "chunk_pipeline": pipeline.full_config(),
        "model": layout.to_json(),
        "dtype": dtype_name,
        "layers": len(layers), "kv_heads": heads, "head_dim": dim, "tokens": tokens,
        "positions": {"start": int(positions[0]), "contiguous": contiguous},
        "modes": "".join(modes),
        "base": base[0] if (use_base and residual) else None,
        "token_code": token_code,
    }
    if klt_residual is not None:
        header["calibrated"] = {"profile": profile.ref(), "scale": extra["scale"]}
    payload = write_container(header, extra_sections + sections, min_minor=1 if pipeline.needs_profile else 0)
    return payload, {"residual_sections": residual, "plain_section_bytes": plain_total,
                     "section_bytes": sum(len(b) for _, b in sections)}


class ParsedChunk:
    """A validated chunk payload; ``decode(base)`` gives its layers."""

    def __init__(self, payload):
        c = self.container = Container(payload)
        h = c.header
        try:
            if h.get("seqkv_store_chunk") != CHUNK_FORMAT:
                raise ValueError("not a store chunk of a known version")
            self.dtype = str(h["dtype"])
            self.layers, self.heads, self.dim, self.tokens = (int(h[k]) for k in ("layers", "kv_heads", "head_dim", "tokens"))
            for name in ("layers", "kv_heads", "head_dim", "tokens"):
                if not isinstance(h[name], int) or isinstance(h[name], bool):
                    raise ValueError(f"{name} is not an integer")
            self.layout = ModelLayout.from_json(h["model"])
            self.modes = h["modes"]
            self.base = h["base"]
            self.token_code = h["token_code"]
            start, contiguous = h["positions"]["start"], h["positions"]["contiguous"]
            self.pipeline = _Pipeline(h["chunk_pipeline"])
            self.calibrated = h.get("calibrated")
            if (self.calibrated is not None) != calibrated(self.pipeline) or self.pipeline.needs_profile != calibrated(self.pipeline):
                raise ValueError("the calibrated field does not match the pipeline")
            if self.calibrated is not None:
                ref, scale = self.calibrated["profile"], self.calibrated["scale"]
                if not (isinstance(ref, dict) and isinstance(ref.get("sha256"), str) and isinstance(ref.get("bytes"), int)):
                    raise ValueError(f"invalid profile reference {ref!r}")
                if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1e-6 <= scale <= 1e6:
                    raise ValueError(f"invalid scale {scale!r}")
        except (KeyError, TypeError, ValueError, AttributeError, SeqKVError) as exc:
            raise FormatError(f"store chunk header is invalid: {exc}") from None
        if self.dtype not in DTYPES_BY_NAME or not (1 <= self.tokens <= MAX_CHUNK_TOKENS) or not (1 <= self.layers <= 4096) \
                or not (1 <= self.heads <= 4096) or not (1 <= self.dim <= 16384):
            raise FormatError("store chunk header has out-of-range fields")
        if (self.layout.layers, self.layout.kv_heads, self.layout.head_dim) != (self.layers, self.heads, self.dim):
            raise FormatError("store chunk layout disagrees with its shapes")
        if not isinstance(self.modes, str) or len(self.modes) != 2 * self.layers or set(self.modes) - {"p", "r"}:
            raise FormatError("store chunk section modes are invalid")
        if ("r" in self.modes) != (self.base is not None) or (self.base is not None and not isinstance(self.base, str)):
            raise FormatError("store chunk base and section modes disagree")
        if self.token_code not in ("trie", "zstd", "base") or (self.token_code == "base") != (self.base is not None):
            raise FormatError("store chunk token coding is invalid")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0 or not isinstance(contiguous, bool):
            raise FormatError("store chunk positions are invalid")
        if contiguous:
            self.positions = torch.arange(start, start + self.tokens, dtype=torch.int64)
        else:
            raw = c.section("positions")
            if len(raw) != 8 * self.tokens:
                raise FormatError("store chunk positions section has the wrong length")
            self.positions = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
            if int(self.positions[0]) != start or bool((self.positions[1:] <= self.positions[:-1]).any()):
                raise FormatError("store chunk positions are inconsistent")

    def token_section(self):
        return None if self.token_code == "base" else bytes(self.container.section("tokens"))

    def decode(self, base=None, profile=None):
        """[(K, V)] of [H, T, D]; ``base``: (layers, positions) of the base chunk when it has one;
        ``profile``: the profile a calibrated chunk was coded with (ProfileMismatchError otherwise)."""
        extra, klt_residual = {}, None
        if self.calibrated is not None:
            if profile is None:
                raise ProfileMismatchError(
                    f"this store chunk was coded with a calibrated profile (sha256 {self.calibrated['profile']['sha256'][:16]}…):"
                    " open the store with profile=seqkv.Profile.load(path)")
            if not isinstance(profile, Profile):
                raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
            profile.check_ref(self.calibrated["profile"])
            extra = _calibrated_extra(self.pipeline, profile, self.calibrated["scale"])
            klt_residual = _KLTResidual(self.pipeline, extra)
        if self.base is not None:
            if base is None:
                raise FormatError("this chunk is a residual and needs its base")
            base_layers, base_pos = base
            if len(base_layers) != self.layers or tuple(base_layers[0][0].shape) != (self.heads, self.tokens, self.dim) \
                    or base_layers[0][0].dtype != DTYPES_BY_NAME[self.dtype]:
                raise FormatError("the base chunk does not match this chunk's shape or dtype")
        shape = (self.heads, self.tokens, self.dim)
        out = []
        for i in range(self.layers):
            pair = []
            for j, kind in enumerate(KINDS):
                name = section_name(i, kind)
                payload = self.container.section(name)
                try:
                    ctx = TensorContext(layer=i, kind=kind, positions=self.positions, layout=self.layout, extra=extra)
                    if self.modes[2 * i + j] == "p":
                        pair.append(self.pipeline.decode_tensor(payload, ctx, self.dtype, shape))
                    elif klt_residual is not None:
                        pair.append(klt_residual.decode(payload, base_layers[i][j], ctx, base_pos, self.dtype, shape))
                    else:
                        pair.append(_decode_residual(self.pipeline, payload, base_layers[i][j], kind, self.positions,
                                                     base_pos, self.layout, self.dtype, shape, name))
                except SeqKVError:
                    raise
                except (ValueError, TypeError, IndexError, RuntimeError, OverflowError, MemoryError) as exc:
                    raise FormatError(f"{name}: cannot decode: {exc}") from None
            out.append(tuple(pair))
        return out
