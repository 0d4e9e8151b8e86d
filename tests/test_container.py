import os
import json

import pytest

from seqkv.format.container import MAGIC, MAX_HEADER_BYTES, PREAMBLE, Container, pack_container
from seqkv.checksum import crc32c
from seqkv.errors import ChecksumError, FormatError, UnsupportedVersionError


def make(sections=(("a", b"hello"), ("b", b""), ("c", b"world!"))):
    return pack_container({"x": 1}, list(sections), 0, 0)


def test_round_trip_sections():
    c = Container(make())
    assert c.header["x"] == 1
    assert bytes(c.section("a")) == b"hello"
    assert bytes(c.section("b")) == b""
    assert bytes(c.section("c")) == b"world!"
    assert c.section_sizes() == {"a": 5, "b": 0, "c": 6}


def test_crc32c_known_vector():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


def _with_preamble(data: bytes, **changes) -> bytes:
    magic, major, minor, flags, hlen, hcrc = PREAMBLE.unpack_from(data, 0)
    vals = dict(magic=magic, major=major, minor=minor, flags=flags, hlen=hlen, hcrc=hcrc) | changes
    return PREAMBLE.pack(vals["magic"], vals["major"], vals["minor"], vals["flags"], vals["hlen"], vals["hcrc"]) + data[PREAMBLE.size:]


def test_reader_checks_in_order():
    data = make()
    with pytest.raises(FormatError, match="too short"):
        Container(data[:10])
    with pytest.raises(FormatError, match="magic"):
        Container(b"X" + data[1:])
    with pytest.raises(UnsupportedVersionError):
        Container(_with_preamble(data, major=2))
    # a newer minor means a feature this reader lacks (writers write the lowest minor they need)
    with pytest.raises(UnsupportedVersionError, match="newer"):
        Container(_with_preamble(data, minor=7))
    with pytest.raises(FormatError, match="reserved flag"):
        Container(_with_preamble(data, flags=2))  # bit 0 is PRUNED since 1.1; bit 1 is reserved
    with pytest.raises(FormatError, match="cap"):
        Container(_with_preamble(data, hlen=MAX_HEADER_BYTES + 1))
    with pytest.raises(FormatError, match="truncated"):
        Container(_with_preamble(data, hlen=len(data)))
    with pytest.raises(ChecksumError):
        Container(_with_preamble(data, hcrc=0))


def test_section_checksum_and_bounds():
    data = bytearray(make())
    data[-1] ^= 0x01
    c = Container(bytes(data))
    assert bytes(c.section("a")) == b"hello"  # other sections stay readable
    with pytest.raises(ChecksumError, match="'c'"):
        c.section("c")
    with pytest.raises(FormatError, match="truncated"):
        Container(make()[:-1])
    with pytest.raises(FormatError, match="trailing"):
        Container(make() + b"\0")
    with pytest.raises(FormatError, match="missing section"):
        Container(make()).section("zzz")


def test_malformed_section_table():
    def forge(table):
        header = json.dumps({"sections": table}).encode()
        return PREAMBLE.pack(MAGIC, 1, 0, 0, len(header), crc32c(header)) + header + b"abcd"

    for table in [None, [{"name": "a"}], [{"name": "a", "offset": 1, "length": 3, "crc32c": 0}],
                  [{"name": "a", "offset": 0, "length": 2, "crc32c": 0}, {"name": "a", "offset": 2, "length": 2, "crc32c": 0}],
                  [{"name": "a", "offset": 0, "length": -4, "crc32c": 0}]]:
        with pytest.raises(FormatError):
            Container(forge(table))
    header = b"[1,2]"
    with pytest.raises(FormatError, match="object"):
        Container(PREAMBLE.pack(MAGIC, 1, 0, 0, len(header), crc32c(header)) + header)
    header = b"\xff\xfe"
    with pytest.raises(FormatError, match="JSON"):
        Container(PREAMBLE.pack(MAGIC, 1, 0, 0, len(header), crc32c(header)) + header)


def test_preamble_minor_must_match_the_contents():
    """The minor byte is outside every checksum: a 1.0 container claiming 1.1 (or the reverse) is refused."""
    import seqkv
    from seqkv.errors import DecodeError

    golden = os.path.join(os.path.dirname(__file__), "golden")
    with open(os.path.join(golden, "v1_0_balanced_fp16.skv"), "rb") as f:
        old = f.read()
    with pytest.raises(DecodeError, match="preamble says format 1.1"):
        seqkv.decode(_with_preamble(old, minor=1))
    with open(os.path.join(golden, "v1_1_calibrated_fp16.skv"), "rb") as f:
        new = f.read()
    profile = seqkv.Profile.load(os.path.join(golden, "v1_1_calibrated_fp16.profile.safetensors"))
    with pytest.raises(DecodeError, match="preamble says format 1.0"):
        seqkv.decode(_with_preamble(new, minor=0), profile=profile)
