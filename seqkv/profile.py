"""Model profiles: the calibrated, per-model side of the lossy codec.

A profile holds, for every layer and kind (keys pre-RoPE, values):

- ``mean`` and ``basis``: a KLT (PCA) over the concatenated KV heads of the layer,
  components sorted by decreasing variance (``eigvals``);
- ``weights``: the relative importance of each component (mean 1), from how
  strongly the model's queries (keys) or output projection (values) read it;
- ``sensitivity``: the model's mean KL per unit of white-noise power per element
  added to that tensor, measured on real text;
- ``cross`` (layers >= 1): the least-squares map from the previous layer's KLT
  coefficients (same kind) to this layer's, for cross-layer prediction.

plus ``kl_gain``, the measured ratio of true to predicted KL, and (optional, ``kl_check``) that prediction's
error on held-out calibration text (:mod:`seqkv.kl_prediction_check`).  Profiles are
shared by all caches of a model, like the weights; containers refer to one by
the SHA-256 of its codec part (``Profile.codec_hash``) and decoding refuses any
other profile.

Optionally (profile version 2), the TriAttention pruner's calibration (pre-RoPE
query centres, :class:`seqkv.pruning.TriCalibration`), so a model is calibrated
once for both.  It is not part of the codec: a version-2 profile has the same
``codec_hash`` as the version-1 profile it extends, so containers encoded with
either decode with either.  A profile without it is written as version 1, byte
for byte as before.

File format: a safetensors file (tensors ``layer.{i}.{kind}.{mean,basis,eigvals,weights}``
and ``layer.{i}.{kind}.cross`` for i >= 1, float32; version 2 adds ``triattention.{mean_re,mean_im,mean_abs}``)
whose ``__metadata__`` has one key, ``seqkv_profile``, a JSON object (see ``docs/format.md``, "Profile files").
No pickle.

Compact files (``Profile.save(path, compact=True)``; what seqkv ships, :mod:`seqkv.shipped_profiles`):
the same profile file, losslessly packed: ``COMPACT_MAGIC`` (8 bytes), the SHA-256 of the profile file (32
bytes), its length (uint64 little-endian), then one zstd frame of the file with every float32 of the tensor
data byte-shuffled (the four bytes of each float in four planes).  Loading one unpacks it and checks the
SHA-256, so a compact file always loads to the same profile file bytes, and so the same ``codec_hash``.
:meth:`Profile.rounded` makes the bytes worth packing: it keeps fewer mantissa bits in the bases and
cross-layer maps (a new profile, with its own hash), whose zeroed low bytes zstd then drops.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import torch
import zstandard

from .errors import ConfigError, ModelMismatchError
from .kl_prediction_check import KLPredictionCheck
from .layout import ModelLayout
from .tri_calibration import TriCalibration

PROFILE_FORMAT = "seqkv-profile"
PROFILE_VERSION = 1                 # the codec part alone
PROFILE_VERSION_TRIATTENTION = 2    # + the TriAttention calibration (optional tensors)
TRIATTENTION_TENSORS = ("mean_re", "mean_im", "mean_abs")
KINDS = ("keys", "values")
MAX_PROFILE_BYTES = 1 << 31
MAX_METADATA_BYTES = 1 << 24
COMPACT_MAGIC = b"SKVPRFZ\x01"   # a compact (packed) profile file, format 1
COMPACT_HEAD = len(COMPACT_MAGIC) + 32 + 8
COMPACT_ZSTD_LEVEL = 19


class ProfileError(ConfigError):
    """A profile file is malformed, of an unknown version, or inconsistent with itself."""


class ProfileMismatchError(ModelMismatchError):
    """A container needs a different profile than the one given (or one that was not given)."""


@dataclass
class LayerKindProfile:
    mean: torch.Tensor       # [n] float32, n = kv_heads * head_dim
    basis: torch.Tensor      # [n, n] float32, columns = components
    eigvals: torch.Tensor    # [n] float32, variance of each component on the calibration text
    weights: torch.Tensor    # [n] float32, relative importance, mean 1
    sensitivity: float       # KL per unit noise power per element
    cross: torch.Tensor | None = None  # [n, n]: z_layer ~= cross @ z_(layer-1) (same kind); None for layer 0
    # values derived from the fields above, computed once and kept by the stages that use them (the quantizer's
    # steps per scale: seqkv.stages.quantize_klt.component_steps); each entry checks the fields it came from
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def steps(self, scale: float) -> torch.Tensor:
        """Per-component quantizer steps for the global knob ``scale`` (equal weighted distortion slope)."""
        return scale / torch.sqrt(self.sensitivity * self.weights).clamp_min(1e-12)


@dataclass
class Profile:
    layout: ModelLayout
    sink_tokens: int
    parts: dict                       # (layer, kind) -> LayerKindProfile
    kl_gain: float = 1.0              # true KL / linear-model KL, measured at calibration
    info: dict = field(default_factory=dict)  # calibration facts (texts, tokens, date), for humans
    triattention: object = field(default=None, repr=False)  # seqkv.pruning.TriCalibration or None (version 2)
    # the KL model's held-out error, measured by calibration (seqkv.kl_prediction_check); None in profiles made
    # before it was (or from one text): no error bar
    kl_check: KLPredictionCheck | None = field(default=None, repr=False)
    _bytes: bytes | None = field(default=None, repr=False, compare=False)
    _codec_bytes: bytes | None = field(default=None, repr=False, compare=False)
    _digests: dict = field(default_factory=dict, repr=False, compare=False)  # id(bytes) -> (bytes, sha256 hex)

    # -- identity ---------------------------------------------------------------------------
    def changed(self) -> None:
        """Call after editing fields in place: the cached file bytes (and so the hash) are rebuilt."""
        self._bytes = None
        self._codec_bytes = None
        self._digests.clear()

    def codec_bytes(self) -> bytes:
        """The codec part as a version-1 profile file: what containers refer to."""
        if self._codec_bytes is None:
            if self._bytes is not None and self.triattention is None:
                self._codec_bytes = self._bytes   # a version-1 file is its own codec part
            else:
                tensors, meta = self._codec_tensors_and_meta()
                self._codec_bytes = _save(tensors, meta)
        return self._codec_bytes

    def _codec_tensors_and_meta(self):
        tensors = {}
        for (layer, kind), p in sorted(self.parts.items()):
            for name in ("mean", "basis", "eigvals", "weights", "cross"):
                if getattr(p, name) is not None:
                    tensors[f"layer.{layer}.{kind}.{name}"] = getattr(p, name).to(torch.float32).contiguous()
        meta = {
            "format": PROFILE_FORMAT, "version": PROFILE_VERSION,
            "model": self.layout.to_json(), "sink_tokens": self.sink_tokens, "kl_gain": self.kl_gain,
            "sensitivity": {f"{layer}.{kind}": p.sensitivity for (layer, kind), p in sorted(self.parts.items())},
            "info": self.info,
        }
        if self.kl_check is not None:   # optional: a profile without it is written byte for byte as before
            meta["kl_prediction_check"] = self.kl_check.to_json()
        return tensors, meta

    def to_bytes(self) -> bytes:
        if self._bytes is None:
            if self.triattention is None:
                self._bytes = self.codec_bytes()
            else:
                tensors, meta = self._codec_tensors_and_meta()
                cal = self.triattention
                for name in TRIATTENTION_TENSORS:
                    tensors[f"triattention.{name}"] = getattr(cal, name).to(torch.float32).contiguous()
                codec = self.codec_bytes()
                meta.update(version=PROFILE_VERSION_TRIATTENTION,
                            triattention={"tokens": int(cal.tokens), "codec_sha256": hashlib.sha256(codec).hexdigest(),
                                          "codec_bytes": len(codec)})
                self._bytes = _save(tensors, meta)
        return self._bytes

    @property
    def hash(self) -> str:
        """SHA-256 of the whole file."""
        return self._sha256(self.to_bytes())

    def _sha256(self, data: bytes) -> str:
        # every encode and decode checks the hash: hash the 17 MB once per file image, not per call
        hit = self._digests.get(id(data))
        if hit is None or hit[0] is not data:
            hit = self._digests[id(data)] = (data, hashlib.sha256(data).hexdigest())
        return hit[1]

    @property
    def nbytes(self) -> int:
        return len(self.to_bytes())

    @property
    def codec_hash(self) -> str:
        """SHA-256 of the codec part (the file itself for a version-1 profile): what containers record."""
        return self._sha256(self.codec_bytes())

    def ref(self) -> dict:
        """What a container records about the profile it was encoded with: its codec part."""
        return {"sha256": self.codec_hash, "bytes": len(self.codec_bytes())}

    def with_triattention(self, calibration) -> "Profile":
        """A copy of this profile that also carries ``calibration`` (a TriCalibration of the same model);
        its ``codec_hash`` is this profile's, so every container made with one decodes with the other."""
        _check_triattention(calibration, self.layout, "the TriAttention calibration")
        return Profile(self.layout, self.sink_tokens, self.parts, self.kl_gain, dict(self.info), calibration,
                       kl_check=self.kl_check, _codec_bytes=self.codec_bytes())

    def rounded(self, basis_bits: int = 14, cross_bits: int = 10) -> "Profile":
        """A copy whose KLT bases keep ``basis_bits`` and cross-layer maps ``cross_bits`` of float32's 23
        explicit mantissa bits (round to nearest, ties to even, on the bit pattern: exact and the same on
        every machine); means, eigenvalues, weights and sensitivities are kept.  The low bytes become zero,
        so a compact file (``save(path, compact=True)``) of it is about half the size.  It is a new profile
        with its own ``codec_hash`` (its ``info["rounded"]`` names the one it came from), checked like a
        loaded one (14 bits keep the bases orthonormal to about 3e-5; the check allows 1e-4)."""
        for bits in (basis_bits, cross_bits):
            if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 23:
                raise ConfigError(f"mantissa bits must be an int in [1, 23], got {bits!r}")
        parts = {key: LayerKindProfile(p.mean, round_mantissa(p.basis, basis_bits), p.eigvals, p.weights,
                                       p.sensitivity, None if p.cross is None else round_mantissa(p.cross, cross_bits))
                 for key, p in self.parts.items()}
        info = dict(self.info, rounded={"basis_mantissa_bits": basis_bits, "cross_mantissa_bits": cross_bits,
                                        "from_codec_sha256": self.codec_hash})
        out = Profile(self.layout, self.sink_tokens, parts, self.kl_gain, info, self.triattention, kl_check=self.kl_check)
        return Profile.from_bytes(out.to_bytes(), what="the rounded profile")

    def save(self, path: str | os.PathLike, compact: bool = False) -> None:
        """Write the profile file (or, with ``compact``, its packed form: see the module docstring)."""
        data = self.to_bytes()
        if compact:
            data = pack_profile_bytes(data)
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        try:
            size = os.path.getsize(path)
            if size > MAX_PROFILE_BYTES:
                raise ProfileError(f"{path}: {size} bytes is over the {MAX_PROFILE_BYTES}-byte cap for profiles")
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc}") from None
        return cls.from_bytes(data, what=os.fspath(path))

    @classmethod
    def from_bytes(cls, data: bytes, what: str = "profile") -> "Profile":
        """A profile from the bytes of a profile file, plain or compact."""
        data = bytes(data)
        if data[:len(COMPACT_MAGIC)] == COMPACT_MAGIC:
            data = unpack_profile_bytes(data, what)
        meta, tensors = _read_safetensors(data, what)
        if meta.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{what}: not a seqkv profile (format {meta.get('format')!r})")
        version = meta.get("version")
        if version not in (PROFILE_VERSION, PROFILE_VERSION_TRIATTENTION) or isinstance(version, bool):
            raise ProfileError(f"{what}: profile version {version!r} is unknown to this seqkv "
                               f"(it reads versions {PROFILE_VERSION} and {PROFILE_VERSION_TRIATTENTION})")
        try:
            layout = ModelLayout.from_json(meta["model"])
            sinks, gain = meta["sink_tokens"], float(meta["kl_gain"])
            sens = {k: float(v) for k, v in meta["sensitivity"].items()}
            info = dict(meta.get("info", {}))
        except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as exc:
            raise ProfileError(f"{what}: invalid profile metadata: {exc}") from None
        if not isinstance(sinks, int) or isinstance(sinks, bool) or not 0 <= sinks <= 1 << 20:
            raise ProfileError(f"{what}: invalid sink_tokens {sinks!r}")
        if not (math.isfinite(gain) and 0 < gain < 1e6):
            raise ProfileError(f"{what}: invalid kl_gain {gain!r}")
        n = layout.kv_heads * layout.head_dim
        parts = {}
        for layer in range(layout.layers):
            for kind in KINDS:
                key = f"layer.{layer}.{kind}"
                try:
                    p = LayerKindProfile(*(tensors[f"{key}.{name}"] for name in ("mean", "basis", "eigvals", "weights")),
                                         sensitivity=sens[f"{layer}.{kind}"])
                except KeyError as exc:
                    raise ProfileError(f"{what}: missing {exc}") from None
                if layer > 0:
                    if f"{key}.cross" not in tensors:
                        raise ProfileError(f"{what}: missing '{key}.cross'")
                    p.cross = tensors[f"{key}.cross"]
                    if tuple(p.cross.shape) != (n, n) or not bool(torch.isfinite(p.cross).all()):
                        raise ProfileError(f"{what}: {key}.cross must be a finite [{n}, {n}] matrix")
                shapes = [tuple(p.mean.shape), tuple(p.basis.shape), tuple(p.eigvals.shape), tuple(p.weights.shape)]
                if shapes != [(n,), (n, n), (n,), (n,)]:
                    raise ProfileError(f"{what}: {key} has shapes {shapes}, expected [{n}], [{n},{n}], [{n}], [{n}]")
                if not all(bool(torch.isfinite(t).all()) for t in (p.mean, p.basis, p.eigvals, p.weights)):
                    raise ProfileError(f"{what}: {key} holds NaN or Inf")
                if not (math.isfinite(p.sensitivity) and p.sensitivity > 0) or bool((p.weights <= 0).any()):
                    raise ProfileError(f"{what}: {key} has a non-positive sensitivity or weight")
                # the decoder inverts the KLT with the transpose: the basis must be orthonormal
                err = (p.basis.double().T @ p.basis.double() - torch.eye(n, dtype=torch.float64)).abs().max()
                if float(err) > 1e-4:
                    raise ProfileError(f"{what}: {key} basis is not orthonormal (error {float(err):.2g})")
                parts[(layer, kind)] = p
        profile = cls(layout=layout, sink_tokens=sinks, parts=parts, kl_gain=gain, info=info, _bytes=bytes(data),
                      kl_check=_read_kl_check(meta, what))
        has_tri = "triattention" in meta or any(name.startswith("triattention.") for name in tensors)
        if version == PROFILE_VERSION:
            if has_tri:
                raise ProfileError(f"{what}: a version-1 profile cannot hold a TriAttention calibration")
            return profile
        profile.triattention = _read_triattention(meta, tensors, layout, what)
        # the codec part must be the one the file says: containers refer to it by that hash
        tri = meta["triattention"]
        if profile.codec_hash != tri["codec_sha256"] or len(profile.codec_bytes()) != tri["codec_bytes"]:
            raise ProfileError(f"{what}: its codec part does not match the codec_sha256 it records")
        return profile

    # -- checks -------------------------------------------------------------------------------
    def check_model(self, layout: ModelLayout) -> None:
        self.layout.check_same_model(layout, what="profile")

    def check_ref(self, ref) -> None:
        """Raise ProfileMismatchError unless this profile is the one a container recorded."""
        if not isinstance(ref, dict) or ref.get("sha256") != self.codec_hash:
            want = ref.get("sha256", "?") if isinstance(ref, dict) else "?"
            raise ProfileMismatchError(
                f"the container was encoded with profile sha256 {str(want)[:16]}…, but the given profile is "
                f"{self.codec_hash[:16]}…: pass the profile it was encoded with"
            )

    def predicted_kl(self, mse: dict) -> float:
        """The linear model: kl_gain * sum over tensors of sensitivity * weighted MSE per element."""
        return self.kl_gain * sum(self.parts[k].sensitivity * v for k, v in mse.items())


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 ``t`` with ``bits`` explicit mantissa bits (round to nearest, ties to even), exactly."""
    u = t.to(torch.float32).contiguous().numpy().view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    if drop > 0:
        u = ((u + (1 << (drop - 1)) - 1 + ((u >> drop) & 1)) >> drop) << drop
    return torch.from_numpy(u.astype(np.uint32).view(np.float32).reshape(t.shape).copy())


def _tensor_data_start(data: bytes) -> int:
    """Where a safetensors file's tensor data begins (8 + header length), clamped to the file."""
    if len(data) < 8:
        return len(data)
    return min(len(data), 8 + struct.unpack("<Q", data[:8])[0])


