"""``seqkv.calibrate``: build a model :class:`~seqkv.profile.Profile` from a few thousand tokens of real text.

1. Prefill each text; per layer and kind, accumulate the mean and covariance of the
   concatenated KV heads (keys pre-RoPE), tokens after the sinks only (sinks are
   kept exact and have huge norms).  The KLT basis is the covariance's eigenvectors.
2. Component weights: how strongly the model reads each component.  Keys: an error
   ``e`` in a pre-RoPE key moves a logit by ``q^T R e``; averaged over relative
   positions that is the query energy of the RoPE channel pair.  Values: the error
   reaches the output through ``o_proj``, so the squared norms of its columns.
   Weights are summed over the query heads of each GQA group, mapped onto the
   KLT components and normalised to mean 1.  Also, for cross-layer prediction, the
   least-squares map from layer i-1's KLT coefficients to layer i's (same kind).
3. Sensitivity: add noise shaped like the quantizer's (variance ``sigma^2 / w_c`` per
   component) to one tensor at a time and measure the mean KL of the continuation:
   ``s = KL / sigma^2``, averaged over the texts.
4. ``kl_gain``: encode the calibration texts with the profile at a predicted KL and
   measure the true KL; the ratio corrects the linear model (the worst text wins).
5. The KL model's held-out error (:mod:`seqkv.kl_prediction_check`): from step 3's and 4's measurements
   (each container's weighted MSE per tensor, read back from its decoded cache), refit sensitivities and
   ``kl_gain`` without each text in turn and predict that text's measured KL; the ratios are stored in the
   profile (``Profile.kl_check``) and ``seqkv.inspect`` turns them into an error bar.  One text cannot be
   checked, and a held-out error above ``KL_PREDICTION_FACTOR_LIMIT`` means the texts do not predict each
   other: both warn (:class:`~seqkv.kl_prediction_check.CalibrationWarning`).
"""
from __future__ import annotations

import datetime
import warnings

import torch

from .codec import decode, encode, inspect
from .errors import ConfigError
from .kl_prediction_check import CalibrationWarning, leave_one_text_out
from .layout import layout_from_model
from .model_calls import cache_of
from .profile import KINDS, LayerKindProfile, Profile
from .progress import progress_bar
from .quality import QualityProbe, clone_cache
from .stages.klt import from_rows, rows_of
from .stages.rope import keys_to_post_rope, keys_to_pre_rope

DEFAULT_SINK_TOKENS = 4
NOISE_RMS_FRACTION = 0.05     # calibration noise, relative to the tensor's RMS
GAIN_PROBE_KL = (0.003, 0.01)  # predicted KLs at which kl_gain is measured
KL_PREDICTION_FACTOR_LIMIT = 2.0  # warn when held-out text's KL was more than this factor off its prediction


def _token_sequences(texts_or_token_ids, tokenizer) -> list[torch.Tensor]:
    if isinstance(texts_or_token_ids, (str, torch.Tensor)):
        texts_or_token_ids = [texts_or_token_ids]
    try:
        items = list(texts_or_token_ids)
    except TypeError:
        raise ConfigError(f"calibrate() takes a list of texts or token-id sequences, got "
                          f"{type(texts_or_token_ids).__name__}") from None
    out = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError("calibrate() got text: pass tokenizer= as well (or token ids)")
            ids = tokenizer(item, return_tensors="pt").input_ids[0]
        else:
            try:
                ids = torch.as_tensor(item).flatten()
            except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
                raise ConfigError(f"token ids must be sequences of integers: {exc}") from None
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ConfigError(f"token ids must be integers, got {ids.dtype}")
        out.append(ids.to(torch.int64))
    if not out:
        raise ConfigError("calibrate() needs at least one text or token-id sequence")
    return out


