"""encode / decode / inspect: caches to container bytes and back."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from . import __version__
from .container import FLAG_PRUNED, Container, write_container
from .errors import ConfigError, FormatError, ModelMismatchError, SeqKVError
from .hf_adapter import DTYPES_BY_NAME, SUPPORTED_DTYPES, build_cache, cache_layers
from .layout import ModelLayout, layout_from_model
from .presets import CALIBRATED_PRESET, calibrated_pipeline_config, pipeline_config
from .profile import Profile, ProfileMismatchError
from .rate_control import DEFAULT_KL_MARGIN, DEFAULT_TARGET_KL, parse_target, scale_for_kl, scale_for_size
from .progress import progress_bar
from .positions import positions_of
from .stages import stage_from_config
from .stages.base import TensorContext
from .format.pipeline import BITS_DTYPE, KINDS, MAX_TOKENS, Pipeline, le_bytes, section_name

MAX_LAYERS = 4096
MAX_HEADS = 4096
MAX_HEAD_DIM = 16384
DEFAULT_MAX_DECODED_BYTES = 16 << 30


# -- public API ---------------------------------------------------------------------------

def _layout_for(model, config, layers, lossless: bool) -> ModelLayout:
    if model is not None or config is not None:
        layout = layout_from_model(model if model is not None else config)
    elif lossless:
        heads, _, dim = layers[0][0].shape
        layout = ModelLayout(layers=len(layers), kv_heads=heads, head_dim=dim, rope_type="unknown")
    else:
        raise ConfigError(
            "lossy presets move keys to pre-RoPE and need the model's RoPE parameters: "
            "pass model= (or config=) to encode, or use preset='lossless'"
        )
    heads, _, dim = layers[0][0].shape
    if (layout.layers, layout.kv_heads, layout.head_dim) != (len(layers), heads, dim):
        raise ModelMismatchError(
            f"the cache has {len(layers)} layers x {heads} KV heads x head_dim {dim}, but the model has "
            f"{layout.layers} x {layout.kv_heads} x {layout.head_dim}: it comes from a different model"
        )
    return layout


def encode(cache, *, preset: str | None = None, model=None, config=None, positions=None,
           prune=None, progress: bool = False, profile=None, target_kl: float | None = None,
           bits_per_element: float | None = None, max_bytes: int | None = None,
           kl_margin: float = DEFAULT_KL_MARGIN, **options) -> bytes:
    """Encode a transformers ``DynamicCache`` into a self-describing seqkv container.

    Without a profile, ``preset`` is one of "lossless", "near_lossless", "balanced"
    (the default), "small"; ``options`` override it: ``step`` (the quality knob),
    ``sink_tokens``, ``rotation`` ("none"/"hadamard"), ``quantizer``
    ("uniform"/"lloydmax"), ``bits`` (Lloyd-Max), ``rounding``, ``key_channel_gamma``, ``seed``.

    With ``profile=`` (a calibrated :class:`seqkv.Profile`) the codec is the
    calibrated one (per-layer KLT, profile steps, temporal prediction) and rate
    control meets one target: ``target_kl`` (predicted mean KL, the default, 0.01),
    ``bits_per_element`` or ``max_bytes``; ``scale=`` sets the knob directly.
    ``options`` then are ``rounding``, ``predict`` and ``cross_layer`` (bools, the two predictors) and ``scale``.
    Lossless never uses a profile.

    ``model``/``config`` give the layout, RoPE parameters and fingerprint (required
    for lossy presets unless a profile gives them).  ``positions`` is the start
    position (int) or the position of every cached token (default 0, 1, 2, ...).
    ``prune`` (a ``seqkv.pruner(...)``) drops tokens first; caches pruned before are encoded with
    their kept positions either way (docs/format.md §9).  With a profile, every KV head of a layer
    must keep the same positions (``level="layer"`` or ``"chunk"``: the profile's KLT mixes the heads),
    and ``target_kl`` is the predicted KL of the quantization alone, the pruning's own KL comes on top.

    """
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"preset must be a string, got {type(preset).__name__}")
    targets_given = any(v is not None for v in (target_kl, bits_per_element, max_bytes)) or "scale" in options
    calibrated = profile is not None and preset in (None, CALIBRATED_PRESET)
    if targets_given and not calibrated:
        raise ConfigError("target_kl / bits_per_element / max_bytes / scale need a calibrated profile= "
                          "(seqkv.calibrate(...) or seqkv.Profile.load(path)) and no preset")
    if profile is not None and not calibrated and preset != "lossless":
        raise ConfigError(f"preset {preset!r} does not use a profile; leave preset out to use the profile")
    if prune is not None or getattr(cache, "seqkv_pruned", None) is not None:
        from .pruning.container import encode_pruned

        if calibrated:
            return encode_pruned(cache, prune, preset=CALIBRATED_PRESET, model=model, config=config,
                                 positions=positions, progress=progress, profile=profile, kl_margin=kl_margin,
                                 target=parse_target(target_kl, bits_per_element, max_bytes, options.pop("scale", None)),
                                 **options)
        return encode_pruned(cache, prune, preset=preset or "balanced", model=model, config=config,
                             positions=positions, progress=progress, **options)
    if calibrated:
        return _encode_calibrated(cache, profile, model=model, config=config, positions=positions, progress=progress,
                                  target=parse_target(target_kl, bits_per_element, max_bytes, options.pop("scale", None)),
                                  kl_margin=kl_margin, **options)
    preset = preset or "balanced"
    config_dict = pipeline_config(preset, **options)
    pipeline = Pipeline(config_dict)
    layers = cache_layers(cache)
    layout = _layout_for(model, config, layers, pipeline.lossless)
    dtype_name = SUPPORTED_DTYPES[layers[0][0].dtype]
    pos = positions_of(positions, layers[0][0].shape[1])
    sections = []
    for i, (keys, values) in progress_bar(list(enumerate(layers)), desc=f"encode {preset}", enabled=progress):
        for kind, x in zip(KINDS, (keys, values)):
            ctx = TensorContext(layer=i, kind=kind, positions=pos, layout=layout)
            sections.append((section_name(i, kind), pipeline.encode_tensor(x.cpu(), ctx, dtype_name)))
    return _write(sections, pipeline, layout, layers, dtype_name, pos)


def _write(sections, pipeline, layout, layers, dtype_name, pos, extra_header=None) -> bytes:
    heads, tokens, dim = layers[0][0].shape
    contiguous = bool(tokens == 0 or torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + tokens)))
    if not contiguous:
        sections.append(("positions", le_bytes(pos.numpy())))
    header = _header(pipeline, layout, dtype_name, len(layers), heads, dim, tokens,
                     {"start": int(pos[0]), "next": int(pos[-1]) + 1, "contiguous": contiguous})
    header.update(extra_header or {})
    # 1.1 defines the calibrated stages: a 1.0 reader must refuse such a container by its version
    return write_container(header, sections, min_minor=1 if pipeline.needs_profile else 0)


def _header(pipeline, layout, dtype_name, layers, heads, dim, tokens, positions) -> dict:
    return {
        "created_by": f"seqkv {__version__}",
        "pipeline": pipeline.full_config(),
        "model": layout.to_json(),
        "dtype": dtype_name,
        "batch": 1,
        "layers": layers,
        "kv_heads": heads,
        "head_dim": dim,
        "tokens": tokens,
        "positions": positions,
    }


def _encode_calibrated(cache, profile, *, model, config, positions, progress, target, kl_margin, **options) -> bytes:
    """The calibrated codec: pre-RoPE, the profile's KLT, profile steps scaled by rate control."""
    layers = cache_layers(cache)
    pipeline, layout = calibrated_setup(profile, model, config, layers, kl_margin, options)
    dtype_name = SUPPORTED_DTYPES[layers[0][0].dtype]
    pos = positions_of(positions, layers[0][0].shape[1])

    def write(sections, extra_header):
        return _write(sections, pipeline, layout, layers, dtype_name, pos, extra_header)

    return calibrated_search(pipeline, profile, layout, layers, [pos] * len(layers), target, kl_margin, write,
                             elements=len(layers) * 2 * layers[0][0].numel(), progress=progress)


def calibrated_setup(profile, model, config, layers, kl_margin, options):
    """The calibrated pipeline and the layout for ``layers``, with the profile checked against the model."""
    if not isinstance(profile, Profile):
        raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
    if not (isinstance(kl_margin, (int, float)) and 0.01 <= kl_margin <= 100):
        raise ConfigError(f"kl_margin must be in [0.01, 100], got {kl_margin!r}")
    pipeline = Pipeline(calibrated_pipeline_config(profile.sink_tokens, **options))
    if model is not None or config is not None:
        layout = _layout_for(model, config, layers, False)
        profile.check_model(layout)
    else:
        layout = _layout_for(profile.layout, None, layers, False)
    return pipeline, layout


def calibrated_search(pipeline, profile, layout, layers, layer_positions, target, kl_margin, write, *, elements,
                      progress=False) -> bytes:
    """Transform every layer once, then pick the scale that meets ``target`` and return
    ``write(sections, extra_header)``.  ``layer_positions[i]``: the positions of layer ``i``'s tokens
    (all the same unless the cache was pruned layer by layer); ``elements``: what bits per element count."""
    sinks = pipeline.sink_tokens
    extra = {"profile": profile}
    transformed = {}
    for i, (keys, values) in progress_bar(list(enumerate(layers)), desc="encode: transform", enabled=progress):
        for kind, x in zip(KINDS, (keys, values)):
            x = x.cpu()
            ctx = TensorContext(layer=i, kind=kind, positions=layer_positions[i], layout=layout, extra=extra)
            transformed[(i, kind)] = (x, pipeline.transform(x, ctx))
    bodies = {key: y[:, sinks:] for key, (_x, y) in transformed.items()}
    shared = all(torch.equal(p, layer_positions[0]) for p in layer_positions[1:])
    body_positions = None if shared else {(i, kind): layer_positions[i][min(sinks, len(layer_positions[i])):]
                                          for (i, kind) in transformed}
    rounding = pipeline.quantizer.rounding

    def encode_at(scale: float) -> list:
        extra["scale"] = scale
        extra["chain"] = {}  # cross-layer prediction: the previous layer's reconstruction per kind
        out = []
        for (i, kind), (x, y) in transformed.items():
            ctx = TensorContext(layer=i, kind=kind, positions=layer_positions[i], layout=layout, extra=extra)
            out.append((section_name(i, kind), pipeline.code(x, y, ctx)))
        return out

    def container_at(scale: float) -> bytes:
        extra["weighted_mse"] = {}
        sections = encode_at(scale)
        rate_control = {"target": target.to_json(), "scale": float(np.float32(scale)), "kl_margin": kl_margin,
                        "predicted_kl": profile.predicted_kl(extra["weighted_mse"])}
        return write(sections, {"profile": profile.ref(), "rate_control": rate_control})

    if target.kind == "scale":
        return container_at(target.value)
    kl_scale = scale_for_kl(profile, bodies, target.value if target.kind == "kl" else DEFAULT_TARGET_KL,
                            rounding, kl_margin, cross_layer=pipeline.cross_layer, positions=body_positions)
    if target.kind == "kl":
        return container_at(kl_scale)
    goal = target.value if target.kind == "max_bytes" else target.value * elements / 8
    _scale, blob = scale_for_size(container_at, goal, kl_scale, exact_cap=target.kind == "max_bytes")
    return blob


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_int(obj: dict, key: str) -> int:
    """A header integer: a JSON int, not a float, bool or string."""
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key!r} must be an integer, got {value!r}")
    return value