def _shuffle4(body: bytes, inverse: bool = False) -> bytes:
    """The bytes of each 4-byte word in four planes (or back); a tail of < 4 bytes stays as it is."""
    whole = len(body) - len(body) % 4
    a = np.frombuffer(body, dtype=np.uint8, count=whole)
    a = a.reshape(4, -1).T if inverse else a.reshape(-1, 4).T
    return a.tobytes() + bytes(body[whole:])


def pack_profile_bytes(data: bytes, level: int = COMPACT_ZSTD_LEVEL) -> bytes:
    """The compact form of a profile file's bytes (lossless; see the module docstring)."""
    data = bytes(data)
    start = _tensor_data_start(data)
    frame = zstandard.ZstdCompressor(level=level).compress(data[:start] + _shuffle4(data[start:]))
    return COMPACT_MAGIC + hashlib.sha256(data).digest() + struct.pack("<Q", len(data)) + frame


def unpack_profile_bytes(data: bytes, what: str = "profile") -> bytes:
    """The profile file a compact one holds, checked against the SHA-256 and length it records."""
    if len(data) < COMPACT_HEAD or data[:len(COMPACT_MAGIC)] != COMPACT_MAGIC:
        raise ProfileError(f"{what}: not a compact seqkv profile")
    digest = data[len(COMPACT_MAGIC):len(COMPACT_MAGIC) + 32]
    (size,) = struct.unpack("<Q", data[COMPACT_HEAD - 8:COMPACT_HEAD])
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(f"{what}: {size} bytes unpacked is over the {MAX_PROFILE_BYTES}-byte cap for profiles")
    try:
        packed = zstandard.ZstdDecompressor().decompress(data[COMPACT_HEAD:], max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ProfileError(f"{what}: corrupt compact profile ({exc})") from None
    if len(packed) != size:
        raise ProfileError(f"{what}: compact profile unpacks to {len(packed)} bytes, its header says {size}")
    start = _tensor_data_start(packed)
    out = packed[:start] + _shuffle4(packed[start:], inverse=True)
    if hashlib.sha256(out).digest() != digest:
        raise ProfileError(f"{what}: compact profile does not unpack to the SHA-256 it records")
    return out


def _save(tensors: dict, meta: dict) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"seqkv_profile": json.dumps(meta, sort_keys=True)})


