"""Baseline codecs measured in the same run as seqkv: raw fp16, zstd-3, byte-shuffle + zstd-3."""
from __future__ import annotations

import numpy as np
import zstandard


def cache_bits(layers) -> np.ndarray:
    """The raw bytes of every layer's keys then values, as one uint8 array (the baselines' input)."""
    import torch

    parts = []
    for keys, values in layers:
        for x in (keys, values):
            parts.append(x.contiguous().view(torch.uint8).reshape(-1).numpy())
    return np.concatenate(parts)


def shuffle_bytes(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """All bytes 0 of each element, then all bytes 1, ... (blosc's shuffle filter)."""
    return np.ascontiguousarray(raw.reshape(-1, itemsize).T).reshape(-1)


def unshuffle_bytes(shuffled: np.ndarray, itemsize: int) -> np.ndarray:
    return np.ascontiguousarray(shuffled.reshape(itemsize, -1).T).reshape(-1)


def zstd_compress(raw: np.ndarray, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(raw.tobytes())


def zstd_decompress(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(blob)
