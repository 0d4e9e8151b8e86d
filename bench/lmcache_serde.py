"""The seqkv serde inside LMCache, on the real model: bytes, time and quality per 256-token chunk.

SmolLM2-135M-Instruct (the embedded model) prefills P tokens of real text; its bf16 cache is cut into LMCache
chunks (``[2, layers, 256, heads*head_dim]``, or ``--layout fused``: vLLM-CPU's ``[layers, 256,
heads*2*head_dim]``), and every serde runs each chunk through LMCache's own factory and AsyncSerdeProcessor
(submit, then wait for the result), as LMCache's L2 store and load do:

* no serde (LMCache stores the chunk's bytes), LMCache's ``fp8`` serde (float8_e4m3fn), and zstd level 3 on the
  raw bytes (the speed baseline of docs: not an LMCache serde, timed directly);
* seqkv ``lossless``, ``balanced`` and the calibrated codec with the shipped profile (``target_kl=0.01``).

Per serde: bytes per chunk (every byte LMCache stores: the length prefix and container header included), the
ratio against the raw bf16 chunk, serialize and deserialize milliseconds per chunk and their ratio to fp8's
(same run), and the quality of the decoded cache (design.md §5: teacher-force C tokens after the decoded P,
mean KL against the exact cache, top-1 agreement).  Timings on a shared CPU are noisy: compare rows of one run.

    python bench/lmcache_serde.py --json docs/lmcache.json --markdown docs/lmcache_bench.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import zstandard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from seqkv.hf_adapter import build_cache  # noqa: E402
from seqkv.integrations.chunk_layout import ChunkShape, split_chunk, write_chunk  # noqa: E402
from seqkv.integrations.lmcache import memory_object, register  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402

DEFAULT_TEXT = os.path.join(ROOT, "bench", "texts_heldout", "gpl3.txt")
CHUNK = 256
SERDES = {   # name -> (LMCache serde type, its options); None: no serde
    "none": None,
    "fp8": ("fp8", {"fp8_dtype": "float8_e4m3fn"}),
    "seqkv lossless": ("seqkv", {"model": "embedded", "preset": "lossless"}),
    "seqkv balanced": ("seqkv", {"model": "embedded", "preset": "balanced"}),
    "seqkv calibrated": ("seqkv", {"model": "embedded", "profile": "shipped", "target_kl": 0.01}),
}


def cut_chunks(cache, kind: str) -> list[torch.Tensor]:
    """The cache as LMCache chunks of CHUNK tokens in ``kind`` layout."""
    layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    heads, tokens, dim = layers[0][0].shape
    out = []
    for start in range(0, tokens, CHUNK):
        n = min(CHUNK, tokens - start)
        shape = ChunkShape(kind, len(layers), n, heads, dim)
        dims = [2, len(layers), n, heads * dim] if kind == "kv" else [len(layers), n, heads * 2 * dim]
        chunk = torch.empty(dims, dtype=layers[0][0].dtype)
        write_chunk(chunk, shape, [(k[:, start:start + n], v[:, start:start + n]) for k, v in layers])
        out.append(chunk)
    return out


def join_chunks(chunks: list[torch.Tensor], kind: str, heads: int, dim: int):
    """The DynamicCache the chunks hold, in order."""
    per_chunk = []
    for chunk in chunks:
        layers = chunk.shape[1] if kind == "kv" else chunk.shape[0]
        tokens = chunk.shape[2] if kind == "kv" else chunk.shape[1]
        per_chunk.append(split_chunk(chunk, ChunkShape(kind, layers, tokens, heads, dim)))
    return build_cache([(torch.cat([c[i][0] for c in per_chunk], dim=1), torch.cat([c[i][1] for c in per_chunk], dim=1))
                        for i in range(len(per_chunk[0]))])


def wait(query, task_id) -> None:
    while True:
        result = query(task_id)
        if result is not None:
            if not result:
                raise RuntimeError("a serde task failed (see LMCache's log)")
            return
        time.sleep(0.0002)


def run_serde(serde, chunks: list[torch.Tensor]) -> dict:
    """Serialize and deserialize every chunk through the serde's AsyncSerdeProcessor."""
    from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
    from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor

    proc = create_serde_processor(SerdeConfig(serde[0], dict(serde[1])))
    key = ObjectKey(chunk_hash=b"\x01" * 32, model_name="bench", kv_rank=0)
    sizes, ser, de, outs = [], [], [], []
    try:
        for chunk in chunks:
            src = memory_object(chunk.shape, chunk.dtype)
            src.tensor.copy_(chunk)
            temp = memory_object([proc.estimate_serialized_size(MemoryLayoutDesc([chunk.shape], [chunk.dtype]))],
                                 torch.uint8)
            t0 = time.perf_counter()
            wait(proc.query_serialize_result, proc.submit_serialize([src], [temp], [key]))
            t1 = time.perf_counter()
            sizes.append(temp.get_size())   # LMCache narrows the buffer to the bytes written: what L2 stores
            out = memory_object(chunk.shape, chunk.dtype)
            t2 = time.perf_counter()
            wait(proc.query_deserialize_result, proc.submit_deserialize([temp], [out], [key]))
            t3 = time.perf_counter()
            ser.append(t1 - t0)
            de.append(t3 - t2)
            outs.append(out.tensor.clone())
    finally:
        proc.close()
    return {"sizes": sizes, "serialize_s": ser, "deserialize_s": de, "chunks": outs}