class _Parsed:
    """A container whose header has been validated against the v1 schema."""

    def __init__(self, data, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise FormatError(f"expected bytes, got {type(data).__name__}")
        self.container = c = Container(data)
        h = c.header
        try:
            self.dtype = str(h["dtype"])
            self.layers, self.heads, self.dim, self.tokens = (_json_int(h, k) for k in ("layers", "kv_heads", "head_dim", "tokens"))
            self.layout = ModelLayout.from_json(h["model"])
            pos = h["positions"]
            self.start, self.next_position = _json_int(pos, "start"), _json_int(pos, "next")
            self.contiguous = pos["contiguous"]
            if not isinstance(self.contiguous, bool):
                raise TypeError("positions.contiguous must be a boolean")
            self.pipeline_config = h["pipeline"]
            if _json_int(h, "batch") != 1:
                raise FormatError("only batch-1 containers exist in format v1")
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError, ConfigError) as exc:
            raise FormatError(f"header is missing or has invalid fields: {exc}") from None
        if self.dtype not in DTYPES_BY_NAME:
            raise FormatError(f"unknown dtype {self.dtype!r}")
        for name, value, cap in [("layers", self.layers, MAX_LAYERS), ("kv_heads", self.heads, MAX_HEADS),
                                 ("head_dim", self.dim, MAX_HEAD_DIM), ("tokens", self.tokens, MAX_TOKENS)]:
            if not 1 <= value <= cap:
                raise FormatError(f"{name}={value} is outside [1, {cap}]")
        if (self.layout.layers, self.layout.kv_heads, self.layout.head_dim) != (self.layers, self.heads, self.dim):
            raise FormatError("the header's model layout disagrees with its tensor shapes")
        if self.layout.rope_inv_freq and len(self.layout.rope_inv_freq) != self.dim // 2:
            raise FormatError("the RoPE table does not match head_dim")
        decoded = self.layers * 2 * self.heads * self.tokens * self.dim * 4
        if decoded > max_decoded_bytes:
            raise FormatError(f"decoding would need {decoded} bytes, over the max_decoded_bytes={max_decoded_bytes} cap")
        try:
            self.pipeline = Pipeline(self.pipeline_config)
        except ConfigError as exc:
            raise FormatError(f"the container's pipeline is invalid or unknown to this version: {exc}") from None
        # the preamble's minor is not under a checksum: it must be the one the contents need
        pruned = bool(c.flags & FLAG_PRUNED)
        needed = 2 if (pruned and self.pipeline.needs_profile) else 1 if (pruned or self.pipeline.needs_profile) else 0
        if c.version[1] != needed:
            raise FormatError(f"the preamble says format 1.{c.version[1]} but the contents are format 1.{needed}")
        self.profile_ref = h.get("profile")
        self.rate_control = h.get("rate_control")
        if self.pipeline.needs_profile != (self.profile_ref is not None):
            raise FormatError("the header's profile reference does not match its pipeline")
        if self.profile_ref is not None and not (isinstance(self.profile_ref, dict)
                                                 and isinstance(self.profile_ref.get("sha256"), str)
                                                 and _is_count(self.profile_ref.get("bytes"))):
            raise FormatError(f"invalid profile reference {self.profile_ref!r}")
        self.profile = None
        self.chain: dict = {}  # cross-layer prediction: the last decoded reconstruction per kind
        self.pruning = None
        if c.flags & FLAG_PRUNED:
            from .pruning.container import PrunedInfo

            self.pruning = PrunedInfo(self)   # kept positions are per layer, read with the layer
            self.positions = None
        elif self.contiguous:
            if self.next_position != self.start + self.tokens or self.start < 0:
                raise FormatError("positions in the header are inconsistent")
            self.positions = torch.arange(self.start, self.start + self.tokens, dtype=torch.int64)
        else:
            raw = c.section("positions")
            if len(raw) != 8 * self.tokens:
                raise FormatError("the positions section has the wrong length")
            self.positions = torch.from_numpy(np.frombuffer(raw, dtype="<i8").astype(np.int64))
            if self.tokens and (int(self.positions[-1]) + 1 != self.next_position or bool((self.positions[1:] <= self.positions[:-1]).any())):
                raise FormatError("the positions section is inconsistent")

    def use_profile(self, profile) -> None:
        """Check and attach the profile a calibrated container needs (ignored by the others)."""
        if self.profile_ref is None:
            return
        if profile is None:
            raise ProfileMismatchError(
                f"this container was encoded with a calibrated profile (sha256 {self.profile_ref['sha256'][:16]}…, "
                f"{self.profile_ref['bytes']} bytes): pass profile=seqkv.Profile.load(path) to decode it")
        if not isinstance(profile, Profile):
            raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
        profile.check_ref(self.profile_ref)
        self.profile = profile

    def decode_layer(self, i: int, symbols_out: dict | None = None):
        if self.pipeline.cross_layer and i > 0 and any(self.chain.get(k, (-1,))[0] != i - 1 for k in KINDS):
            # a chained section needs the previous layer's reconstruction: decode the missing ones in order
            done = min(self.chain.get(k, (-1,))[0] for k in KINDS)
            for j in range(done + 1 if done < i else 0, i):
                self._decode_any(j)
        return self._decode_any(i, symbols_out)

    def _decode_any(self, i: int, symbols_out: dict | None = None):
        """Layer ``i``: (keys, values), or for a pruned container (per-head tensors, kept positions)."""
        if self.pruning is not None:
            from .pruning.container import decode_layer

            return decode_layer(self, i)
        return self._decode_layer(i, symbols_out)

    def _decode_layer(self, i: int, symbols_out: dict | None = None):
        out = []
        for kind in KINDS:
            ctx = TensorContext(layer=i, kind=kind, positions=self.positions, layout=self.layout,
                                extra={"profile": self.profile, "chain": self.chain})
            payload = self.container.section(section_name(i, kind))
            try:
                out.append(self.pipeline.decode_tensor(payload, ctx, self.dtype, (self.heads, self.tokens, self.dim),
                                                       symbols_out))
            except SeqKVError:
                raise
            except (ValueError, TypeError, IndexError, RuntimeError, OverflowError, MemoryError) as exc:
                raise FormatError(f"{section_name(i, kind)}: cannot decode: {exc}") from None
        return tuple(out)


