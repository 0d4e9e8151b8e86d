"""The small protocol every stage follows, and the registry that builds stages from configs.

A stage's config is a JSON-serialisable dict whose ``"id"`` names the stage;
the container records the configs, so decoding needs nothing else.
"""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

import torch

from ..errors import ConfigError
from ..registry import Registry
from ..wire import Reader

_STAGES = Registry("stage", key="id")
register = _STAGES.register  # class decorator: make a stage constructible by stage_from_config


def stage_from_config(config) -> "Stage":
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise ConfigError(f"a stage config must be a dict with a string 'id', got {config!r}")
    return _STAGES.get(config["id"]).from_config(config)


def registered_stages() -> list[str]:
    return _STAGES.names()


@dataclass
class CodingState:
    """What the stages of one container share, beyond the tensor at hand (typed, so every reader and
    writer of a field is visible).  One state per container encode or decode."""

    profile: object = None              # seqkv.profile.Profile, for pipelines that read it (klt, klt_uniform)
    scale: float | None = None          # klt_uniform's rate knob, as float32 (what the decoder reads back)
    # cross-layer prediction: kind -> (layer, reconstruction [H*D, T] channel-major, its token positions);
    # None when the container's sections do not chain
    chain: dict | None = None
    # per (layer, kind): the weighted MSE klt_uniform's quantization caused (rate control's KL model reads it)
    weighted_mse: dict = field(default_factory=dict)
    # klt_uniform with token_steps: (layer, kind) -> uint8 [tokens] step codes chosen by the encoder
    token_codes: dict | None = None
    # and (layer, kind) -> float [tokens]: the attention each token receives, mean 1 (the KL model's weights)
    token_weights: dict | None = None
    # temporal_ar with repeat: layer 0's symbols by kind until both are in, then the RepeatMap they give
    repeat_symbols: dict | None = None
    repeat_map: object = None


@dataclass
class TensorContext:
    """What a stage may know about the tensor it handles."""

    layer: int
    kind: str                 # "keys" or "values"
    positions: torch.Tensor   # int64 [tokens], the RoPE position of every token
    layout: object            # seqkv.layout.ModelLayout
    state: CodingState = field(default_factory=CodingState)


def body_positions(positions: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """The positions of the quantized tokens: the last ``tokens`` ones (exact sink tokens come first); None
    without positions or tokens."""
    if positions is None or tokens == 0 or positions.numel() < tokens:
        return None
    return positions[positions.numel() - tokens:]


def option_value(stage_id: str, name: str, typ: type, value):
    """A stage option checked strictly against its JSON type (docs/format.md §5): a ``bool`` option takes a
    boolean, an ``int`` one an integer (not a boolean, not a float), a ``float`` one a number (an integer is
    converted, a boolean is not a number).  Numpy scalars count as what they are (np.float32 is a number) and
    become Python values, so configs stay JSON.  Ranges are each stage's ``validate``."""
    is_bool = isinstance(value, (bool, np.bool_))
    if typ is bool:
        ok = is_bool
    elif typ is int:
        ok = isinstance(value, numbers.Integral) and not is_bool
    elif typ is float:
        ok = isinstance(value, numbers.Real) and not is_bool
    else:
        ok = isinstance(value, typ)
    if ok and typ in (bool, int, float):
        try:
            value = typ(value)   # an int beyond the float range overflows
        except OverflowError:
            ok = False
    if not ok:
        kind = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}.get(typ, typ.__name__)
        raise ConfigError(f"stage {stage_id!r}: option {name}={value!r} must be {kind}, "
                          f"not {type(value).__name__}")
    return value


