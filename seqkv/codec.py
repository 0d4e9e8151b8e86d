"""The public API: encode / decode / inspect / token_positions.  A thin layer over the format layer
(:mod:`seqkv.format`): it checks arguments, picks the dialect (plain, pruned, calibrated) and builds caches."""
from __future__ import annotations

import torch

from .calibrated_encoder import calibrated_search, calibrated_setup
from .errors import ConfigError
from .format import DEFAULT_MAX_DECODED_BYTES, Header, Pipeline, PositionsInfo, open_container, write_container
from .format.pipeline import KINDS, le_bytes, section_name
from .kl_probe import loop_probe
from .token_importance import soft_steps
from .hf_adapter import SUPPORTED_DTYPES, build_cache, cache_layers, checked_device
from .kl_prediction_check import rate_control_report
from .layout import layout_for_cache, layout_from_model
from .positions import positions_of
from .presets import CALIBRATED_PRESET, pipeline_config
from .progress import progress_bar
from .pruning.container import decode_pruned, encode_pruned
from .rate_control import DEFAULT_KL_MARGIN, parse_target
from .shipped_profiles import profile_for_ref, shipped_profile
from .stages.base import TensorContext
from .version import __version__

NO_DECODE_CAP = 1 << 62   # inspect() and token_positions() decode no tensor


