"""The small protocol every stage follows, and the registry that builds stages from configs.

A stage's config is a JSON-serialisable dict whose ``"id"`` names the stage;
the container records the configs, so decoding needs nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..registry import Registry

_STAGES = Registry("stage", key="id")
register = _STAGES.register  # class decorator: make a stage constructible by stage_from_config


def stage_from_config(config) -> "Stage":
    if not isinstance(config, dict) or not isinstance(config.get("id"), str):
        raise ConfigError(f"a stage config must be a dict with a string 'id', got {config!r}")
    return _STAGES.get(config["id"]).from_config(config)


def registered_stages() -> list[str]:
    return _STAGES.names()


@dataclass
class TensorContext:
    """What a stage may know about the tensor it handles."""

    layer: int
    kind: str                 # "keys" or "values"
    positions: torch.Tensor   # int64 [tokens], the RoPE position of every token
    layout: object            # seqkv.layout.ModelLayout
    extra: dict = field(default_factory=dict)


class Stage:
    """Base class: configs in and out, validated strictly."""

    id: ClassVar[str] = ""
    # where the stage fits in a pipeline: "transform" (tensor <-> tensor), "quantizer" (tensor <-> ints
    # + side info), "symbol_coder" (ints <-> bytes) or "tensor_coder" (raw float bits <-> bytes, lossless)
    role: ClassVar[str] = ""
    params: ClassVar[dict] = {}  # name -> (type, default)

    def __init__(self, **kwargs):
        unknown = set(kwargs) - set(self.params)
        if unknown:
            raise ConfigError(f"stage {self.id!r}: unknown option(s) {sorted(unknown)}; known: {sorted(self.params)}")
        for name, (typ, default) in self.params.items():
            value = kwargs.get(name, default)
            try:
                value = typ(value)
            except (TypeError, ValueError):
                raise ConfigError(f"stage {self.id!r}: option {name}={value!r} is not a valid {typ.__name__}") from None
            setattr(self, name, value)
        self.validate()

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
