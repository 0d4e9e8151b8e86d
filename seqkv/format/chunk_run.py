"""Decoding a run of store chunks (consecutive chunks of one stored sequence) into one cache, in two steps.

1. :func:`decode_sections`, per chunk: everything that reads stored bytes (checksums, entropy decoding, the
   temporal and cross-layer predictors, dequantization, residuals against the chunk's base).  It stops
   before the inverse transforms, so each tensor is left in the transform domain: the exact sink tokens and
   the dequantized tokens after them.  A failure here belongs to that chunk (the store quarantines it).
2. :func:`assemble`, per layer and kind: the chunks' tokens side by side, then the pipeline's inverse
   transforms (KLT, RoPE), the dtype and the [H, T, D] layout once over all of them, written straight into
   the one tensor the cache holds.

Every transform works token by token (a token's KLT coefficients map to its own vector; RoPE rotates it at
its own position), so step 2 computes what restoring each chunk and concatenating would: one matrix product
and one rotation per layer and kind instead of one per chunk (8 chunks x 60 tensors for a 2048-token
SmolLM2 prompt in 256-token chunks), and no concatenation copy afterwards.  For a single chunk the two steps
are exactly :meth:`seqkv.format.pipeline.Pipeline.decode_tensor` and ``ContainerReader.chunk_layers`` (the
store's own decode-back and residual bases go this way, so what a put writes does not depend on how a hit is
assembled).  Over several chunks the floats are the same but where the BLAS library picks another kernel for
another matrix size (the last bit of a product may then differ).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..stages.base import CodingState, TensorContext
from .pipeline import KINDS, Pipeline
from .reader import ContainerReader
from .residual import decode_residual_parts


@dataclass
class ChunkSections:
    """One chunk decoded up to its inverse transforms.  ``tensors[i][j]`` (layer i, kind j) is
    ``(sinks, body)``: lossy, the exact sink tokens [H, s, D] and the dequantized tokens after them in the
    transform domain (any layout); lossless, ``(None, the tensor)``."""

    pipeline: Pipeline
    layout: object
    state: CodingState
    dtype: str
    shape: tuple          # (layers, kv_heads, tokens, head_dim)
    positions: torch.Tensor
    tensors: list

    def run_key(self) -> tuple:
        """What chunks restored together must share: the transforms, the model, the profile, dtype and shape."""
        transforms = json.dumps([t.get_config() for t in self.pipeline.transforms], sort_keys=True)
        layers, heads, _, dim = self.shape
        return (self.pipeline.lossless, transforms, self.layout, id(self.state.profile), self.dtype, layers, heads, dim)


def decode_sections(reader: ContainerReader, base=None) -> ChunkSections:
    """Step 1 for one store chunk.  ``base``: (layers, positions) of the base entry when the chunk has
    residual sections.  The reader's coding state keeps the last layer's reconstruction, as the encoder's."""
    h = reader.header
    base_layers, base_pos = reader.start_chunk(base, "decode_sections()")
    pipeline, state = reader.pipeline, reader.state
    shape = (h.kv_heads, h.tokens, h.head_dim)
    tensors = []
    for i in range(h.layers):
        pair = []
        for j, kind in enumerate(KINDS):
            ctx = TensorContext(layer=i, kind=kind, positions=reader.positions, layout=h.layout, state=state)
            if h.chunk.modes[2 * i + j] == "p":
                def decode(payload, ctx=ctx):
                    return plain_parts(pipeline, payload, ctx, h.dtype, shape)
            else:
                def decode(payload, ctx=ctx, i=i, j=j):
                    return decode_residual_parts(pipeline, payload, base_layers[i][j], ctx, base_pos, h.dtype, shape)
            pair.append(reader.decode_section(i, kind, decode))
        tensors.append(pair)
    return ChunkSections(pipeline, h.layout, state, h.dtype, (h.layers, *shape), reader.positions, tensors)


def plain_parts(pipeline: Pipeline, payload, ctx: TensorContext, dtype_name: str, shape) -> tuple:
    """A plain section up to its inverse transforms (``Pipeline.decode_tensor`` without ``restore``)."""
    if pipeline.lossless:
        return None, pipeline.decode_tensor(payload, ctx, dtype_name, shape)
    parts = pipeline.read_symbols(payload, ctx, dtype_name, shape)
    return parts.sinks, pipeline.quantizer.dequantize(torch.from_numpy(parts.symbols), parts.side, ctx)


def assemble(chunks: list) -> list:
    """Step 2: [(K, V)] of [H, tokens of all chunks, D] from the chunks' sections, in order.  Consecutive
    chunks are restored together unless a chunk has sink tokens (they start a new run) or another pipeline.
    Each chunk's tensors are released once its layer is built."""
    if not chunks:
        raise ConfigError("assemble() needs at least one chunk")
    keys = [c.run_key() for c in chunks]
    out = []
    for i in range(chunks[0].shape[0]):
        pair = []
        for j in range(len(KINDS)):
            runs, start = [], 0
            for c in range(1, len(chunks) + 1):
                if c == len(chunks) or keys[c] != keys[start] or _sink_count(chunks[c].tensors[i][j]):
                    runs.append(_restore(chunks[start:c], i, j))
                    start = c
            pair.append(runs[0] if len(runs) == 1 else torch.cat(runs, dim=1))
        out.append(tuple(pair))
        for c in chunks:
            c.tensors[i] = None
    return out


def _sink_count(part) -> int:
    return 0 if part[0] is None else part[0].shape[1]


def _restore(run: list, i: int, j: int) -> torch.Tensor:
    """One tensor from a run of chunks' sections (only the first may have sink tokens)."""
    first = run[0]
    bodies = [c.tensors[i][j][1] for c in run]
    if first.pipeline.lossless:
        return bodies[0] if len(bodies) == 1 else join_tokens(bodies)
    positions = first.positions if len(run) == 1 else torch.cat([c.positions for c in run])
    ctx = TensorContext(layer=i, kind=KINDS[j], positions=positions, layout=first.layout, state=first.state)
    return first.pipeline.restore(join_tokens(bodies), first.tensors[i][j][0], ctx, first.dtype)


def join_tokens(parts: list) -> torch.Tensor:
    """[H, T_k, D] tensors side by side along the tokens, in one copy that keeps a channel-major layout
    (tokens contiguous, as the KLT stage hands its coefficients over) when every part has it."""
    if len(parts) == 1:
        return parts[0]
    if not all(p.device.type == "cpu" and not p.requires_grad and p.dtype == parts[0].dtype for p in parts) \
            or parts[0].dtype == torch.bfloat16:
        return torch.cat(parts, dim=1)
    if all(p.stride(1) == 1 for p in parts):
        joined = np.concatenate([p.transpose(1, 2).numpy() for p in parts], axis=2)  # [H, D, sum T]
        return torch.from_numpy(joined).transpose(1, 2)
    return torch.from_numpy(np.concatenate([p.numpy() for p in parts], axis=1))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: two numpy reductions on the CPU (NaN and inf show in the extremes), one
    torch reduction elsewhere."""
    if not t.numel():
        return True
    if t.device.type == "cpu" and not t.requires_grad and t.dtype in (torch.float32, torch.float16):
        a = t.numpy()
        return bool(np.isfinite(a.max()) and np.isfinite(a.min()))
    return bool(torch.isfinite(t).all())
