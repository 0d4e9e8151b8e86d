"""The envelope of a prefix-store entry: ``MAGIC | u32 header length | JSON header | chunk payload``.

docs/format.md §10 ("Store entries") is the specification: the header's fields, and what every read
checks.  The header names a residual's reference record ``base_ref`` (``<referrer key>.<16 hex nonce>``,
docs/format.md §10.2); :func:`ref_nonce` makes the nonce, :func:`ref_age` reads its creation time back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time

MAGIC = b"SKVSTORE\x01"
ENVELOPE_VERSION = 2
MAX_HEADER_BYTES = 1 << 24

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# ``<base>/<base_ref>``: the reference record's name below ``refs/`` (docs/format.md §10.2)
_REF_RECORD = re.compile(r"^[0-9a-f]{64}/[0-9a-f]{64}\.[0-9a-f]{16}$")


def pack_entry(header: dict, payload: bytes) -> bytes:
    """The entry's bytes: the header as canonical JSON (sorted keys, no spaces), then the payload."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + payload


def unpack_entry(data: bytes, key: str):
    """(header, payload) of an entry stored under ``key``, or raise ValueError describing what is wrong."""
    data = bytes(data)
    if len(data) < len(MAGIC) + 4 or not data.startswith(MAGIC):
        raise ValueError("bad magic (not a seqkv store entry, or truncated)")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if n > MAX_HEADER_BYTES or start + n > len(data):
        raise ValueError("truncated envelope header")
    try:
        header = json.loads(data[start:start + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise ValueError(f"envelope header is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(header, dict) or header.get("v") != ENVELOPE_VERSION:
        raise ValueError("unknown envelope version")
    payload = data[start + n:]
    if header.get("payload_bytes") != len(payload):
        raise ValueError(f"payload has {len(payload)} bytes, the envelope says {header.get('payload_bytes')} (truncated?)")
    if header.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise ValueError("payload checksum mismatch")
    if header.get("key") != key:
        raise ValueError("entry stored under another key")
    for field in ("tokens_sha256", "prefix_sha256", "positions_sha256", "content", "namespace"):
        if not isinstance(header.get(field), str) or not _HEX64.match(header[field]):
            raise ValueError(f"envelope field {field!r} is invalid")
    for field in ("index", "start", "end"):
        v = header.get(field)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"envelope field {field!r} is invalid")
    base, ref = header.get("base"), header.get("base_ref")
    named = isinstance(base, str) and _HEX64.match(base) and isinstance(ref, str) and _REF_RECORD.match(f"{base}/{ref}")
    if (base is None) != (ref is None) or (base is not None and not named):
        raise ValueError("envelope base reference is invalid")
    return header, payload


def envelope_version(data: bytes):
    """The envelope version of ``data``, or None when it is not readable as an envelope."""
    try:
        (n,) = struct.unpack_from("<I", data, len(MAGIC))
        if not bytes(data[:len(MAGIC)]) == MAGIC or n > MAX_HEADER_BYTES:
            return None
        return json.loads(bytes(data[len(MAGIC) + 4:len(MAGIC) + 4 + n]).decode("utf-8")).get("v")
    except (struct.error, UnicodeDecodeError, ValueError, AttributeError, RecursionError):
        return None


def ref_nonce() -> str:
    """16 hex digits: the creation time in milliseconds (11) and 20 random bits (5); gc reads the age."""
    return f"{int(time.time() * 1000) & 0xFFFFFFFFFFF:011x}{os.urandom(3).hex()[:5]}"


def ref_age(ref_id: str, now: float) -> float:
    """Seconds since the reference record ``<referrer key>.<nonce>`` was made (ValueError/IndexError when
    the name is not one this version writes)."""
    return now - int(ref_id.rsplit(".", 1)[1][:11], 16) / 1000.0