def run_zstd(chunks: list[torch.Tensor]) -> dict:
    sizes, ser, de, outs = [], [], [], []
    for chunk in chunks:
        raw = chunk.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        t0 = time.perf_counter()
        blob = zstandard.ZstdCompressor(level=3).compress(raw)
        t1 = time.perf_counter()
        back = zstandard.ZstdDecompressor().decompress(blob)
        t2 = time.perf_counter()
        sizes.append(len(blob))
        ser.append(t1 - t0)
        de.append(t2 - t1)
        outs.append(torch.frombuffer(bytearray(back), dtype=chunk.dtype).view(chunk.shape))
    return {"sizes": sizes, "serialize_s": ser, "deserialize_s": de, "chunks": outs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--tokens", type=int, default=2048, help="P: the prompt cut into chunks (default 2048)")
    p.add_argument("--continuation", type=int, default=256, help="C: teacher-forced tokens for the KL (default 256)")
    p.add_argument("--layout", choices=("kv", "fused"), default="kv")
    p.add_argument("--serdes", default=",".join(list(SERDES) + ["zstd-3"]),
                   help="comma-separated rows, of: " + ", ".join(list(SERDES) + ["zstd-3"]))
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads (default 1: on a shared CPU, more threads wait on each other)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads, user_api="blas"):   # numpy's BLAS runs the KLT products
        return run(args, argv)


def run(args, argv) -> int:
    register()
    from seqkv.embedded_model import load_embedded_model

    model, tok = load_embedded_model()
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    probe = QualityProbe(model, ids, prompt_len=args.tokens, continuation_len=args.continuation,
                         cache_dtype=torch.bfloat16)
    heads, _, dim = probe.cache.layers[0].keys[0].shape
    chunks = cut_chunks(probe.cache, args.layout)
    raw = chunks[0].numel() * chunks[0].element_size()
    rows = []
    for name in [s.strip() for s in args.serdes.split(",") if s.strip()]:
        if name == "zstd-3":
            result = run_zstd(chunks)
        elif name == "none":
            result = {"sizes": [c.numel() * c.element_size() for c in chunks], "serialize_s": [], "deserialize_s": [],
                      "chunks": chunks}
        else:
            result = run_serde(SERDES[name], chunks)
        quality = probe.score(join_chunks(result["chunks"], args.layout, heads, dim))
        row = {"serde": name, "bytes_per_chunk": statistics.mean(result["sizes"]),
               "chunk_bytes": result["sizes"],
               "serialize_ms": 1000 * statistics.mean(result["serialize_s"]) if result["serialize_s"] else None,
               "deserialize_ms": 1000 * statistics.mean(result["deserialize_s"]) if result["deserialize_s"] else None,
               "mean_kl": quality.mean_kl, "p99_kl": quality.p99_kl, "top1": quality.top1_agreement}
        row["ratio"] = raw / row["bytes_per_chunk"]
        rows.append(row)
        print(f"{name}: {row['bytes_per_chunk']:.0f} B/chunk ({row['ratio']:.2f}x), serialize "
              f"{row['serialize_ms'] or 0:.1f} ms, deserialize {row['deserialize_ms'] or 0:.1f} ms, "
              f"KL {quality.mean_kl:.5f}, top-1 {quality.top1_agreement:.4f}", flush=True)
    fp8 = next((r for r in rows if r["serde"] == "fp8"), None)
    for row in rows:
        for kind in ("serialize_ms", "deserialize_ms"):
            row[f"{kind[:-3]}_vs_fp8"] = (row[kind] / fp8[kind] if fp8 and row[kind] and fp8[kind] else None)
    meta = {"text": os.path.relpath(args.text, ROOT), "model": "SmolLM2-135M-Instruct (embedded GGUF)",
            "prompt_tokens": args.tokens, "continuation_tokens": args.continuation, "chunk_tokens": CHUNK,
            "layout": args.layout, "cache_dtype": "bfloat16", "raw_chunk_bytes": raw, "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "command": "python bench/lmcache_serde.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = markdown(rows, meta)
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)
    return 0


def markdown(rows: list[dict], meta: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    def times(v):
        return "-" if v is None else f"{v:.1f}x"

    lines = [f"{meta['model']}, {meta['text']}: {meta['prompt_tokens']} tokens cut into {meta['chunk_tokens']}-token "
             f"chunks ({meta['layout']} layout, bf16, {meta['raw_chunk_bytes']} raw bytes per chunk); quality over the "
             f"next {meta['continuation_tokens']} tokens.  `{meta['command']}`", "",
             "| serde | bytes/chunk | ratio vs bf16 | serialize ms/chunk | vs fp8 | deserialize ms/chunk | vs fp8 "
             "| mean KL | top-1 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['serde']} | {r['bytes_per_chunk']:.0f} | {r['ratio']:.2f}x | {ms(r['serialize_ms'])} | "
                     f"{times(r['serialize_vs_fp8'])} | {ms(r['deserialize_ms'])} | {times(r['deserialize_vs_fp8'])} | "
                     f"{r['mean_kl']:.5f} | {r['top1']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
