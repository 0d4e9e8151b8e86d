"""Entropy coding of token ids with a :class:`~seqkv_ext.trie.TokenTrie`'s predictions.

A building block of the sessions feature: a prompt that shares a prefix with prompts already
in the trie costs almost nothing, and the rest is coded with the trie's back-off distribution.

Model
-----
Token ``i`` of ``tokens`` is coded with ``P(. | tokens[:i]) =
trie.next_token_probs(tokens[:i], vocab_size, escape)`` (see the trie's module docstring:
PPM-style escape, add-one back-off over the vocabulary, so every token ``< vocab_size`` has
``P > 0``).  The probabilities go, as float64, into
``constriction.stream.model.Categorical(probs, perfect=False)`` and a queue
``RangeEncoder``/``RangeDecoder`` (constriction's 32-bit words, 24-bit model precision).
Encoder and decoder run the same code on the same float64 arrays, so they build the same
quantized models.

``next_token_probs`` walks the prefix from the root *as far as it matches*.  So once
``tokens[:m]`` is the longest prefix that is a path of the trie (``m =
trie.longest_prefix(tokens)``), every later position ``i > m`` sees the very same node and
distribution as position ``m``: it is computed once and the tail ``tokens[m + 1:]`` is coded
with one batch call of that single model (no O(vocab) work per tail token).  Positions
``0 .. m`` each build their own model (O(vocab) each; lazy constriction models, which do not
change the coding semantics with ``perfect=False``).

The trie used for decoding must be the trie used for encoding (same contents, hence the same
``tobytes()``), with the same ``vocab_size``; the escape method is stored.  A 16-byte
blake2b digest of ``trie.tobytes()`` is stored and a mismatch is refused with
:class:`~seqkv.errors.FormatError` ("different token trie").  Computing it serializes the
trie (16 bytes per node) on every call.

Bytes, version 1 (integers little-endian)
-----------------------------------------
::

    6   magic b"SKVTOK"
    1   u8 version = 1
    1   u8 escape: ord("A"), ord("C") or ord("D")
    16  blake2b(trie.tobytes(), digest_size=16)
    ..  uvarint vocab_size (2 .. 2**20)
    ..  uvarint count: number of tokens (<= max_count, default 2**24)
    ..  the range coder's u32 words, up to the end (the remaining length is a multiple of 4)

Decoding validates all of it and raises only :class:`~seqkv.errors.DecodeError` subclasses
(:class:`~seqkv.errors.FormatError`) on truncated, corrupt or mismatched input.  There is no
checksum of the payload: a flipped bit in the words may decode to other tokens without an
error (the stream must still end where the coder expects, which catches most damage).
"""
from __future__ import annotations

import hashlib

import constriction
import numpy as np

from .errors import ConfigError, EncodeError, FormatError
from .wire import Reader, write_uvarint

__all__ = [
    "DEFAULT_MAX_COUNT",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_VOCAB",
    "decode_tokens",
    "encode_tokens",
    "trie_digest",
]

MAGIC = b"SKVTOK"
FORMAT_VERSION = 1
MAX_VOCAB = 1 << 20  # well under constriction's 2**24 model precision
DEFAULT_MAX_COUNT = 1 << 24
_ESCAPES = ("A", "C", "D")
_DIGEST_SIZE = 16


def trie_digest(trie) -> bytes:
    """The 16-byte blake2b digest of ``trie.tobytes()`` stored in the header."""
    return hashlib.blake2b(trie.tobytes(), digest_size=_DIGEST_SIZE).digest()


def _check_vocab(vocab_size) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise ConfigError(f"vocab_size must be an int (got {type(vocab_size).__name__})")
    v = int(vocab_size)
    if not 2 <= v <= MAX_VOCAB:
        raise ConfigError(f"vocab_size must be in 2..{MAX_VOCAB} (got {v})")
    return v


def _model(probs: np.ndarray, lazy: bool):
    return constriction.stream.model.Categorical(probs, perfect=False, lazy=lazy)


def _as_tokens(token_ids, vocab_size: int) -> np.ndarray:
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise EncodeError(f"token_ids must be one-dimensional (got shape {arr.shape})")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        raise EncodeError(f"token_ids must be integers (got dtype {arr.dtype})")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise EncodeError(f"token ids must be in 0..{vocab_size - 1} (got {lo}..{hi})")
    return arr.astype(np.int32)


