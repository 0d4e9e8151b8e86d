"""The calibrated codec's encoder: pre-RoPE, the profile's KLT, profile steps scaled by rate control.

Every layer is transformed once; rate control (:mod:`seqkv.rate_control`) then picks the one knob
(``scale``) that meets the target, and the sections are quantized and coded at that scale.  Plain and
pruned containers both use it; what they differ in (their sections and header) is the ``write`` callback.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import ConfigError
from .format.header import ProfileRef
from .format.pipeline import KINDS, Pipeline, section_name
from .format.reader import open_container
from .layout import layout_for_cache
from .measured_sensitivity import measured_sensitivities
from .presets import calibrated_pipeline_config
from .profile import Profile
from .progress import progress_bar
from .rate_control import DEFAULT_TARGET_KL, scale_for_kl, scale_for_measured_kl, scale_for_size
from .stages.base import CodingState, TensorContext


def calibrated_setup(profile, model, config, layers, kl_margin, options) -> tuple[Pipeline, object]:
    """The calibrated pipeline and the layout for ``layers``, with the profile checked against the model."""
    if not isinstance(profile, Profile):
        raise ConfigError(f"profile must be a seqkv.Profile, got {type(profile).__name__}")
    if not (isinstance(kl_margin, (int, float)) and 0.01 <= kl_margin <= 100):
        raise ConfigError(f"kl_margin must be in [0.01, 100], got {kl_margin!r}")
    pipeline = Pipeline(calibrated_pipeline_config(profile.sink_tokens, **options))
    if model is not None or config is not None:
        layout = layout_for_cache(model, config, layers, False)
        profile.check_model(layout)
    else:
        layout = layout_for_cache(profile.layout, None, layers, False)
    return pipeline, layout


def calibrated_search(pipeline: Pipeline, profile, layout, layers, layer_positions, target, kl_margin, write, *,
                      elements, progress=False, probe=None, soft=None, loop_start="profile") -> bytes:
    """Transform every layer once, then pick the scale that meets ``target`` and return
    ``write(sections, profile_ref, rate_control)`` (``sections``: {name: bytes} of the keys and values).
    ``layer_positions[i]``: the positions of layer ``i``'s tokens (all the same unless the cache was pruned
    layer by layer); ``elements``: what bits per element count.  ``probe`` (a
    :class:`seqkv.kl_probe.TailProbe`): a ``target_kl`` is then met as measured on the probe (closed loop),
    the profile's prediction only starting the search.  ``soft`` (a :class:`seqkv.token_importance.SoftSteps`):
    per-token steps, for a pipeline whose quantizer has ``token_steps``.  ``loop_start``: where the closed
    loop starts, "profile" (the profile's KL model) or "measured" (the KL model with this cache's
    sensitivities, measured through the model on the probe's windows: :mod:`seqkv.measured_sensitivity`;
    uniform steps only)."""
    sinks = pipeline.sink_tokens
    state = CodingState(profile=profile, token_codes=None if soft is None else soft.codes,
                        token_weights=None if soft is None else soft.weights)
    transformed = {}
    for i, (keys, values) in progress_bar(list(enumerate(layers)), desc="encode: transform", enabled=progress):
        for kind, x in zip(KINDS, (keys, values)):
            x = x.cpu()
            ctx = TensorContext(layer=i, kind=kind, positions=layer_positions[i], layout=layout, state=state)
            transformed[(i, kind)] = (x, pipeline.transform(x, ctx))
    bodies = {key: y[:, sinks:] for key, (_x, y) in transformed.items()}
    shared = all(torch.equal(p, layer_positions[0]) for p in layer_positions[1:])
    body_positions = None if shared else {(i, kind): layer_positions[i][min(sinks, len(layer_positions[i])):]
                                          for (i, kind) in transformed}
    rounding = pipeline.quantizer.rounding

    coded = {}   # scale -> (sections, rate control record): the closed loop writes its last try again

    def container_at(scale: float, measured: dict | None = None) -> bytes:
        if scale not in coded:
            state.scale, state.chain, state.weighted_mse = scale, {}, {}
            sections = {}
            for (i, kind), (x, y) in transformed.items():
                ctx = TensorContext(layer=i, kind=kind, positions=layer_positions[i], layout=layout, state=state)
                sections[section_name(i, kind)] = pipeline.code(x, y, ctx)
            coded[scale] = sections, {"target": target.to_json(), "scale": float(np.float32(scale)),
                                      "kl_margin": kl_margin, "predicted_kl": profile.predicted_kl(state.weighted_mse)}
        sections, rate_control = coded[scale]
        ref = profile.ref()
        return write(sections, ProfileRef(ref["sha256"], ref["bytes"]), {**rate_control, **(measured or {})})

    def measured_kl(scale: float) -> float:
        reader = open_container(container_at(scale))
        reader.use_profile(profile)
        return probe.mean_kl([reader.layer(i) for i in range(reader.header.layers)])

    if target.kind == "scale":
        return container_at(target.value)
    soft_body = None if soft is None else {key: soft.for_body(key, sinks) for key in bodies}
    sensitivities = None
    if target.kind == "kl" and probe is not None and soft is None and loop_start == "measured":
        sensitivities = measured_sensitivities(probe, layers, layout, profile)
    kl_scale = scale_for_kl(profile, bodies, target.value if target.kind == "kl" else DEFAULT_TARGET_KL,
                            rounding, kl_margin, cross_layer=pipeline.cross_layer, positions=body_positions,
                            token_steps=soft_body, sensitivities=sensitivities)
    if target.kind == "kl" and probe is not None:
        scale, kl, count = scale_for_measured_kl(measured_kl, target.value * kl_margin, kl_scale)
        return container_at(scale, {"measured_kl": kl, "probe_tokens": probe.tokens, "measurements": count})
    if target.kind == "kl":
        return container_at(kl_scale)
    goal = target.value if target.kind == "max_bytes" else target.value * elements / 8
    _scale, blob = scale_for_size(container_at, goal, kl_scale, exact_cap=target.kind == "max_bytes")
    return blob
