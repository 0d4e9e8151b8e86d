"""seqkv: compress transformer KV caches into small, self-describing byte strings and back.

``import seqkv`` loads only the version and the exception tree; every other public name (``encode``,
``PrefixStore``, ``pruner``, ``evaluate_text``, ...) and every submodule (``seqkv.pruning``,
``seqkv.store``, ...) is imported on first use (PEP 562 module ``__getattr__``), so that a program
that only decodes never loads the store backends, the pruners or the evaluation harness.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from . import errors
from .version import __version__  # noqa: F401
from .errors import (  # noqa: F401
    ChecksumError, ConfigError, DecodeError, EncodeError, FormatError, ModelMismatchError,
    NonFiniteError, AlreadyPrunedError, PruneError, SeqKVError, StorageError, UnsupportedCacheError, UnsupportedVersionError,
)

# public name -> the module that defines it, imported on first access
_LAZY = {
    "encode": "codec", "decode": "codec", "inspect": "codec", "token_positions": "codec",
    "calibrate": "calibrate",
    "Profile": "profile", "ProfileError": "profile", "ProfileMismatchError": "profile",
    "shipped_profile": "shipped_profiles",
    "EvalRow": "evaluate", "evaluate_text": "evaluate",
    "Analysis": "analyze", "analyze": "analyze",
    "ModelLayout": "layout", "layout_from_model": "layout",
    "QualityProbe": "quality", "QualityReport": "quality",
    "PRESETS": "presets",
    "pruner": "pruning",
    "PrefixStore": "store",
    "CalibrationWarning": "kl_prediction_check", "OpenLoopWarning": "kl_probe",
}

__all__ = [
    "encode", "decode", "inspect", "token_positions", "calibrate", "analyze", "Analysis", "Profile", "ProfileError",
    "ProfileMismatchError", "shipped_profile", "pruner", "PruneError", "AlreadyPrunedError", "PrefixStore",
    "CalibrationWarning", "OpenLoopWarning", "evaluate_text", "EvalRow", "QualityProbe", "QualityReport", "PRESETS", "ModelLayout", "layout_from_model",
    "SeqKVError", "ConfigError", "EncodeError", "UnsupportedCacheError", "NonFiniteError", "DecodeError",
    "FormatError", "UnsupportedVersionError", "ChecksumError", "ModelMismatchError", "StorageError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    elif name.endswith("Error") and hasattr(errors, name):
        value = getattr(errors, name)   # an exception added to seqkv.errors later
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")   # a submodule: seqkv.pruning, seqkv.store, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value   # later accesses skip this function
    return value


# functions named like the module that defines them: importing the submodule must not replace the function
_SHADOWED = {"analyze", "calibrate"}


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return  # the import system binds seqkv.analyze to the submodule; keep (or lazily load) the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__():
    return sorted(set(globals()) | set(__all__))