def encode(cache, *, preset: str | None = None, model=None, config=None, positions=None,
           prune=None, progress: bool = False, profile=None, target_kl: float | None = None,
           bits_per_element: float | None = None, max_bytes: int | None = None,
           kl_margin: float = DEFAULT_KL_MARGIN, closed_loop: bool | None = None, token_ids=None,
           **options) -> bytes:
    """Encode a transformers ``DynamicCache`` into a self-describing seqkv container.

    Without a profile, ``preset`` is one of "lossless", "near_lossless", "balanced"
    (the default), "small"; ``options`` override it: ``step`` (the quality knob),
    ``sink_tokens``, ``rotation`` ("none"/"hadamard"), ``quantizer``
    ("uniform"/"lloydmax"), ``bits`` (Lloyd-Max), ``rounding``, ``key_channel_gamma``, ``seed``.

    With ``profile=`` (a calibrated :class:`seqkv.Profile`) the codec is the
    calibrated one (per-layer KLT, profile steps, temporal prediction) and rate
    control meets one target: ``target_kl`` (predicted mean KL, the default, 0.01),
    ``bits_per_element`` or ``max_bytes``; ``scale=`` sets the knob directly.
    ``options`` then are ``rounding``, ``predict`` and ``cross_layer`` (bools, the two predictors), ``token_steps``
    and ``scale``.
    Lossless never uses a profile.

    ``model``/``config`` give the layout, RoPE parameters and fingerprint (required
    for lossy presets unless a profile gives them).  ``positions`` is the start
    position (int) or the position of every cached token (default 0, 1, 2, ...).
    ``prune`` (a ``seqkv.pruner(...)``) drops tokens first; caches pruned before are encoded with
    their kept positions either way (docs/format.md §9).  With a profile, every KV head of a layer
    must keep the same positions (``level="layer"`` or ``"chunk"``: the profile's KLT mixes the heads),
    and ``target_kl`` is the predicted KL of the quantization alone, the pruning's own KL comes on top.

    ``closed_loop`` (calibrated ``target_kl`` only): with ``model=`` a model that can run, the target is
    *measured*, not predicted: the cache's own last tokens (up to 256) are held out as a teacher-forced probe,
    and the scale is searched until their mean KL is at most ``target_kl * kl_margin`` (docs/rate_control.md);
    the header's ``rate_control.measured_kl`` records it.  ``None`` (default): closed when possible, else the
    profile's prediction (a warning says why, when a model was given); ``True``: closed or ConfigError;
    ``False``: the prediction alone (faster, nothing measured).  ``token_ids``: the cache's token ids (one per
    cached token); without them they are recovered from layer 0's keys, which identify the tokens.

    ``token_steps`` (calibrated, closed loop; soft pruning, docs/soft_pruning.md): the tokens that the queries
    to come are expected to attend to least (kvpress's expected attention, from the queries the probe
    observed, for the continuation and for the probe's window before the tail) get coarser steps
    (``2 ** (code / 4)`` times, per token and layer, in the container), and the closed loop then meets
    ``target_kl`` as before.  ``None`` (default): on wherever the closed loop runs, its probe observes the
    model's queries (Llama-style attention) and the cache has 1024 tokens or more, else off; ``True``: on at
    any length (ConfigError where it cannot be);
    ``False``: every token gets the same steps (a larger container at the same measured KL, but a later
    verbatim copy of an early passage reads less KL: docs/soft_pruning.md).  ``loop_start`` (closed
    loop): "profile" (default) starts the search at the profile's prediction; "measured" at the scale the KL
    model predicts with this cache's own sensitivities, measured through the model on the probe
    (:mod:`seqkv.measured_sensitivity`; uniform steps only, so soft pruning is off): a closer prediction, but
    in our measurements no better container and a slower encode (docs/rate_control.md).
    """
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"preset must be a string, got {type(preset).__name__}")
    targets_given = any(v is not None for v in (target_kl, bits_per_element, max_bytes)) or "scale" in options
    if profile is None and (preset == CALIBRATED_PRESET or (preset is None and targets_given)):
        profile = shipped_profile(model, config)   # the profile seqkv ships for this model, else a ConfigError
    calibrated = profile is not None and preset in (None, CALIBRATED_PRESET)
    if targets_given and not calibrated:
        raise ConfigError("target_kl / bits_per_element / max_bytes / scale need a calibrated profile= "
                          "(seqkv.calibrate(...) or seqkv.Profile.load(path)) and no preset")
    if profile is not None and not calibrated and preset != "lossless":
        raise ConfigError(f"preset {preset!r} does not use a profile; leave preset out to use the profile")
    target = parse_target(target_kl, bits_per_element, max_bytes, options.pop("scale", None)) if calibrated else None
    if prune is not None and not callable(getattr(prune, "prune", None)):
        raise ConfigError(f"prune must be a pruner (seqkv.pruner(name, ...) or a seqkv.pruning policy), "
                          f"got {type(prune).__name__}")
    if prune is not None or getattr(cache, "seqkv_pruned", None) is not None:
        if options.pop("token_steps", None):
            raise ConfigError("token_steps=True is not available for pruned caches (it reads the closed-loop probe)")
        if options.pop("loop_start", None) is not None:
            raise ConfigError("loop_start is for the closed loop, which pruned caches do not use")
        if closed_loop:
            raise ConfigError("closed_loop=True is not available for pruned caches: their target_kl is the "
                              "quantization's predicted KL (the pruning's own KL comes on top)")
        if calibrated:
            return encode_pruned(cache, prune, preset=CALIBRATED_PRESET, model=model, config=config,
                                 positions=positions, progress=progress, profile=profile, kl_margin=kl_margin,
                                 target=target, **options)
        return encode_pruned(cache, prune, preset="balanced" if preset is None else preset, model=model, config=config,
                             positions=positions, progress=progress, **options)
    layers = cache_layers(cache)
    dtype_name = SUPPORTED_DTYPES[layers[0][0].dtype]
    pos = positions_of(positions, layers[0][0].shape[1])
    if calibrated:
        token_steps = options.pop("token_steps", None)
        loop_start = options.pop("loop_start", "profile")
        if loop_start not in ("measured", "profile"):
            raise ConfigError(f"loop_start must be 'measured' or 'profile', got {loop_start!r}")
        if loop_start == "measured":
            if token_steps:
                raise ConfigError("loop_start='measured' models uniform steps: it cannot be combined with "
                                  "token_steps=True")
            token_steps = False   # the measured start's sensitivities are for uniform steps
        pipeline, layout = calibrated_setup(profile, model, config, layers, kl_margin, options)
        probe = loop_probe(closed_loop, target, model, layers, pos, layout, token_ids)
        soft = soft_steps(token_steps, probe, layers, pos, layout, profile.sink_tokens)
        if soft is not None:
            pipeline, layout = calibrated_setup(profile, model, config, layers, kl_margin, {**options, "token_steps": True})

        return _calibrated_container(layers, dtype_name, pos, pipeline, layout, profile, target, kl_margin,
                                     progress=progress, probe=probe, soft=soft, loop_start=loop_start)
    preset = "balanced" if preset is None else preset
    pipeline = Pipeline(pipeline_config(preset, **options))
    layout = layout_for_cache(model, config, layers, pipeline.lossless)
    sections = {}
    for i, (keys, values) in progress_bar(list(enumerate(layers)), desc=f"encode {preset}", enabled=progress):
        for kind, x in zip(KINDS, (keys, values)):
            ctx = TensorContext(layer=i, kind=kind, positions=pos, layout=layout)
            sections[section_name(i, kind)] = pipeline.encode_tensor(x.cpu(), ctx, dtype_name)
    return _write(sections, pipeline, layout, layers, dtype_name, pos)


