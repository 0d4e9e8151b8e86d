"""The prefix store's argument checks: every value a caller hands to :class:`~seqkv.store.PrefixStore` is
checked here before it is used, so that a bad argument is a :class:`seqkv.ConfigError` (or, for a cache,
an :class:`seqkv.EncodeError`) with a message naming it, never a ``TypeError`` from deep inside torch or
numpy.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..errors import ConfigError, EncodeError, SeqKVError
from ..hf_adapter import SUPPORTED_DTYPES, cache_layers
from ..positions import MAX_POSITION, positions_of
from . import keys as _keys
from .backend import KEY_RE

DTYPE_NAMES = ("float32", "float16", "bfloat16")
MAX_TOKEN_ID = (1 << 31) - 1       # token ids are stored as int32 (and the token trie takes no negative ids)
MAX_CHUNK_TOKENS = 1 << 19         # a chunk holds at most 2^20 tokens (docs/format.md §10.1); content chunks
                                   # reach 2 * chunk_tokens
MAX_VOCAB_SIZE = 1 << 20


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def count(value, what: str, *, minimum: int = 0, maximum=None, allow_none: bool = False):
    """``value`` as an int in [minimum, maximum] (or None when allowed), else ConfigError."""
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{what} must be {'None or ' if allow_none else ''}an integer {bound}, got {value!r}")
    return int(value)


def seconds(value, what: str, *, allow_none: bool = True):
    """An age threshold in seconds (or None when allowed): any number but NaN (a negative one takes every
    item, however young; infinity none)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ConfigError(f"{what} must be {'None or ' if allow_none else ''}a number of seconds, got {value!r}")
    return float(value)


def flag(value, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{what} must be True or False, got {value!r}")
    return bool(value)


def token_ids(value) -> np.ndarray:
    """Token ids as a flat int64 array of ids in [0, 2^31 - 1]."""
    try:
        ids = _keys.token_array(value)
    except SeqKVError:
        raise
    except Exception as exc:  # a tensor on the meta device, an object whose __array__ fails, ...
        raise ConfigError(f"token_ids must be a sequence of integers: {type(exc).__name__}: {exc}") from None
    if ids.size and int(ids.min()) < 0:
        raise ConfigError(f"token ids must be in [0, {MAX_TOKEN_ID}], got {int(ids.min())}")
    return ids


def token_id_list(value, what: str) -> list:
    """A list of token ids (``boundary_tokens``); None is the empty list."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{what} must be a list of token ids, got {value!r}")
    try:
        items = list(value)
    except Exception as exc:
        raise ConfigError(f"{what} must be a list of token ids: {exc}") from None
    if not all(is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in items):
        raise ConfigError(f"{what} must be a list of token ids in [0, {MAX_TOKEN_ID}]")
    return [int(t) for t in items]


def positions(value, tokens: int) -> torch.Tensor:
    """The positions of ``tokens`` tokens (int64): None, a start, or one per token, all in [0, MAX_POSITION]."""
    if value is None:
        return positions_of(None, tokens)
    if isinstance(value, bool):
        raise ConfigError(f"positions must be None, a start position or one position per token, got {value!r}")
    if is_int(value):
        if not 0 <= value <= MAX_POSITION - tokens:
            raise ConfigError(f"start position must be in [0, {MAX_POSITION - tokens}] for {tokens} tokens, got {value}")
        return positions_of(int(value), tokens)
    if isinstance(value, (str, bytes, dict, float)) or value is Ellipsis:
        raise ConfigError(f"positions must be None, a start position or one position per token, got {value!r}")
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
    except Exception as exc:
        raise ConfigError(f"positions must be None, a start position or one position per token: {exc}") from None
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"positions must be integers, got dtype {arr.dtype}")
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1 or arr.size != tokens:
        raise ConfigError(f"positions must hold one position per token ({tokens}), got shape {arr.shape}")
    if arr.size and (arr.dtype.kind == "u" and int(arr.max()) > MAX_POSITION):
        raise ConfigError(f"positions must be in [0, {MAX_POSITION}]")
    arr = arr.astype(np.int64)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_POSITION):
        raise ConfigError(f"positions must be in [0, {MAX_POSITION}]")
    if arr.size > 1 and bool((arr[1:] <= arr[:-1]).any()):
        raise ConfigError("positions must be strictly increasing")
    return torch.from_numpy(arr.copy())


def dtype_name(value, *, allow_none: bool = False):
    """"float32"/"float16"/"bfloat16" from a name or a torch dtype (None when allowed)."""
    if value is None and allow_none:
        return None
    try:
        name = SUPPORTED_DTYPES.get(value, value)
    except TypeError:  # unhashable
        name = None
    if not isinstance(name, str) or name not in DTYPE_NAMES:
        raise ConfigError(f"dtype must be one of {DTYPE_NAMES} (or the torch dtype), got {value!r}")
    return name


def device(value):
    """A torch device the decoded cache can be built on (None: the CPU); refuses devices this machine lacks."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"device must be None, a device name or a torch.device, got {value!r}")
    try:
        dev = torch.device(value)
    except Exception as exc:
        raise ConfigError(f"device must be None, a device name or a torch.device, got {value!r}: {exc}") from None
    if dev.type == "meta":
        raise ConfigError("device='meta' holds no data: a cache cannot be loaded there")
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    try:
        ok = bool(available()) if callable(available) else False
        n = backend.device_count() if ok and hasattr(backend, "device_count") else None
    except Exception:
        ok, n = False, None
    if not ok:
        raise ConfigError(f"device {str(dev)!r} is not available on this machine (torch has no working {dev.type})")
    if dev.index is not None and n is not None and dev.index >= n:
        raise ConfigError(f"device {str(dev)!r} does not exist: this machine has {n} {dev.type} device(s)")
    return dev


def cache(value) -> list:
    """The cache's layers [(K, V)] of [H, T, D] on the CPU (EncodeError/UnsupportedCacheError otherwise)."""
    layers = cache_layers(value)  # raises UnsupportedCacheError / EncodeError
    out = []
    for i, (k, v) in enumerate(layers):
        if k.device.type == "meta" or v.device.type == "meta":
            raise EncodeError(f"layer {i} is on the meta device: it holds no values to store")
        try:
            out.append((k.detach().cpu(), v.detach().cpu()))
        except Exception as exc:
            raise EncodeError(f"layer {i}: cannot read its tensors on the CPU: {type(exc).__name__}: {exc}") from None
    return out


def entry_key(value, what: str = "key") -> str:
    if not isinstance(value, str) or not KEY_RE.match(value):
        raise ConfigError(f"{what} must be a store key (64 lowercase hex digits), got {value!r}")
    return value


def url(value) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"the store URL must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise ConfigError("the store URL holds a NUL character")
    return value