def decode(data, *, device=None, dtype=None, model=None, layers=None, progress: bool = False,
           max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, profile=None):
    """Decode container bytes into a ``DynamicCache`` on ``device`` in ``dtype`` (default: the original).

    Pass ``model`` to refuse containers made for another model.  ``layers``
    (an iterable of layer indices) decodes only those layers, in that order.
    The next RoPE position is ``inspect(data)["positions"]["next"]``.  Containers made
    with a calibrated profile need that profile (``profile=``); others ignore it.
    """
    parsed = _Parsed(data, max_decoded_bytes)
    if model is not None:
        parsed.layout.check_same_model(layout_from_model(model))
    parsed.use_profile(profile)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    indices = range(parsed.layers) if layers is None else list(layers)
    for i in indices:
        if not isinstance(i, int) or not 0 <= i < parsed.layers:
            raise ConfigError(f"layer index {i!r} is outside [0, {parsed.layers})")
    if parsed.pruning is not None:
        from .pruning.container import decode_pruned

        return decode_pruned(parsed, indices, device=device, dtype=dtype, progress=progress)
    decoded = [parsed.decode_layer(i) for i in progress_bar(list(indices), desc="decode", enabled=progress)]
    return build_cache(decoded, device=device, dtype=dtype)


def token_positions(data) -> torch.Tensor:
    """The RoPE position of every cached token (int64 [tokens]) of an unpruned container, as given to
    ``encode(positions=...)``; ``inspect()`` only reports the first and the next one.  A pruned
    container's positions differ per layer and head: ``decode(data).seqkv_pruned.kept``."""
    parsed = _Parsed(data, max_decoded_bytes=1 << 62)
    if parsed.pruning is not None:
        raise ConfigError("a pruned container keeps positions per layer and head: read decode(data).seqkv_pruned.kept")
    return parsed.positions.clone()


