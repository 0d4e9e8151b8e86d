"""How well a profile's KL model predicts the KL of text it was not fitted on: leave-one-text-out.

A calibrated profile predicts a container's mean KL as ``kl_gain * sum_t sensitivity_t * weighted_mse_t``
(:meth:`seqkv.profile.Profile.predicted_kl`); rate control trusts that prediction.  Calibration fits the
model's two data-driven parts on its texts: each tensor's ``sensitivity`` (the mean over texts) and
``kl_gain`` (the worst ratio true / predicted KL over texts and probe targets).  For ``kl_gain`` it encodes
every text at a few predicted KLs (the probe targets) and measures the true KL; from the same containers it
keeps every tensor's weighted MSE.  That is enough to refit both parts without any text and predict that
text's KL with them, with no further model run: :func:`leave_one_text_out` does it for every text, and
the ratios measured / held-out prediction say how far encode(target_kl=...) may land from its target on
text like the calibration texts but not among them.

Not refitted per fold: the KLT bases and component weights (they shape the containers and would need every
sensitivity measured again).  So the check covers the KL model, not the transform; it cannot see text
unlike all of the calibration texts, and with one text it cannot run at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

METHOD = "leave-one-text-out"
MAX_TEXTS = 4096   # a bound for reading a profile's metadata, far above any calibration
RATIO_BOUNDS = (1e-30, 1e30)   # what is recorded stays a finite positive float


class CalibrationWarning(UserWarning):
    """A calibration whose KL prediction is unchecked (one text) or, on held-out text, off by more than the
    stated factor: encode(target_kl=...) with it may land that far from the target."""


@dataclass(frozen=True)
class KLPredictionCheck:
    """The held-out error of a profile's KL model: ``ratios[j][i]`` is text ``j``'s measured KL over the KL
    the model fitted without text ``j`` predicts, for its container encoded at probe target ``targets[i]``."""

    targets: tuple
    ratios: tuple
    method: str = METHOD

    @property
    def texts(self) -> int:
        return len(self.ratios)

    def _all(self) -> list:
        return [r for row in self.ratios for r in row]

    @property
    def low(self) -> float:
        """The smallest measured / predicted: the prediction was this many times too high at worst."""
        return min(self._all())

    @property
    def high(self) -> float:
        """The largest measured / predicted: the prediction was this many times too low at worst."""
        return max(self._all())

    @property
    def factor(self) -> float:
        """How far off the held-out prediction was at worst, either way (>= 1)."""
        return max(self.high, 1.0 / self.low)

    def predicted_range(self, predicted: float) -> tuple[float, float]:
        """Where a predicted KL's measured KL lay on held-out calibration text: ``predicted`` times the
        smallest and the largest ratio over every text and probe target."""
        return predicted * self.low, predicted * self.high

    def per_target(self) -> list[dict]:
        """For each probe target: the smallest, largest and geometric-mean ratio over the held-out texts."""
        out = []
        for i, target in enumerate(self.targets):
            column = [row[i] for row in self.ratios]
            out.append({"target_kl": target, "min": min(column), "max": max(column),
                        "geomean": math.exp(sum(math.log(r) for r in column) / len(column))})
        return out

    def summary(self) -> dict:
        """What ``seqkv.inspect`` reports about the profile's KL model (rounded for reading)."""
        return {"method": self.method, "texts": self.texts, "measured_over_predicted_min": round(self.low, 4),
                "measured_over_predicted_max": round(self.high, 4), "factor": round(self.factor, 4),
                "per_target": [{k: round(v, 6) if k == "target_kl" else round(v, 4) for k, v in row.items()}
                               for row in self.per_target()]}

    def to_json(self) -> dict:
        return {"method": self.method, "targets": list(self.targets), "ratios": [list(row) for row in self.ratios]}

    @classmethod
    def from_json(cls, obj) -> "KLPredictionCheck":
        """The check a profile file records; ConfigError for anything but finite positive ratios, one per
        text and probe target, from at least two texts."""
        if not isinstance(obj, dict):
            raise ConfigError(f"kl_prediction_check must be an object, got {type(obj).__name__}")
        method, targets, ratios = obj.get("method"), obj.get("targets"), obj.get("ratios")
        if method != METHOD:
            raise ConfigError(f"kl_prediction_check: unknown method {method!r}")
        if not isinstance(targets, list) or not targets or not all(_positive(t) for t in targets):
            raise ConfigError("kl_prediction_check: targets must be a non-empty list of positive numbers")
        if (not isinstance(ratios, list) or not 2 <= len(ratios) <= MAX_TEXTS
                or not all(isinstance(row, list) and len(row) == len(targets) and all(_positive(r) for r in row)
                           for row in ratios)):
            raise ConfigError(f"kl_prediction_check: ratios must be 2 to {MAX_TEXTS} lists (one per text) of "
                              f"{len(targets)} positive numbers (one per target)")
        return cls(tuple(float(t) for t in targets), tuple(tuple(float(r) for r in row) for row in ratios), method)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _raw_prediction(sensitivity: dict, weighted_mse: dict) -> float:
    """The linear model without its gain: sum over tensors of sensitivity * weighted MSE."""
    return max(sum(sensitivity[key] * value for key, value in weighted_mse.items()), 1e-300)