def _check_triattention(cal, layout: ModelLayout, what: str) -> None:
    """A TriAttention calibration must fit the model: [layers, query heads, head_dim / 2], finite, E|q| >= 0."""
    if not isinstance(cal, TriCalibration):
        raise ProfileError(f"{what} must be a seqkv.pruning.TriCalibration, got {type(cal).__name__}")
    shape = tuple(cal.mean_re.shape)
    if not (len(shape) == 3 and shape[0] == layout.layers and shape[2] * 2 == layout.head_dim
            and shape[1] >= layout.kv_heads and shape[1] % layout.kv_heads == 0):
        raise ProfileError(f"{what} has shape {shape}; this model needs [{layout.layers}, a multiple of "
                           f"{layout.kv_heads} query heads, {layout.head_dim // 2}]")
    if not all(tuple(getattr(cal, n).shape) == shape and bool(torch.isfinite(getattr(cal, n)).all())
               for n in TRIATTENTION_TENSORS):
        raise ProfileError(f"{what}: mean_re / mean_im / mean_abs must be finite tensors of one shape")
    if bool((cal.mean_abs < 0).any()):
        raise ProfileError(f"{what}: mean_abs (E|q|) must be >= 0")
    if not isinstance(cal.tokens, int) or isinstance(cal.tokens, bool) or cal.tokens < 1:
        raise ProfileError(f"{what}: tokens must be a positive int, got {cal.tokens!r}")
    if cal.fingerprint and layout.fingerprint and cal.fingerprint != layout.fingerprint:
        raise ProfileError(f"{what} was made for a different model than the profile's")
    if layout.has_rope and not torch.allclose(cal.inv_freq.double(), torch.as_tensor(layout.inv_freq_array()).double(),
                                              rtol=1e-6, atol=0):
        raise ProfileError(f"{what} has other RoPE frequencies than the profile's model")