def encode_tokens(token_ids, trie, vocab_size: int, *, escape: str = "C") -> bytes:
    """Code ``token_ids`` (ints in ``0 .. vocab_size - 1``) with ``trie``'s predictions.

    Decode with :func:`decode_tokens` and the *same* trie (same contents) and ``vocab_size``.
    """
    v = _check_vocab(vocab_size)
    if not isinstance(escape, str) or escape not in _ESCAPES:
        raise ConfigError(f"escape must be 'A', 'C' or 'D' (got {escape!r})")
    toks = _as_tokens(token_ids, v)
    n = len(toks)
    m = min(int(trie.longest_prefix(toks)), n) if n else 0
    enc = constriction.stream.queue.RangeEncoder()
    # positions 0 .. m - 1: the prefix is a full path of the trie, one model each
    for i in range(m):
        enc.encode(int(toks[i]), _model(trie.next_token_probs(toks[:i], v, escape), True))
    if m < n:
        # positions m .. n - 1 all see the node at toks[:m]
        probs = trie.next_token_probs(toks[:m], v, escape)
        enc.encode(int(toks[m]), _model(probs, True))
        if m + 1 < n:
            enc.encode(toks[m + 1:], _model(probs, False))
    words = np.asarray(enc.get_compressed(), dtype=np.uint32)
    out = bytearray(MAGIC)
    out.append(FORMAT_VERSION)
    out.append(ord(escape))
    out += trie_digest(trie)
    write_uvarint(out, v)
    write_uvarint(out, n)
    out += words.astype("<u4").tobytes()
    return bytes(out)


def decode_tokens(data, trie, vocab_size: int, count: int | None = None, *,
                  max_count: int = DEFAULT_MAX_COUNT) -> list[int]:
    """Decode bytes from :func:`encode_tokens`; ``trie`` and ``vocab_size`` must be the encoder's.

    ``count=None`` decodes every stored token; ``count=k`` (``0 <= k <=`` the stored count)
    decodes only the first ``k`` (sequential coding makes a prefix cheap).  A stored count
    above ``max_count`` is refused before anything is allocated.  Raises
    :class:`~seqkv.errors.FormatError` on truncated, corrupt or mismatched data.
    """
    v = _check_vocab(vocab_size)
    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0):
        raise ConfigError(f"count must be None or an int >= 0 (got {count!r})")
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise FormatError(f"token data must be bytes-like (got {type(data).__name__})") from None
    r = Reader(buf, what="token stream")
    if r.bytes(len(MAGIC)) != MAGIC:
        raise FormatError("token stream: bad magic (not SKVTOK data)")
    version = r.u8()
    if version != FORMAT_VERSION:
        raise FormatError(f"token stream: unknown version {version}")
    esc = r.u8()
    if chr(esc) not in _ESCAPES:
        raise FormatError(f"token stream: invalid escape method byte {esc}")
    escape = chr(esc)
    digest = r.bytes(_DIGEST_SIZE)
    stored_v = r.uvarint(max_value=MAX_VOCAB)
    n = r.uvarint(max_value=max_count)
    if stored_v != v:
        raise FormatError(f"token stream: coded with vocab_size {stored_v}, decoding with {v}")
    if digest != trie_digest(trie):
        raise FormatError("token stream: coded with a different token trie (digest mismatch)")
    if r.remaining() % 4:
        raise FormatError(f"token stream: payload of {r.remaining()} bytes is not whole u32 words")
    words = r.array("<u4", r.remaining() // 4)
    k = n if count is None else int(count)
    if k > n:
        raise ConfigError(f"count {k} exceeds the {n} stored tokens")
    out = np.zeros(k, dtype=np.int32)
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        i = 0
        on_trie = True  # out[:i] is a full path of the trie
        while i < k:
            probs = trie.next_token_probs(out[:i], v, escape)
            out[i] = dec.decode(_model(probs, True))
            i += 1
            if on_trie and trie.count(out[:i]) == 0:
                on_trie = False
            if not on_trie:
                # every later position sees the node at out[:i - 1]: decode the tail in one go
                if i < k:
                    out[i:] = dec.decode(_model(probs, False), k - i)
                break
        exhausted = dec.maybe_exhausted()
    except FormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - constriction rejects impossible streams with AssertionError etc.
        raise FormatError(f"token stream: invalid coded data ({type(exc).__name__}: {exc})") from None
    if k == n and not exhausted:
        raise FormatError("token stream: coded data does not end where expected (corrupt or mismatched)")
    if int(out.min(initial=0)) < 0 or int(out.max(initial=0)) >= v:  # cannot happen with a valid model
        raise FormatError("token stream: decoded a token outside the vocabulary")
    return out.tolist()