def encode_with_token_steps(cache, profile, soft, *, scale: float, model=None, config=None) -> bytes:
    """A calibrated container of a plain cache at a fixed ``scale`` with the given per-token steps ``soft`` (a
    :class:`seqkv.token_importance.SoftSteps`, or None for uniform steps): for tests, golden files and
    experiments that need chosen codes.  :func:`encode` chooses them itself (``token_steps=True``)."""
    layers = cache_layers(cache)
    dtype_name = SUPPORTED_DTYPES[layers[0][0].dtype]
    pos = positions_of(None, layers[0][0].shape[1])
    target = parse_target(scale=scale)
    pipeline, layout = calibrated_setup(profile, model, config, layers, DEFAULT_KL_MARGIN,
                                        {"token_steps": True} if soft is not None else {})
    return _calibrated_container(layers, dtype_name, pos, pipeline, layout, profile, target, DEFAULT_KL_MARGIN, soft=soft)


def _calibrated_container(layers, dtype_name, pos, pipeline, layout, profile, target, kl_margin, **search) -> bytes:
    """A plain cache's calibrated container: :func:`calibrated_search` writing through :func:`_write`
    (``search``: its ``progress``, ``probe`` and ``soft``)."""
    def write(sections, profile_ref, rate_control):
        return _write(sections, pipeline, layout, layers, dtype_name, pos, profile=profile_ref, rate_control=rate_control)

    return calibrated_search(pipeline, profile, layout, layers, [pos] * len(layers), target, kl_margin, write,
                             elements=len(layers) * 2 * layers[0][0].numel(), **search)


def _write(sections: dict, pipeline, layout, layers, dtype_name, pos, **header_fields) -> bytes:
    heads, tokens, dim = layers[0][0].shape
    contiguous = bool(tokens == 0 or torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + tokens)))
    if not contiguous:
        sections["positions"] = le_bytes(pos.numpy())
    header = Header(pipeline=pipeline.full_config(), layout=layout, dtype=dtype_name, layers=len(layers),
                    kv_heads=heads, head_dim=dim, tokens=tokens,
                    positions=PositionsInfo(int(pos[0]), int(pos[-1]) + 1, contiguous),
                    created_by=f"seqkv {__version__}", **header_fields)
    return write_container(header, pipeline, sections)