class Stage(ABC):
    """Base class: configs in and out, validated strictly."""

    id: ClassVar[str] = ""
    # where the stage fits in a pipeline; set by the role classes below
    role: ClassVar[str] = ""
    # the lowest container minor version that defines this stage (1.1 added the calibrated stages)
    min_minor: ClassVar[int] = 0
    reads_profile: ClassVar[bool] = False   # the stage reads the model profile from the coding state
    params: ClassVar[dict] = {}  # name -> (type, default)

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.params)
        if unknown:
            raise ConfigError(f"stage {self.id!r}: unknown option(s) {sorted(unknown)}; known: {sorted(self.params)}")
        for name, (typ, default) in self.params.items():
            setattr(self, name, option_value(self.id, name, typ, kwargs.get(name, default)))
        self.validate()

    def check_head_dim(self, head_dim: int) -> None:
        """Override to refuse a head_dim the stage cannot handle (ConfigError); the reader calls it when it
        opens a container, so such a container is refused before any section is decoded."""

    def validate(self) -> None:
        """Override to check option values; raise ConfigError."""

    def get_config(self) -> dict:
        return {"id": self.id, **{name: getattr(self, name) for name in self.params}}

    @classmethod
    def from_config(cls, config: dict) -> "Stage":
        if config.get("id") != cls.id:
            raise ConfigError(f"config for {config.get('id')!r} given to stage {cls.id!r}")
        return cls(**{k: v for k, v in config.items() if k != "id"})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.params)
        return f"{type(self).__name__}({args})"


# -- one abstract class per place in the pipeline, with the exact signatures the pipeline calls ----------

class Transform(Stage):
    """A tensor <-> tensor map applied token by token (float32 [H, T, D] in, any layout out)."""

    role: ClassVar[str] = "transform"

    @abstractmethod
    def forward(self, x: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """The transformed tensor the next stage sees."""

    @abstractmethod
    def inverse(self, y: torch.Tensor, ctx: TensorContext) -> torch.Tensor:
        """``forward``'s inverse (up to float rounding)."""


class Quantizer(Stage):
    """Floats -> integer symbols plus side info (bytes the section carries before the coder's part)."""

    role: ClassVar[str] = "quantizer"

    @abstractmethod
    def quantize(self, y: torch.Tensor, ctx: TensorContext) -> tuple[np.ndarray, bytes]:
        """(int32 symbols [H, T, D], side info bytes) of the transformed tensor ``y`` [H, T, D]."""

    @abstractmethod
    def read_side(self, reader: Reader, heads: int, dim: int) -> object:
        """The side info ``quantize`` wrote, read back (bounded by ``reader``)."""

    @abstractmethod
    def dequantize(self, q: torch.Tensor, side: object, ctx: TensorContext) -> torch.Tensor:
        """The reconstruction (float32 [H, T, D], transform domain) of symbols ``q`` [H, T, D]."""


class Predictor(Stage):
    """Symbols -> residuals the coder codes cheaper (exactly invertible integer arithmetic)."""

    role: ClassVar[str] = "predictor"

    @abstractmethod
    def forward(self, q: np.ndarray, ctx: TensorContext) -> tuple[np.ndarray, bytes]:
        """(residuals int32 [H, T, D], side info bytes)."""

    @abstractmethod
    def read_side(self, reader: Reader, heads: int, dim: int) -> object:
        """The side info ``forward`` wrote, read back."""

    @abstractmethod
    def inverse(self, residuals: np.ndarray, side: object, ctx: TensorContext) -> np.ndarray:
        """The symbols (int32 [H, T, D]); may work in place on ``residuals``."""


class SymbolCoder(Stage):
    """The lossy pipeline's entropy coder: int32 symbols [H, T, D] <-> bytes."""

    role: ClassVar[str] = "symbol_coder"

    @abstractmethod
    def encode(self, q: np.ndarray) -> bytes:
        """The coded symbols."""

    @abstractmethod
    def decode(self, reader: Reader, shape: tuple[int, int, int]) -> np.ndarray:
        """int32 symbols of ``shape``, read from ``reader`` (which may hold more bytes after them)."""


class TensorCoder(Stage):
    """The lossless pipeline's coder: the raw IEEE bits of a tensor <-> bytes, bit-exact."""

    role: ClassVar[str] = "tensor_coder"

    @abstractmethod
    def encode(self, bits: np.ndarray, float_format: str) -> bytes:
        """The coded bit patterns (uint16 or uint32 [H, T, D]) of a ``float_format`` tensor."""

    @abstractmethod
    def decode(self, data, float_format: str, shape: tuple[int, ...]) -> np.ndarray:
        """The bit patterns, exactly as given to ``encode``; ``data`` must hold nothing else."""
