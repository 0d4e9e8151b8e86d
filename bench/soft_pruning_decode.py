"""Decode time of a soft-pruned container against a uniform-step one, in one run (issue 13: >= 0.7x).

    python bench/soft_pruning_decode.py [--text T] [--repeat 7]

SmolLM2-135M-Instruct, the first 2048 tokens of the text (default the packaged psf_license.txt), fp16 cache,
shipped profile, ``target_kl=0.01`` closed loop with ``token_steps`` True and False; each container is
decoded ``--repeat`` times, alternating, and the medians are compared (zstd-3 decompression of the raw
cache bytes is timed alongside as the usual speed baseline).  One torch thread.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import zstandard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import seqkv  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.hf_adapter import cache_layers  # noqa: E402
from seqkv.quality import clone_cache, prefill  # noqa: E402
from seqkv.retrieval import PACKAGED_TEXT  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=PACKAGED_TEXT)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[:, :2048]
    cache = clone_cache(prefill(model, ids, 2048), dtype=torch.float16)
    blobs = {name: seqkv.encode(cache, model=model, profile=profile, target_kl=0.01, token_ids=ids[0], token_steps=on)
             for name, on in (("uniform", False), ("soft", True))}
    raw = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for kv in cache_layers(cache) for t in kv)
    packed = zstandard.ZstdCompressor(level=3).compress(raw)
    times = {name: [] for name in (*blobs, "zstd-3")}
    for _ in range(args.repeat):
        for name, blob in blobs.items():
            t0 = time.perf_counter()
            seqkv.decode(blob, profile=profile)
            times[name].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        zstandard.ZstdDecompressor().decompress(packed)
        times["zstd-3"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, blob in blobs.items():
        print(f"{name}: {len(blob)} bytes ({47185920 / len(blob):.2f}x), decode median {med[name] * 1e3:.0f} ms "
              f"({med[name] / med['zstd-3']:.1f}x zstd-3's decompression)")
    print(f"soft / uniform decode throughput: {med['uniform'] / med['soft']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