def decode(data, *, device=None, dtype=None, model=None, layers=None, progress: bool = False,
           max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, profile=None):
    """Decode container bytes into a ``DynamicCache`` on ``device`` in ``dtype`` (default: the original).

    Pass ``model`` to refuse containers made for another model.  ``layers``
    (an iterable of layer indices) decodes only those layers, in that order.
    The next RoPE position is ``inspect(data)["positions"]["next"]``.  Containers made
    with a calibrated profile need that profile (``profile=``); others ignore it.
    """
    device = checked_device(device)
    reader = open_container(data, max_decoded_bytes=max_decoded_bytes)
    if model is not None:
        reader.header.layout.check_same_model(layout_from_model(model))
    reader.use_profile(profile if profile is not None else profile_for_ref(reader.header.profile))  # shipped
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
    try:
        indices = range(reader.header.layers) if layers is None else list(layers)
    except TypeError:
        raise ConfigError(f"layers must be an iterable of layer indices, got {type(layers).__name__}") from None
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < reader.header.layers:
            raise ConfigError(f"layer index {i!r} is outside [0, {reader.header.layers})")
    if reader.pruned:
        return decode_pruned(reader, indices, device=device, dtype=dtype, progress=progress)
    decoded = [reader.layer(i) for i in progress_bar(list(indices), desc="decode", enabled=progress)]
    return build_cache(decoded, device=device, dtype=dtype)


def token_positions(data) -> torch.Tensor:
    """The RoPE position of every cached token (int64 [tokens]) of an unpruned container, as given to
    ``encode(positions=...)``; ``inspect()`` only reports the first and the next one.  A pruned
    container's positions differ per layer and head: ``decode(data).seqkv_pruned.kept``."""
    reader = open_container(data, max_decoded_bytes=NO_DECODE_CAP)
    if reader.pruned:
        raise ConfigError("a pruned container keeps positions per layer and head: read decode(data).seqkv_pruned.kept")
    return reader.positions.clone()


def inspect(data, *, profile=None) -> dict:
    """Header facts, sizes, ratio vs fp16 and bits/element, without decoding any tensor.

    A calibrated container's ``rate_control`` also gives the predicted KL's error bar, ``predicted_kl_range``,
    from the held-out check its profile records (``profile=``, or the one seqkv ships; see
    :mod:`seqkv.kl_prediction_check`), and ``predicted_kl_note`` says where it came from or why there is none."""
    reader = open_container(data, max_decoded_bytes=NO_DECODE_CAP)
    h = reader.header
    if h.profile is not None:
        if profile is not None:
            if not callable(getattr(profile, "check_ref", None)):
                raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
            profile.check_ref(h.profile.to_json())
        else:
            profile = profile_for_ref(h.profile)   # the shipped profile it names, or None
    # a pruned container is measured against the cache it came from (every source token in fp16)
    tokens = h.pruning.source_tokens if h.pruning is not None else h.tokens
    elements = h.layers * 2 * h.kv_heads * h.head_dim * tokens
    raw_fp16 = elements * 2
    sizes = reader.section_sizes()
    return {
        "format_version": "%d.%d" % reader.version,
        "created_by": reader.container.header.get("created_by", ""),
        "preset": h.pipeline.get("preset"),
        "pipeline": h.pipeline,
        "model": {k: v for k, v in h.layout.to_json().items() if k != "rope_inv_freq"},
        "dtype": h.dtype,
        "layers": h.layers,
        "kv_heads": h.kv_heads,
        "head_dim": h.head_dim,
        "tokens": h.tokens,
        "positions": {"start": h.positions.start, "next": h.positions.next, "contiguous": h.positions.contiguous},
        "pruning": None if h.pruning is None else {
            "level": h.pruning.level, "pruner": h.pruning.pruner,
            "source_tokens": h.pruning.source_tokens,
            "kept_bytes": sum(v for k, v in sizes.items() if k.endswith(".kept"))},
        "total_bytes": reader.total_bytes,
        "header_bytes": reader.header_bytes,
        "raw_fp16_bytes": raw_fp16,
        "ratio_vs_fp16": raw_fp16 / reader.total_bytes,
        "bits_per_element": 8 * reader.total_bytes / elements,
        "section_bytes": sizes,
        "profile": None if h.profile is None else h.profile.to_json(),
        "rate_control": rate_control_report(h.rate_control, h.profile.sha256, profile) if h.profile else h.rate_control,
        "keys_bytes": sum(v for k, v in sizes.items() if k.endswith(".keys")),
        "values_bytes": sum(v for k, v in sizes.items() if k.endswith(".values")),
    }
