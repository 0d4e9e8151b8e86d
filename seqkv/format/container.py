"""Container v1 framing: preamble, bounded JSON header, checksummed sections (the bytes only; what the header
and sections mean is :mod:`seqkv.format.header` and :mod:`seqkv.format.plan`).

See docs/format.md for the byte layout.  The reader checks, in this order:
length, magic, version, flags, header size cap, header checksum, header
schema, section bounds, and (when a section is read) its checksum.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from ..checksum import crc32c
from ..errors import ChecksumError, FormatError, UnsupportedVersionError

MAGIC = b"\x89SEQKV\r\n"          # 8 bytes; the high byte and CR/LF catch text-mode mangling
FORMAT_MAJOR = 1
FORMAT_MINOR = 4                     # 1.1 adds the PRUNED flag and the calibrated codec; 1.2 both in one container; 1.3 per-token steps (klt_uniform token_steps); 1.4 repeat prediction (temporal_ar repeat)
PREAMBLE = struct.Struct("<8sBBHII")  # magic, major, minor, flags, header_length, header_crc32c
PREAMBLE_SIZE = PREAMBLE.size        # 20
FLAG_PRUNED = 0x0001                 # since 1.1: per-layer kept positions, ragged per head (docs/format.md §9)
KNOWN_FLAGS = FLAG_PRUNED            # every other bit is reserved and must be zero
MAX_HEADER_BYTES = 1 << 20
MAX_SECTIONS = 1 << 16


@dataclass(frozen=True)
class Section:
    name: str
    offset: int   # from the first byte after the header
    length: int
    crc32c: int


def pack_container(header: dict, sections: list[tuple[str, bytes]], flags: int, minor: int) -> bytes:
    """The bytes of a container: preamble, ``header`` (without "sections") plus its section table, payloads.
    Only :func:`seqkv.format.writer.write_container` calls this; it decides the minor version."""
    if flags & ~KNOWN_FLAGS:
        raise ValueError(f"unknown container flags 0x{flags:04x}")
    if not 0 <= minor <= FORMAT_MINOR:
        raise ValueError(f"format 1.{minor} is not one this writer knows")
    table = []
    offset = 0
    for name, payload in sections:
        table.append({"name": name, "offset": offset, "length": len(payload), "crc32c": crc32c(payload)})
        offset += len(payload)
    full = dict(header, sections=table)
    header_bytes = json.dumps(full, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise FormatError(f"header of {len(header_bytes)} bytes exceeds the {MAX_HEADER_BYTES}-byte cap")
    preamble = PREAMBLE.pack(MAGIC, FORMAT_MAJOR, minor, flags, len(header_bytes), crc32c(header_bytes))
    return b"".join([preamble, header_bytes, *(payload for _, payload in sections)])


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is JSON, but no writer writes it: it would read as inf
        raise ValueError(f"number {text[:40]} is out of the double range")
    return value


def parse_header_json(raw: bytes) -> dict:
    """The header object (check 7): UTF-8 RFC 8259 JSON, so no NaN/Infinity literals and no number beyond the
    double range; nesting deeper than Python's recursion limit is refused like any other invalid JSON."""
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise FormatError("header must be a JSON object")
    return header


class Container:
    """A parsed, validated container; section payloads are checksummed on access."""

    def __init__(self, data):
        try:
            self.data = memoryview(data).cast("B")
        except (TypeError, ValueError) as exc:  # a non-contiguous or multi-dimensional buffer
            raise FormatError(f"container data must be a flat, contiguous byte string: {exc}") from None
        if self.data.ndim != 1:
            raise FormatError("container data must be a flat byte string")
        n = len(self.data)
        if n < PREAMBLE_SIZE:
            raise FormatError(f"too short for a seqkv container: {n} bytes (the preamble alone is {PREAMBLE_SIZE})")
        magic, major, minor, flags, header_len, header_crc = PREAMBLE.unpack_from(self.data, 0)
        if magic != MAGIC:
            raise FormatError("not a seqkv container (bad magic bytes)")
        if major != FORMAT_MAJOR:
            raise UnsupportedVersionError(
                f"container format {major}.{minor} is not supported by this seqkv (reads {FORMAT_MAJOR}.x)"
            )
        if minor > FORMAT_MINOR:
            # writers always write the lowest minor their features need: a newer minor means a feature
            # this reader does not know
            raise UnsupportedVersionError(
                f"container format {major}.{minor} was written by a newer seqkv (this one reads up to "
                f"{FORMAT_MAJOR}.{FORMAT_MINOR})"
            )
        self.version = (major, minor)
        if flags & ~KNOWN_FLAGS:
            raise FormatError(f"reserved flag bits are set (flags=0x{flags:04x})")
        self.flags = flags
        if header_len > MAX_HEADER_BYTES:
            raise FormatError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte cap")
        if PREAMBLE_SIZE + header_len > n:
            raise FormatError(f"truncated: header needs {header_len} bytes, {n - PREAMBLE_SIZE} present")
        header_bytes = self.data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len]
        if crc32c(header_bytes) != header_crc:
            raise ChecksumError("header checksum mismatch (the container is corrupted)")
        header = parse_header_json(bytes(header_bytes))
        self.header = header
        self.payload_start = PREAMBLE_SIZE + header_len
        self.sections = self._parse_sections(header.get("sections"), n - self.payload_start)
        self.total_bytes = n

    @staticmethod
    def _parse_sections(raw, available: int) -> dict[str, Section]:
        if not isinstance(raw, list) or len(raw) > MAX_SECTIONS:
            raise FormatError("header has no valid section table")
        out: dict[str, Section] = {}
        expected = 0
        for entry in raw:
            try:
                fields = [entry["offset"], entry["length"], entry["crc32c"]]
                if not isinstance(entry["name"], str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in fields):
                    raise TypeError("section fields must be a string name and integers")
                sec = Section(entry["name"], *fields)
            except (KeyError, TypeError, ValueError):
                raise FormatError(f"malformed section entry {str(entry)[:200]}") from None
            if sec.offset != expected or sec.length < 0:
                raise FormatError(f"section {sec.name!r} is not contiguous (offset {sec.offset}, expected {expected})")
            if sec.name in out:
                raise FormatError(f"duplicate section {sec.name!r}")
            expected = sec.offset + sec.length
            out[sec.name] = sec
        if expected != available:
            raise FormatError(
                f"section table covers {expected} bytes but {available} follow the header "
                f"({'truncated' if expected > available else 'trailing bytes'})"
            )
        return out

    def section(self, name: str) -> memoryview:
        sec = self.sections.get(name)
        if sec is None:
            raise FormatError(f"missing section {name!r}")
        start = self.payload_start + sec.offset
        payload = self.data[start:start + sec.length]
        if crc32c(payload) != sec.crc32c:
            raise ChecksumError(f"section {name!r} checksum mismatch (the container is corrupted)")
        return payload

    def section_sizes(self) -> dict[str, int]:
        return {name: sec.length for name, sec in self.sections.items()}