def _ratio(measured: float, predicted: float) -> float:
    """measured / predicted, kept finite and positive (a KL of exactly 0 from a model that ignores the noise)."""
    return min(max(max(measured, 1e-300) / max(predicted, 1e-300), RATIO_BOUNDS[0]), RATIO_BOUNDS[1])


def leave_one_text_out(sensitivities: list, weighted_mse: list, measured: list, targets) -> KLPredictionCheck | None:
    """The held-out check from calibration's own measurements; None with fewer than two texts.

    ``sensitivities[j]``: text ``j``'s measured sensitivity per tensor ({key: float});
    ``weighted_mse[j][i]``: per tensor, the weighted MSE of text ``j``'s container at probe target ``i``;
    ``measured[j][i]``: that container's true KL.  Fold ``k`` refits what calibration fits, on the other
    texts: sensitivities as their mean, the gain as the worst ratio true / predicted among them."""
    texts = len(sensitivities)
    if texts < 2:
        return None
    ratios = []
    for k in range(texts):
        others = [j for j in range(texts) if j != k]
        sens = {key: sum(sensitivities[j][key] for j in others) / len(others) for key in sensitivities[k]}
        gain = max(measured[j][i] / _raw_prediction(sens, weighted_mse[j][i])
                   for j in others for i in range(len(targets)))
        ratios.append(tuple(_ratio(measured[k][i], gain * _raw_prediction(sens, weighted_mse[k][i]))
                            for i in range(len(targets))))
    return KLPredictionCheck(tuple(float(t) for t in targets), tuple(ratios))


def rate_control_report(rate_control: dict | None, profile_sha256: str, profile) -> dict | None:
    """A calibrated container's ``rate_control`` header with the predicted KL's error bar added:
    ``predicted_kl_range`` ([low, high], or None when there is no check to take it from),
    ``predicted_kl_check`` (the profile's :meth:`KLPredictionCheck.summary`, or None) and
    ``predicted_kl_note`` (one sentence saying which).  ``profile``: the container's profile, or None when it is
    not at hand."""
    if not isinstance(rate_control, dict) or "predicted_kl" not in rate_control:
        return rate_control
    out = dict(rate_control)
    check = getattr(profile, "kl_check", None)
    if check is None:
        why = (f"the container's profile (sha256 {profile_sha256[:16]}…) is not at hand: pass it (inspect(data, "
               "profile=...), or seqkv inspect --profile)"
               if profile is None else
               f"its profile (sha256 {profile_sha256[:16]}…) records no held-out check of its KL model (calibrated "
               "on one text, or before seqkv measured it)")
        out.update(predicted_kl_range=None, predicted_kl_check=None, predicted_kl_note=f"no error bar: {why}")
        return out
    low, high = check.predicted_range(float(rate_control["predicted_kl"]))
    out.update(predicted_kl_range=[low, high], predicted_kl_check=check.summary(),
               predicted_kl_note=f"on held-out calibration text the measured KL was {check.low:.2f}x to "
                                 f"{check.high:.2f}x the predicted ({check.method}, {check.texts} texts)")
    return out
