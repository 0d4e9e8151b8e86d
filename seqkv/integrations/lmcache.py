"""The ``"seqkv"`` serde of LMCache's distributed L2 storage (``lmcache.v1.distributed.serde``, LMCache 0.5.6).

    from seqkv.integrations.lmcache import register
    register()          # then an L2 adapter spec may say "serde": {"type": "seqkv", ...}

Serde options (the JSON ``"serde"`` object, less ``"type"``):

* ``model`` (required): a local Hugging Face model folder, its config.json, a .gguf file, or ``"embedded"``;
  ``gguf_file``: the GGUF file inside that folder, where the model is one (only the config is read);
* ``preset``: ``lossless`` (the default), ``near_lossless``, ``balanced`` or ``small``; or
* ``profile``: a calibrated profile file, or ``"shipped"`` (the profile seqkv ships for the model), with one
  rate target: ``target_kl`` (default 0.01) or ``scale``;
* ``positions``: ``"recover"`` (the default: each chunk's start is found from its keys with the calibrated
  profile, the given one or for a preset the model's shipped one, if any; see :mod:`.chunk_positions`) or
  ``"local"`` (every chunk is coded as if it started the sequence);
* ``packing``: ``"tokens"`` (the default: fused chunks hold each token's key then value per head) or
  ``"vllm_cpu_amx"`` (vLLM-CPU's AMX kernel pages, with ``block_size``, default 128; see :mod:`.chunk_layout`);
* ``max_workers``: serde threads (default 1), as LMCache's own serdes take.

Chunks come as ``[2, layers, tokens, heads*head_dim]`` or vLLM-CPU's fused ``[layers, tokens,
heads*2*head_dim]`` (:mod:`.chunk_layout`); each is written as one length-prefixed seqkv container
(:mod:`.chunk_blob`).  LMCache's own ``fs`` adapter cannot read such variable-size blobs back (it requires a
file as long as the buffer): use :mod:`.lmcache_fs`'s adapter, or any adapter that keeps blob sizes.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..errors import ConfigError, EncodeError
from ..presets import PRESETS
from ..profile import Profile
from ..shipped_profiles import find as find_shipped
from ..shipped_profiles import shipped_profile
from .chunk_blob import ChunkCodec
from .chunk_layout import (PACKINGS, VLLM_CPU_BLOCK_SIZE, ChunkGeometry, ChunkLayoutError, split_chunk,
                           write_chunk)
from .model_config import load_model_config

import lmcache
from lmcache.v1.distributed.serde import (AsyncSerdeProcessor, Deserializer, Serializer, get_registered_serde_types,
                                          register_serde_factory)
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

SERDE_TYPE = "seqkv"
SUPPORTED_LMCACHE = "0.5.6"     # the serde API this module is written and tested against (pyproject pins it)
OPTION_NAMES = ("model", "gguf_file", "preset", "profile", "target_kl", "scale", "positions")   # the codec's
SERDE_OPTION_NAMES = OPTION_NAMES + ("packing", "block_size", "max_workers")
SHIPPED = "shipped"

logger = logging.getLogger(__name__)


def check_option_names(options, allowed) -> None:
    """ConfigError unless ``options`` is a dict of ``allowed`` names (the codec's options are fewer)."""
    if not isinstance(options, dict):
        raise ConfigError(f"seqkv serde options must be a JSON object, got {type(options).__name__}")
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown seqkv serde option(s) {unknown}; known: {list(SERDE_OPTION_NAMES)}")


def codec_from_options(options: dict) -> ChunkCodec:
    """The chunk codec the serde options describe (see the module docstring); ConfigError on anything else."""
    check_option_names(options, OPTION_NAMES)
    if "model" not in options:
        raise ConfigError("the seqkv serde needs \"model\": a local model folder (with \"gguf_file\" for a GGUF), "
                          "its config.json, or \"embedded\"")
    config = load_model_config(options["model"], options.get("gguf_file"))
    preset, profile_arg = options.get("preset"), options.get("profile")
    positions = options.get("positions", "recover")
    targets = {k: options[k] for k in ("target_kl", "scale") if k in options}
    if profile_arg is None:
        if targets:
            raise ConfigError(f"{sorted(targets)} need a calibrated \"profile\" (a profile file or \"shipped\")")
        preset = "lossless" if preset is None else preset
        if preset not in PRESETS:
            raise ConfigError(f"unknown seqkv preset {preset!r}; choose one of {sorted(PRESETS)}, or a \"profile\"")
        # the shipped profile, if seqkv has one for this model, only finds where chunks start
        reference = shipped_profile(config=config) if find_shipped(config) is not None else None
        return ChunkCodec(config, preset=preset, positions=positions, reference=reference)
    if preset is not None:
        raise ConfigError("give the seqkv serde a \"preset\" or a \"profile\", not both")
    if profile_arg == SHIPPED:
        profile = shipped_profile(config=config)
    elif isinstance(profile_arg, str):
        profile = Profile.load(profile_arg)
    else:
        raise ConfigError(f"profile must be a profile file or \"shipped\", got {profile_arg!r}")
    return ChunkCodec(config, profile=profile, positions=positions, **targets)


class ChunkSerde:
    """What both directions hold: the chunk codec and the geometry of the chunks (default: the codec's model's,
    fused chunks packed per token)."""

    def __init__(self, codec: ChunkCodec, geometry: ChunkGeometry | None = None):
        self.codec = codec
        self.geometry = geometry or default_geometry(codec)


class SeqKVSerializer(ChunkSerde, Serializer):
    """KV chunk -> one length-prefixed seqkv container (LMCache's sync Serializer)."""

    def serialize(self, src, dst, key) -> int:
        tensor = _tensor_of(src, "source")
        shape = self.geometry.shape_of(tensor.shape, tensor.dtype)
        blob = self.codec.encode(split_chunk(tensor, shape))
        out = _tensor_of(dst, "destination").view(-1).view(torch.uint8)
        if len(blob) > out.numel():
            raise EncodeError(f"the blob of {len(blob)} bytes does not fit the {out.numel()}-byte buffer LMCache "
                              "gave (sized by estimate_serialized_size, which bounds every blob)")
        out.numpy()[:len(blob)] = np.frombuffer(blob, dtype=np.uint8)
        return len(blob)

    def estimate_serialized_size(self, layout_desc) -> int:
        """The lossless worst case: every blob of this serde fits it, lossy ones included (ChunkCodec)."""
        if len(layout_desc.shapes) != 1 or len(layout_desc.dtypes) != 1:
            raise ChunkLayoutError(f"the seqkv serde codes single-group KV chunks, got {len(layout_desc.shapes)} "
                                   "groups")
        dtype = layout_desc.dtypes[0]
        return self.codec.max_blob_bytes(self.geometry.shape_of(layout_desc.shapes[0], dtype), dtype)


class SeqKVDeserializer(ChunkSerde, Deserializer):
    """One length-prefixed seqkv container -> the KV chunk (LMCache's sync Deserializer)."""

    def deserialize(self, src, dst, key) -> None:
        out = _tensor_of(dst, "destination")
        shape = self.geometry.shape_of(out.shape, out.dtype)
        blob = _tensor_of(src, "source").view(-1).view(torch.uint8).numpy()
        write_chunk(out, shape, self.codec.decode(blob, shape, out.dtype))


def default_geometry(codec: ChunkCodec, packing: str = "tokens", block_size: int = VLLM_CPU_BLOCK_SIZE) -> ChunkGeometry:
    """The chunks of ``codec``'s model, fused ones packed as ``packing`` says."""
    if packing not in PACKINGS:
        raise ConfigError(f"packing must be one of {list(PACKINGS)}, got {packing!r}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 16:
        raise ConfigError(f"block_size must be an int >= 16, got {block_size!r}")
    layout = codec.layout
    return ChunkGeometry(layout.layers, layout.kv_heads, layout.head_dim, packing, block_size)


def _tensor_of(obj, what: str) -> torch.Tensor:
    tensor = getattr(obj, "tensor", None)
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"the {what} LMCache memory object holds no tensor (freed or not a tensor object)")
    if tensor.device.type != "cpu":
        raise ChunkLayoutError(f"the seqkv serde codes CPU buffers, the {what} is on {tensor.device}")
    return tensor


def memory_object(shape, dtype: torch.dtype) -> TensorMemoryObj:
    """A standalone LMCache memory object over a fresh CPU buffer, like those LMCache's L1 hands a serde: for
    tests, benchmarks and code that drives a serde by hand (its contents start undefined, as L1's do)."""
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    meta = MemoryObjMetadata(shape=shape, dtype=dtype, address=0, phy_size=nbytes, ref_count=1, shapes=[shape],
                             dtypes=[dtype])
    return TensorMemoryObj(torch.empty(nbytes, dtype=torch.uint8), meta, None)


def create_serde(options: dict) -> AsyncSerdeProcessor:
    """The serde factory LMCache calls with the ``"serde"`` object's options (less ``"type"``)."""
    check_option_names(options, SERDE_OPTION_NAMES)
    options = dict(options)
    workers = options.pop("max_workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"max_workers must be an int >= 1, got {workers!r}")
    packing = options.pop("packing", "tokens")
    block_size = options.pop("block_size", VLLM_CPU_BLOCK_SIZE)
    codec = codec_from_options(options)
    geometry = default_geometry(codec, packing, block_size)
    return AsyncSerdeProcessor(SeqKVSerializer(codec, geometry), SeqKVDeserializer(codec, geometry),
                               max_workers=workers)


def register() -> None:
    """Register the ``"seqkv"`` serde type with LMCache (again: no-op)."""
    if getattr(lmcache, "__version__", SUPPORTED_LMCACHE) != SUPPORTED_LMCACHE:
        logger.warning("seqkv's LMCache serde is tested with LMCache %s, this is %s", SUPPORTED_LMCACHE,
                       getattr(lmcache, "__version__", "?"))
    if SERDE_TYPE not in get_registered_serde_types():
        register_serde_factory(SERDE_TYPE, create_serde)