class _QueryEnergy:
    """Forward hooks on every layer's q_proj: the mean square of each pre-RoPE query channel."""

    def __init__(self, model, sinks: int):
        self.sinks = sinks
        self.sums: dict[int, torch.Tensor] = {}
        self.count: dict[int, int] = {}
        self.handles = []
        for i, layer in enumerate(_decoder_layers(model)):
            proj = getattr(getattr(layer, "self_attn", None), "q_proj", None)
            if proj is not None:
                self.handles.append(proj.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(_module, _inputs, output):
            q = output[0, self.sinks:].detach().to(torch.float64)
            self.sums[i] = self.sums.get(i, 0) + q.pow(2).sum(0)
            self.count[i] = self.count.get(i, 0) + q.shape[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()

    def mean_square(self, i: int):
        return None if i not in self.sums else (self.sums[i] / max(self.count[i], 1)).to(torch.float32)


def _decoder_layers(model):
    inner = getattr(model, "model", model)
    return list(getattr(inner, "layers", []))


def _channel_weights(model, layout, layer: int, kind: str, query_ms) -> torch.Tensor:
    """Importance of each (kv head, channel) of one tensor, [H*D]; ones when the model hides its projections."""
    heads, dim = layout.kv_heads, layout.head_dim
    ones = torch.ones(heads * dim)
    if kind == "keys":
        if query_ms is None or query_ms.numel() % dim:
            return ones
        q = query_ms.reshape(-1, dim)                     # [Hq, D]
        if dim % 2 == 0 and layout.has_rope:
            q = (q + q.roll(dim // 2, -1)) / 2            # RoPE mixes channel i with i + d/2
        w = q
    else:
        attn = getattr(_decoder_layers(model)[layer], "self_attn", None) if _decoder_layers(model) else None
        o_proj = getattr(attn, "o_proj", None)
        if o_proj is None or o_proj.weight.shape[1] % dim:
            return ones
        w = o_proj.weight.detach().to(torch.float32).pow(2).sum(0).reshape(-1, dim)  # [Hq, D]
    q_heads = w.shape[0]
    if q_heads % heads:
        return ones
    w = w.reshape(heads, q_heads // heads, dim).sum(1)  # GQA: the query heads that read each KV head
    return w.reshape(-1).clamp_min(1e-12)


def _set_tensor(cache, layer: int, kind: str, x_pre: torch.Tensor, layout, positions) -> None:
    old = getattr(cache.layers[layer], kind)
    setattr(cache.layers[layer], kind, keys_to_post_rope(x_pre, kind, positions, layout)[None].to(old.dtype))


def _sensitivity(probe: QualityProbe, layout, part: LayerKindProfile, layer: int, kind: str, sinks: int, seed: int) -> float:
    cache = clone_cache(probe.cache)
    positions = torch.arange(probe.prompt_len)
    x = keys_to_pre_rope(getattr(cache.layers[layer], kind)[0], kind, positions, layout)
    body = x[:, sinks:]
    inv_w = 1.0 / part.weights
    sigma2 = (NOISE_RMS_FRACTION ** 2) * float(body.pow(2).mean()) / float(inv_w.mean())
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(body.shape[1], part.basis.shape[0], generator=g) * (sigma2 * inv_w).sqrt()
    e = noise @ part.basis.T                               # KLT domain -> channels, [T, H*D]
    y = x.clone()
    y[:, sinks:] += from_rows(e, x.shape[0], x.shape[2])
    _set_tensor(cache, layer, kind, y, layout, positions)
    return max(probe.score(cache).mean_kl, 1e-12) / sigma2


def calibrate(model, texts_or_token_ids, *, tokenizer=None, prompt_len: int = 2048, continuation_len: int = 256,
              sink_tokens: int = DEFAULT_SINK_TOKENS, progress: bool = False, info: dict | None = None,
              triattention: bool = False) -> Profile:
    """Calibrate a profile of ``model`` on real text (strings with ``tokenizer=``, or token-id sequences).

    With ``triattention``, the profile also carries the TriAttention pruner's query centres, measured
    on the same sequences (``prompt_len`` tokens each; profile version 2, same codec hash).

    Each sequence contributes up to ``prompt_len`` tokens of statistics; sensitivities and
    ``kl_gain`` are measured on every sequence with at least 64 + ``continuation_len`` + 1
    tokens (the first one must have them).  ``info`` adds facts to the profile's ``info`` (e.g. text names).
    """
    for name, value, low in (("prompt_len", prompt_len, 1), ("continuation_len", continuation_len, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    seqs = _token_sequences(texts_or_token_ids, tokenizer)
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or not 0 <= sink_tokens <= 64:
        raise ConfigError(f"sink_tokens must be an int in [0, 64], got {sink_tokens!r}")
    layout = layout_from_model(model)
    n = layout.kv_heads * layout.head_dim
    min_tokens = sink_tokens + 2 * n   # the stated minimum: a covariance of n dimensions from fewer is noise
    got = sum(max(0, min(len(s), prompt_len) - sink_tokens) for s in seqs)
    if got < min_tokens:
        raise ConfigError(f"calibrate() needs at least {min_tokens} tokens after the sink tokens, over all texts "
                          f"(twice the {n} dimensions of a layer's KLT, plus the sinks); got {got}")
    probe_len = min(prompt_len, len(seqs[0]) - continuation_len - 1)
    if probe_len < max(64, sink_tokens + 16):
        raise ConfigError(f"the first calibration text needs at least {64 + continuation_len + 1} tokens "
                          f"(sensitivities are measured on its continuation); it has {len(seqs[0])}")

    # 1. statistics
    sums = {(i, k): [0, torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)]
            for i in range(layout.layers) for k in KINDS}
    cross_sums = {(i, k): torch.zeros(n, n, dtype=torch.float64) for i in range(1, layout.layers) for k in KINDS}
    hooks = _QueryEnergy(model, sink_tokens)
    try:
        for ids in progress_bar(seqs, desc="calibrate: statistics", enabled=progress):
            length = min(len(ids), prompt_len)
            with torch.no_grad():
                cache = cache_of(model(ids[None, :length], use_cache=True))
            positions = torch.arange(length)
            previous = {}
            for i, layer in enumerate(cache.layers):
                for kind in KINDS:
                    # as a server stores it: fp16
                    x = keys_to_pre_rope(getattr(layer, kind)[0].to(torch.float16), kind, positions, layout)
                    rows = rows_of(x)[sink_tokens:].to(torch.float64)
                    s = sums[(i, kind)]
                    s[0] += rows.shape[0]
                    s[1] += rows.sum(0)
                    s[2] += rows.T @ rows
                    if i > 0:
                        cross_sums[(i, kind)] += rows.T @ previous[kind]
                    previous[kind] = rows
    finally:
        hooks.close()

    parts = {}
    for (i, kind), (count, sx, sxx) in sums.items():  # in layer order: layer i-1's part exists for cross
        mean = sx / count
        cov = sxx / count - torch.outer(mean, mean)
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
        ch_w = _channel_weights(model, layout, i, kind, hooks.mean_square(i)).to(torch.float64)
        comp_w = (evecs.pow(2) * ch_w[:, None]).sum(0)
        comp_w = comp_w / comp_w.mean()
        cross = None
        if i > 0:
            # least squares z_i ~= A z_(i-1) in the two layers' KLT coordinates, where z_(i-1) is decorrelated:
            # A = V_i^T C(x_i, x_(i-1)) V_(i-1) diag(1 / lambda_(i-1))
            prev_count, prev_sx, _ = sums[(i - 1, kind)]
            prev = parts[(i - 1, kind)]
            c_cross = cross_sums[(i, kind)] / count - torch.outer(mean, prev_sx / prev_count)
            lam = prev.eigvals.to(torch.float64)
            ridge = 1e-6 * float(lam.max()) + 1e-30
            cross = (evecs.T @ c_cross @ prev.basis.to(torch.float64)) / (lam + ridge)[None, :]
            cross = cross.float().contiguous()
        parts[(i, kind)] = LayerKindProfile(mean=mean.float(), basis=evecs.float().contiguous(), eigvals=evals.float(),
                                            weights=comp_w.float().clamp_min(1e-6), sensitivity=1.0, cross=cross)

    # 3. sensitivities: the mean over every text long enough for the protocol (texts differ by 2x)
    probes = [QualityProbe(model, s[None], min(prompt_len, len(s) - continuation_len - 1), continuation_len)
              for s in seqs if len(s) - continuation_len - 1 >= max(64, sink_tokens + 16)]
    keys = sorted(parts)
    jobs = [(p, key) for p in probes for key in keys]
    sens = {key: [] for key in keys}
    for j, (p, (i, kind)) in enumerate(progress_bar(jobs, desc="calibrate: sensitivity", enabled=progress)):
        sens[(i, kind)].append(_sensitivity(p, layout, parts[(i, kind)], i, kind, sink_tokens, seed=j))
    for key in keys:
        parts[key].sensitivity = float(sum(sens[key]) / len(sens[key]))

    info = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sequences": len(seqs), "tokens": int(sum(min(len(s), prompt_len) for s in seqs)),
        "prompt_len": prompt_len, "continuation_len": continuation_len, **(info or {}),
    }
    profile = Profile(layout=layout, sink_tokens=sink_tokens, parts=parts, kl_gain=1.0, info=info)

    # 4. the linear model's gain, on every text long enough for the protocol; 5. its held-out error, from the
    # same containers: their true KL and weighted MSE per tensor
    gains, measured, weighted_mse = [], [], []
    for p in progress_bar(probes, desc="calibrate: KL gain", enabled=progress):
        measured.append([])
        weighted_mse.append([])
        for target in GAIN_PROBE_KL:
            # the profile's prediction alone (open loop): what is measured here is how good it is
            blob = encode(p.cache, model=model, profile=profile, target_kl=target, kl_margin=1.0, closed_loop=False)
            predicted = inspect(blob)["rate_control"]["predicted_kl"]
            decoded = decode(blob, profile=profile)
            true = p.score(decoded).mean_kl
            gains.append(true / max(predicted, 1e-12))
            measured[-1].append(true)
            weighted_mse[-1].append(container_weighted_mse(profile, p.cache, decoded))
    profile.kl_gain = float(max(gains))
    profile.info["kl_gain_samples"] = [round(g, 4) for g in gains]
    # a text given twice would be checked against itself: each distinct text once
    first = {}
    for j, p in enumerate(probes):
        first.setdefault(tuple(p.token_ids[0].tolist()), j)
    texts = sorted(first.values())
    profile.kl_check = leave_one_text_out([{key: sens[key][j] for key in keys} for j in texts],
                                          [weighted_mse[j] for j in texts], [measured[j] for j in texts], GAIN_PROBE_KL)
    profile.changed()
    _warn_about_kl_prediction(profile.kl_check, len(texts))
    if triattention:
        from .pruning.triattention import calibrate as calibrate_triattention

        profile = profile.with_triattention(calibrate_triattention(model, [s[:prompt_len] for s in seqs]))
    return profile


def container_weighted_mse(profile: Profile, original, decoded) -> dict:
    """{(layer, kind): weighted MSE per element} of a decoded calibrated cache against the one encoded, in the
    profile's KLT domain and after the sink tokens: what the profile's KL model reads (the encoder measures the
    same on its own reconstruction, before the cache's dtype rounds it)."""
    layout, sinks = profile.layout, profile.sink_tokens
    out = {}
    for i, (a, b) in enumerate(zip(original.layers, decoded.layers)):
        positions = torch.arange(a.keys.shape[2])
        for kind in KINDS:
            part = profile.parts[(i, kind)]
            pre = [keys_to_pre_rope(getattr(layer, kind)[0].to(torch.float32), kind, positions, layout) for layer in (a, b)]
            error = rows_of(pre[0] - pre[1])[sinks:] @ part.basis     # the error of each KLT component, [T, n]
            out[(i, kind)] = float((error.pow(2).mean(0) * part.weights).mean()) if error.shape[0] else 0.0
    return out


def _warn_about_kl_prediction(check, texts: int) -> None:
    """Warn when the KL model's held-out error is unknown (one text) or above KL_PREDICTION_FACTOR_LIMIT."""
    if check is None:
        warnings.warn(f"calibrate(): {texts} distinct text{'' if texts == 1 else 's'} long enough for the KL "
                      "measurements, so the KL model cannot be checked on held-out text and the profile has no "
                      "error bar; encode(target_kl=...) with it may land several times off its target on other "
                      "text.  Calibrate on two or more varied texts (the default `seqkv calibrate` reads three; an "
                      "encode given model= measures the KL instead: closed_loop=True)", CalibrationWarning, stacklevel=3)
    elif check.factor > KL_PREDICTION_FACTOR_LIMIT:
        warnings.warn(f"calibrate(): on held-out calibration text the KL model was off by up to {check.factor:.2f}x "
                      f"(measured / predicted {check.low:.2f} to {check.high:.2f} over {check.texts} texts), above the "
                      f"{KL_PREDICTION_FACTOR_LIMIT:g}x this calibration aims for: the texts do not predict each other, "
                      "and encode(target_kl=...) may land that far from its target.  Calibrate on more, and more "
                      "varied, text (an encode given model= measures the KL instead: closed_loop=True)",
                      CalibrationWarning, stacklevel=3)