def inspect(data) -> dict:
    """Header facts, sizes, ratio vs fp16 and bits/element, without decoding any tensor."""
    parsed = _Parsed(data, max_decoded_bytes=1 << 62)
    c = parsed.container
    # a pruned container is measured against the cache it came from (every source token in fp16)
    tokens = parsed.pruning.source_tokens if parsed.pruning is not None else parsed.tokens
    elements = parsed.layers * 2 * parsed.heads * parsed.dim * tokens
    raw_fp16 = elements * 2
    sizes = c.section_sizes()
    return {
        "format_version": "%d.%d" % c.version,
        "created_by": c.header.get("created_by", ""),
        "preset": parsed.pipeline_config.get("preset"),
        "pipeline": parsed.pipeline_config,
        "model": {k: v for k, v in parsed.layout.to_json().items() if k != "rope_inv_freq"},
        "dtype": parsed.dtype,
        "layers": parsed.layers,
        "kv_heads": parsed.heads,
        "head_dim": parsed.dim,
        "tokens": parsed.tokens,
        "positions": {"start": parsed.start, "next": parsed.next_position, "contiguous": parsed.contiguous},
        "pruning": None if parsed.pruning is None else {
            "level": parsed.pruning.level, "pruner": parsed.pruning.pruner,
            "source_tokens": parsed.pruning.source_tokens,
            "kept_bytes": sum(v for k, v in sizes.items() if k.endswith(".kept"))},
        "total_bytes": c.total_bytes,
        "header_bytes": c.payload_start,
        "raw_fp16_bytes": raw_fp16,
        "ratio_vs_fp16": raw_fp16 / c.total_bytes,
        "bits_per_element": 8 * c.total_bytes / elements,
        "section_bytes": sizes,
        "profile": parsed.profile_ref,
        "rate_control": parsed.rate_control,
        "keys_bytes": sum(v for k, v in sizes.items() if k.endswith(".keys")),
        "values_bytes": sum(v for k, v in sizes.items() if k.endswith(".values")),
    }


_Pipeline = Pipeline  # transitional: the store's chunk codec still imports the old name
_BITS_DTYPE = BITS_DTYPE
