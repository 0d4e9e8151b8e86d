"""seqkv: compress transformer KV caches into small, self-describing byte strings and back."""
from __future__ import annotations

from .version import __version__  # noqa: E402,F401

from .codec import decode, encode, inspect, token_positions  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .profile import Profile, ProfileError, ProfileMismatchError  # noqa: E402
from .errors import (  # noqa: E402
    ChecksumError, ConfigError, DecodeError, EncodeError, FormatError, ModelMismatchError,
    NonFiniteError, AlreadyPrunedError, PruneError, SeqKVError, StorageError, UnsupportedCacheError, UnsupportedVersionError,
)
from .evaluate import EvalRow, evaluate_text  # noqa: E402
from .analyze import Analysis, analyze  # noqa: E402
from .layout import ModelLayout, layout_from_model  # noqa: E402
from .quality import QualityProbe, QualityReport  # noqa: E402
from .presets import PRESETS  # noqa: E402
from .pruning import pruner  # noqa: E402
from .store import PrefixStore  # noqa: E402

__all__ = [
    "encode", "decode", "inspect", "token_positions", "calibrate", "analyze", "Analysis", "Profile", "ProfileError", "ProfileMismatchError", "pruner", "PruneError", "AlreadyPrunedError", "PrefixStore", "evaluate_text", "EvalRow", "QualityProbe", "QualityReport", "PRESETS", "ModelLayout", "layout_from_model",
    "SeqKVError", "ConfigError", "EncodeError", "UnsupportedCacheError", "NonFiniteError", "DecodeError",
    "FormatError", "UnsupportedVersionError", "ChecksumError", "ModelMismatchError", "StorageError",
]
