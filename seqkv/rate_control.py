"""Rate control: pick the profile quantizer's one global knob (``scale``) to meet a target.

Targets (exactly one):

- ``target_kl``: the predicted mean KL of the continuation, from the profile's
  linear model ``kl_gain * sum_t sensitivity_t * weighted_mse_t``.  The weighted
  MSE of each tensor is measured on a token subsample of the actual quantization
  error, so dead-zone components (reverse water-filling's "zero bits") count their
  real error.  Bracketed secant on log(scale); ``kl_margin`` aims below the target.
- ``bits_per_element`` / ``max_bytes``: real encodes, safeguarded secant on
  log(bytes) vs log(scale).  ``max_bytes`` never returns a container over the budget.

Steps within the scale follow the profile (equal weighted-distortion slope), so
one number sets every layer's and component's step.

Closed loop (:func:`scale_for_measured_kl`): with the model at hand, the KL is measured, not predicted:
``measure(scale)`` encodes, decodes and runs :class:`seqkv.kl_probe.TailProbe`; the prediction is only the
search's starting point.  The result is the largest scale tried whose measured KL is at most the goal.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError, EncodeError
from .stages.base import CodingState, TensorContext
from .stages.quantize_klt import (
    MAX_SCALE, MIN_SCALE, component_steps, quantize_components, cross_layer_prediction, remember_reconstruction, weighted_mse,
)

DEFAULT_TARGET_KL = 0.01
DEFAULT_KL_MARGIN = 1.0
SUBSAMPLE_TOKENS = 128
START_SCALE = 0.02           # a typical knob for KL 0.01 on SmolLM2; only the search's starting point
KL_SEARCH_STEPS = 30
KL_TOLERANCE = 0.01         # target_kl: the predicted KL lands within 1 % below the goal
BYTES_SEARCH_STEPS = 12
BPE_TOLERANCE = 0.01        # bits_per_element: within 1 %
MAX_BYTES_SLACK = 0.03      # max_bytes: at most 3 % under the budget when the search converges
LOOP_ACCEPT = 0.8           # closed loop: stop once a measured KL lands in [0.8 * goal, goal]
LOOP_MAX_STEPS = 4          # ... or after this many measurements, if one of them is at most the goal
LOOP_SLOPE = 2.0            # d log KL / d log scale before two measurements give one (KL ~ step^2)
LOOP_MAX_FACTOR = 4.0       # the scale changes by at most this factor per measurement


@dataclass(frozen=True)
class RateTarget:
    kind: str      # "kl", "bits_per_element", "max_bytes" or "scale"
    value: float

    def to_json(self) -> dict:
        return {self.kind: self.value}


def parse_target(target_kl=None, bits_per_element=None, max_bytes=None, scale=None) -> RateTarget:
    given = {k: v for k, v in [("kl", target_kl), ("bits_per_element", bits_per_element),
                               ("max_bytes", max_bytes), ("scale", scale)] if v is not None}
    if len(given) > 1:
        raise ConfigError(f"give one rate target, not {sorted(given)}")
    kind, value = next(iter(given.items())) if given else ("kl", DEFAULT_TARGET_KL)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{kind} must be a finite number, got {value!r}")
    bounds = {"kl": (1e-7, 100.0), "bits_per_element": (0.01, 32.0), "max_bytes": (1, 1 << 50), "scale": (MIN_SCALE, MAX_SCALE)}
    lo, hi = bounds[kind]
    if not lo <= value <= hi:
        raise ConfigError(f"{kind}={value} is outside [{lo}, {hi}]")
    return RateTarget(kind, float(value))


def quantization_error(z_body: torch.Tensor, part, scale: float, rounding: float, pred: torch.Tensor | None = None,
                       token_steps: tuple | None = None):
    """(weighted MSE, z_hat) of quantizing one tensor's KLT coefficients [H, T, D] at ``scale``.

    With ``pred`` (the cross-layer prediction), components whose residual has the smaller
    variance are quantized as residuals: a cheap stand-in for the quantizer's choice by entropy.
    ``token_steps``: (multipliers [T], attention weights [T]) of soft pruning: each token's steps are
    multiplied, and its error counts by the attention it receives."""
    heads, tokens, dim = z_body.shape
    if tokens == 0:
        return 0.0, z_body
    steps = component_steps(part, scale, heads, dim)
    mult, weights = token_steps if token_steps is not None else (None, None)
    z = z_body if mult is None else z_body / mult[None, :, None]
    p = pred if mult is None or pred is None else pred / mult[None, :, None]
    _q, recon = quantize_components(z, steps, rounding)
    if p is not None:
        use = ((z - p).pow(2).mean(1) < z.pow(2).mean(1))[:, None, :]
        recon_res = quantize_components(z - p, steps, rounding)[1] + p
        recon = torch.where(use, recon_res, recon)
    if mult is not None:
        recon = recon * mult[None, :, None]
    return weighted_mse(z_body, recon, part, weights), recon


def predicted_kl(profile, bodies: dict, scale: float, rounding: float, cross_layer: bool = False,
                 positions: dict | None = None, token_steps: dict | None = None,
                 sensitivities: dict | None = None) -> float:
    """The profile's KL model for quantizing ``bodies`` ({(layer, kind): [H, T, D]}, in layer order),
    chaining cross-layer predictions the way the quantizer does.  ``positions`` ({(layer, kind): [T]}):
    the tokens' positions, for pruned caches whose layers keep different tokens.  ``token_steps``
    ({(layer, kind): (multipliers [T], weights [T])}): soft pruning, see :func:`quantization_error`.
    ``sensitivities``: the cache's own, measured through the model (:mod:`seqkv.measured_sensitivity`), in
    place of the profile's."""
    mse = {}
    state = CodingState(profile=profile, chain={})
    for (layer, kind), z in bodies.items():
        part = profile.parts[(layer, kind)]
        pos = None if positions is None else positions[(layer, kind)]
        ctx = TensorContext(layer=layer, kind=kind, positions=pos, layout=profile.layout, state=state)
        pred = cross_layer_prediction(part, ctx, z.shape) if cross_layer else None
        steps = None if token_steps is None else token_steps.get((layer, kind))
        mse[(layer, kind)], recon = quantization_error(z, part, scale, rounding, pred, steps)
        remember_reconstruction(ctx, recon)
    if sensitivities is not None:
        from .measured_sensitivity import predicted_kl as measured_prediction

        return measured_prediction(sensitivities, mse)
    return profile.predicted_kl(mse)