def _read_kl_check(meta: dict, what: str) -> KLPredictionCheck | None:
    """The optional held-out check of the KL model (``kl_prediction_check``); None when the file has none."""
    if "kl_prediction_check" not in meta:
        return None
    try:
        return KLPredictionCheck.from_json(meta["kl_prediction_check"])
    except ConfigError as exc:
        raise ProfileError(f"{what}: {exc}") from None


def _read_triattention(meta: dict, tensors: dict, layout: ModelLayout, what: str):
    """The TriCalibration of a version-2 profile; RoPE parameters and fingerprint come from its layout."""
    try:
        tri = meta["triattention"]
        tokens, codec_sha, codec_len = tri["tokens"], tri["codec_sha256"], tri["codec_bytes"]
        t = {n: tensors[f"triattention.{n}"] for n in TRIATTENTION_TENSORS}
    except (KeyError, TypeError) as exc:
        raise ProfileError(f"{what}: a version-2 profile needs its TriAttention part: missing {exc}") from None
    if not (isinstance(codec_sha, str) and len(codec_sha) == 64) or not isinstance(codec_len, int) or isinstance(codec_len, bool):
        raise ProfileError(f"{what}: invalid triattention codec_sha256 / codec_bytes")
    cal = TriCalibration(**t, inv_freq=torch.as_tensor(layout.inv_freq_array()),
                         attention_scaling=float(layout.rope_attention_scaling), fingerprint=layout.fingerprint,
                         tokens=tokens)
    _check_triattention(cal, layout, f"{what}: triattention")
    return cal


def _read_safetensors(data: bytes, what: str):
    """Parse a safetensors byte string by hand: bounded header, float32 tensors only."""
    if len(data) < 8:
        raise ProfileError(f"{what}: truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(MAX_METADATA_BYTES, len(data) - 8):
        raise ProfileError(f"{what}: header length {header_len} is out of bounds")
    try:
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header.pop("__metadata__")["seqkv_profile"])
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{what}: not a seqkv profile file ({exc})") from None
    if not isinstance(meta, dict):
        raise ProfileError(f"{what}: profile metadata is not an object")
    body = memoryview(data)[8 + header_len:]
    tensors = {}
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], [int(s) for s in spec["shape"]], spec["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{what}: bad tensor entry {name!r}: {exc}") from None
        count = int(np.prod(shape)) if shape else 1
        if dtype != "F32" or not (0 <= begin <= end <= len(body)) or end - begin != 4 * count:
            raise ProfileError(f"{what}: tensor {name!r} is not a float32 tensor within the file")
        arr = np.frombuffer(body[begin:end], dtype="<f4").astype(np.float32).reshape(shape)
        tensors[name] = torch.from_numpy(arr)
    return meta, tensors