def subsample(bodies: dict, tokens: int = SUBSAMPLE_TOKENS, positions: dict | None = None):
    """About ``tokens`` tokens of every body.  With ``positions`` (pruned caches), the same *positions*
    in every layer (those divisible by one stride), so cross-layer predictions still find their
    tokens; returns ``(bodies, positions)`` then."""
    if positions is None:
        return {key: z[:, ::stride_for(z.shape[1], tokens)].contiguous() for key, z in bodies.items()}
    stride = stride_for(min(z.shape[1] for z in bodies.values()), tokens)
    out, out_pos = {}, {}
    for key, z in bodies.items():
        keep = positions[key] % stride == 0
        out[key], out_pos[key] = z[:, keep].contiguous(), positions[key][keep]
    return out, out_pos


def stride_for(tokens: int, sample: int = SUBSAMPLE_TOKENS) -> int:
    """The token stride of :func:`subsample` (plain caches)."""
    return max(1, tokens // sample)


def scale_for_kl(profile, bodies: dict, target: float, rounding: float, margin: float = DEFAULT_KL_MARGIN,
                 cross_layer: bool = False, positions: dict | None = None, token_steps: dict | None = None,
                 sensitivities: dict | None = None) -> float:
    """The scale whose predicted KL (on a token subsample) is target * margin, within KL_TOLERANCE,
    never above it.  Bracketed secant (Illinois) on log KL vs log scale: KL grows like scale^2.
    ``positions``: as for :func:`predicted_kl` (pruned caches); ``token_steps`` too (plain caches only);
    ``sensitivities`` as there."""
    sample, sample_pos = subsample(bodies, positions=positions) if positions is not None else (subsample(bodies), None)
    if token_steps is not None:
        if positions is not None:
            raise ConfigError("soft pruning's token steps are for plain caches")
        token_steps = {key: tuple(t[::stride_for(bodies[key].shape[1])] for t in pair)
                       for key, pair in token_steps.items()}
    goal = math.log(target * margin)

    def f(log_scale):
        kl = predicted_kl(profile, sample, math.exp(log_scale), rounding, cross_layer, sample_pos, token_steps,
                          sensitivities)
        return math.log(max(kl, 1e-300)) - goal

    lo_limit, hi_limit = math.log(MIN_SCALE), math.log(10.0)
    close = -math.log1p(KL_TOLERANCE)
    # bracket the goal from a typical scale, stepping with KL ~ scale^2 (usually two or three evaluations)
    tried = {}
    x = math.log(START_SCALE)
    for _ in range(KL_SEARCH_STEPS):
        tried[x] = fx = f(x)
        if close < fx <= 0:
            return math.exp(x)
        below = [t for t, v in tried.items() if v <= 0]
        above = [t for t, v in tried.items() if v > 0]
        if below and above:
            break
        if x <= lo_limit and fx > 0:
            raise EncodeError(f"target_kl={target} is below what the finest quantizer step reaches")
        if x >= hi_limit and fx <= 0:
            return math.exp(x)
        step = -fx / 2
        x = min(max(x + (step if abs(step) > 0.05 else math.copysign(0.05, step)), lo_limit), hi_limit)
    below = [t for t, v in tried.items() if v <= 0]
    above = [t for t, v in tried.items() if v > 0]
    if not below:
        raise EncodeError(f"target_kl={target} is below what the finest quantizer step reaches")
    if not above:
        return math.exp(max(below))
    lo, hi = max(below), min(above)
    f_lo, f_hi = tried[lo], tried[hi]
    side = 0
    for _ in range(KL_SEARCH_STEPS):
        x = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        fx = f(x)
        if fx <= 0:
            lo, f_lo = x, fx
            if side == -1:
                f_hi /= 2
            side = -1
            if fx > close:
                break
        else:
            hi, f_hi = x, fx
            if side == 1:
                f_lo /= 2
            side = 1
    return math.exp(lo)


def scale_for_size(encode_at, goal_bytes: float, start_scale: float, exact_cap: bool):
    """Search the scale whose container is ``goal_bytes`` long (bytes fall as the scale grows).

    ``encode_at(scale) -> bytes``.  A safeguarded secant on log(bytes) vs log(scale), kept
    inside the bracket of what was tried.  With ``exact_cap`` the result never exceeds the
    goal (EncodeError when even the coarsest scale does).  Returns (scale, blob).
    """
    lo_limit, hi_limit = math.log(MIN_SCALE), math.log(MAX_SCALE)
    tried = {}  # log scale -> blob

    def size(log_scale):
        log_scale = min(max(log_scale, lo_limit), hi_limit)
        if log_scale not in tried:
            tried[log_scale] = encode_at(math.exp(log_scale))
        return log_scale, len(tried[log_scale])

    def done() -> bool:
        if exact_cap:
            fits = [len(b) for b in tried.values() if len(b) <= goal_bytes]
            return bool(fits) and goal_bytes - max(fits) <= MAX_BYTES_SLACK * goal_bytes
        return any(abs(len(b) - goal_bytes) <= BPE_TOLERANCE * goal_bytes for b in tried.values())

    x0, b0 = size(math.log(start_scale))
    x1, b1 = size(x0 + (0.7 if b0 > goal_bytes else -0.7))
    for _ in range(BYTES_SEARCH_STEPS):
        if done():
            break
        too_big = [x for x, b in tried.items() if len(b) > goal_bytes]    # the scale must grow past these
        small_enough = [x for x, b in tried.items() if len(b) <= goal_bytes]
        lo = max(too_big) if too_big else lo_limit
        hi = min(small_enough) if small_enough else hi_limit
        if lo >= hi_limit or hi <= lo_limit:
            break  # the goal lies beyond the quantizer's range
        nxt = None
        if b1 != b0 and x1 != x0:
            slope = (math.log(b1) - math.log(b0)) / (x1 - x0)
            if slope < -1e-3:
                nxt = x1 + (math.log(goal_bytes) - math.log(b1)) / slope
        if nxt is None or not lo < nxt < hi or nxt in tried:
            if too_big and small_enough:
                nxt = (lo + hi) / 2
            else:
                nxt = lo + 2.0 if too_big else hi - 2.0
        x0, b0 = x1, b1
        x1, b1 = size(nxt)
    if exact_cap:
        fits = [(x, b) for x, b in tried.items() if len(b) <= goal_bytes]
        if not fits:
            raise EncodeError(f"max_bytes={int(goal_bytes)} is below the smallest container this cache can have "
                              f"({min(len(b) for b in tried.values())} bytes at the coarsest step tried)")
        x, blob = max(fits, key=lambda xb: len(xb[1]))
        return math.exp(x), blob
    x, blob = min(tried.items(), key=lambda xb: abs(len(xb[1]) - goal_bytes))
    return math.exp(x), blob


def scale_for_measured_kl(measure, goal: float, start_scale: float):
    """The largest scale whose measured KL is at most ``goal``: ``(scale, kl, measurements)``.

    ``measure(scale) -> KL``.  Steps on log KL vs log scale (slope from the last two measurements, else
    :data:`LOOP_SLOPE`), aiming inside ``[LOOP_ACCEPT * goal, goal]``; stops there, or after
    :data:`LOOP_MAX_STEPS` once a measurement fits; never returns a scale whose measured KL exceeds the goal
    (EncodeError if even the finest scale does)."""
    lo_limit, hi_limit = math.log(MIN_SCALE), math.log(MAX_SCALE)
    aim = math.log(goal * (1 + LOOP_ACCEPT) / 2)
    tried: dict[float, float] = {}   # log scale -> log KL
    measured: dict[float, float] = {}   # log scale -> KL (compared with the goal as measured, not as its log)
    x = min(max(math.log(start_scale), lo_limit), hi_limit)
    while True:
        kl = measured[x] = measure(math.exp(x))
        tried[x] = math.log(max(kl, 1e-300))
        fits = [t for t, v in measured.items() if v <= goal]
        best = max(fits) if fits else None
        if best is not None and (measured[best] >= LOOP_ACCEPT * goal or len(tried) >= LOOP_MAX_STEPS
                                 or best >= hi_limit):
            return math.exp(best), measured[best], len(tried)
        if best is None and x <= lo_limit:
            raise EncodeError(f"target_kl={goal:g} is below what the finest quantizer step reaches "
                              f"(measured KL {kl:.3g} at scale {MIN_SCALE})")
        # the slope of the two closest tries around x, where they disagree, else KL ~ scale^2
        near = sorted(tried, key=lambda t: abs(t - x))[:2]
        slope = LOOP_SLOPE
        if len(near) == 2 and near[0] != near[1]:
            fitted = (tried[near[0]] - tried[near[1]]) / (near[0] - near[1])
            slope = min(max(fitted, 0.5), 4.0)
        # at most a factor LOOP_MAX_FACTOR per step: one probe's KL is a noisy sample, not a law
        nxt = x + max(-math.log(LOOP_MAX_FACTOR), min(math.log(LOOP_MAX_FACTOR), (aim - tried[x]) / slope))
        # stay inside the bracket of what was tried: above every scale that fit, below every one that did not
        too_big = [t for t, v in measured.items() if v > goal]
        lower, upper = (best if best is not None else lo_limit), (min(too_big) if too_big else hi_limit)
        if not lower < nxt < upper or nxt in tried:
            nxt = (lower + upper) / 2 if best is not None and too_big else min(max(nxt, lo_limit), hi_limit)
        if nxt in tried or (best is None and len(tried) >= LOOP_MAX_STEPS):
            nxt = max(lo_limit, min(nxt, x - 0.35))   # past the step budget with nothing fitting: ~halve the KL each try
        x = nxt
