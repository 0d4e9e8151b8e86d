"""Does a prefix-store hit pay?  Time to first token from a store hit against a full prefill, in one run.

    python bench/bench_store_hit.py [--text bench/texts_heldout/gpl3.txt] [--tokens 2048] [--threads 1]
                                    [--codecs balanced,calibrated] [--target-kl 0.01 | --scale S] [--repeat 3]
                                    [--cprofile DIR] [--json OUT]

On the embedded model (SmolLM2-135M-Instruct) and ``--tokens + 1`` tokens of a real text (default the PSF
licence shipped in seqkv/data/texts), it measures, side by side:

* ``prefill``: the model on all ``tokens + 1`` prompt tokens (what a miss costs);
* per codec (``balanced``; ``calibrated``: the shipped profile, the fixed scale ``scale_for_kl`` gives at
  ``--target-kl`` on this cache, or ``--scale``):
  * ``encode``: one whole-cache ``seqkv.encode`` of the first ``tokens`` tokens;
  * ``container_hit``: ``seqkv.decode`` of that container + prefill of the last prompt token;
  * ``put``: ``PrefixStore.put`` of the same tokens into an empty ``file://`` store (a temp dir);
  * ``store_hit``: ``longest_prefix`` on a store object opened afresh on that directory (the entries read,
    checked and decoded into one cache: ``store_lookup``) + prefill of the last prompt token
    (``store_rest_prefill``);
  and the speedups ``prefill / container_hit`` and ``prefill / store_hit``, and ``put / encode``.

Each of ``--repeat`` rounds measures the prefill and then every figure above, back to back in one process; a
speedup is the median over the rounds of that round's own ratio (figures taken minutes apart at most, so the
ratios hold on a loaded machine; the absolute seconds do not), the seconds reported are the best of the rounds.
The last token's logits after a store hit are compared with the full prefill's (top-1 agreement and max
|Δlogit|), and the hit's cache with each stored chunk decoded on its own (``hit_equals_chunk_by_chunk``), so
that a fast wrong hit shows.  ``--cprofile DIR`` also writes cProfile statistics (``DIR/{codec}_{put,hit}.txt``,
top 30 by cumulative time) of one put and one hit per codec.

``--threads`` sets torch's intra-op threads and numpy's BLAS threads alike.  On a 2-core machine shared with
other work, 2 threads make every multi-threaded operation wait for a second core (tens of milliseconds each
here, for the prefill as for the codec's many small operations): compare ratios at one setting only.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_TEXT = os.path.join(ROOT, "seqkv", "data", "texts", "psf_license.txt")
CHUNK_TOKENS = 256


def timed(fn):
    """(seconds, result) of one call of ``fn``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.no_grad()
def last_token_logits(model, ids: torch.Tensor, cache, n: int) -> torch.Tensor:
    """Prefill the prompt tokens after the first ``n`` on top of ``cache``; the last position's logits."""
    from seqkv.model_calls import with_cache

    pos = torch.arange(n, ids.shape[1]).unsqueeze(0)
    return model(ids[:, n:], **with_cache(model, cache), position_ids=pos, use_cache=True).logits[0, -1]


def hit_is_chunk_by_chunk(store, ids, cache, profile) -> bool:
    """Whether the hit's cache (its first ``len(ids)`` tokens: the model may have appended some since) is bit for
    bit each stored chunk decoded on its own by the container reader
    (``ContainerReader.chunk_layers``), concatenated: what the store returned before hits were assembled
    layer by layer over all chunks."""
    from seqkv.hf_adapter import cache_layers
    from seqkv.store.chunk_codec import ParsedChunk
    from seqkv.store.envelope import unpack_entry

    per_chunk = []
    for key in store.keys_for(ids, dtype=cache.layers[0].keys.dtype):
        reader = ParsedChunk(unpack_entry(store.backend.get(key), key)[1]).reader
        if profile is not None:
            reader.use_profile(profile)
        per_chunk.append(reader.chunk_layers())
    return all(torch.equal(got[:, :len(ids)], torch.cat([c[i][j] for c in per_chunk], dim=1))
               for i, pair in enumerate(cache_layers(cache)) for j, got in enumerate(pair))


def profiled(fn, path: str):
    """Run ``fn`` under cProfile; write the top 30 functions by cumulative time to ``path``."""
    prof = cProfile.Profile()
    out = prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(30)
    with open(path, "w") as f:
        f.write(text.getvalue())
    return out


def codec_setups(model, cache, names, target_kl: float, scale=None):
    """name -> (encode kwargs, PrefixStore kwargs)."""
    import seqkv
    from seqkv.store import scale_for_kl

    out = {}
    for name in names:
        if name == "calibrated":
            profile = seqkv.shipped_profile(model)
            if scale is None:
                scale = scale_for_kl(cache, profile, target_kl, model=model)
            out[name] = (dict(profile=profile, scale=scale), dict(profile=profile, codec_options={"scale": scale}))
        else:
            out[name] = (dict(preset=name), dict(preset=name))
    return out


def run(args) -> dict:
    import seqkv
    from seqkv.embedded_model import load_embedded_model
    from seqkv.quality import clone_cache, prefill

    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids[:, :args.tokens + 1]
    if ids.shape[1] != args.tokens + 1:
        raise SystemExit(f"{args.text} has only {ids.shape[1]} tokens; need {args.tokens + 1}")
    n = args.tokens
    id_list = ids[0].tolist()
    cache = prefill(model, ids, n)  # the stored prompt's cache, in the model's dtype (as cached_generate stores)
    setups = codec_setups(model, cache, args.codecs, args.target_kl, args.scale)
    rounds: list = []   # per round: {"prefill": s, codec: {figure: s}}
    checks: dict = {}
    roots = []

    @torch.no_grad()
    def full_prefill():
        return model(ids, use_cache=True).logits[0, -1]

    def open_store(root, kw):
        return seqkv.PrefixStore("file://" + root, model=model, chunk_tokens=CHUNK_TOKENS, **kw)

    # every round measures the prefill and then each codec's figures, so that each ratio compares figures
    # taken minutes apart at most, whatever the other load on the machine does meanwhile
    for r in range(args.repeat):
        row = {}
        row["prefill"], ref_logits = timed(full_prefill)
        for name, (enc_kw, store_kw) in setups.items():
            fig = row[name] = {}
            fig["encode"], blob = timed(lambda: seqkv.encode(cache, model=model, **enc_kw))
            fig["container_hit"], _ = timed(lambda: last_token_logits(
                model, ids, seqkv.decode(blob, model=model, profile=enc_kw.get("profile")), n))
            root = tempfile.mkdtemp(prefix="seqkv-bench-store-")
            roots.append(root)
            store = open_store(root, store_kw)
            stored = clone_cache(cache)
            fig["put"], put_info = timed(lambda: store.put(id_list[:n], stored))
            store.close()
            store = open_store(root, store_kw)  # a store opened afresh, as by another process
            fig["store_lookup"], (got, hit_cache) = timed(lambda: store.longest_prefix(id_list))
            if got != n:
                raise SystemExit(f"{name}: the store hit {got} tokens, expected {n}")
            fig["store_rest_prefill"], logits = timed(lambda: last_token_logits(model, ids, hit_cache, got))
            fig["store_hit"] = fig["store_lookup"] + fig["store_rest_prefill"]
            if r == 0:
                checks[name] = {
                    "container_bytes": len(blob), "store_bytes": put_info["bytes_written"],
                    "top1_agrees": bool(int(logits.argmax()) == int(ref_logits.argmax())),
                    "max_abs_logit_diff": float((logits - ref_logits).abs().max()),
                    "hit_equals_chunk_by_chunk": hit_is_chunk_by_chunk(store, id_list[:n], hit_cache,
                                                                       store_kw.get("profile"))}
                if "scale" in enc_kw:
                    checks[name]["scale"] = enc_kw["scale"]
            store.close()
        rounds.append(row)
        print(f"round {r + 1}: prefill {row['prefill']:.3f} s; " + "; ".join(
            f"{name} store hit {row[name]['store_hit']:.3f} s, container hit {row[name]['container_hit']:.3f} s, "
            f"put {row[name]['put']:.3f} s, encode {row[name]['encode']:.3f} s" for name in setups), flush=True)

    result = {"text": os.path.relpath(args.text, ROOT), "tokens": n + 1, "threads": args.threads,
              "repeat": args.repeat, "model": "SmolLM2-135M-Instruct (embedded GGUF)", "rounds": rounds,
              "prefill_s": min(row["prefill"] for row in rounds), "codecs": {}}
    for name in setups:
        best = {k: min(row[name][k] for row in rounds) for k in rounds[0][name]}
        out = dict(checks[name], **{f"{k}_s": v for k, v in best.items()})
        # the median over rounds of each round's own ratio, and the ratio of the best times
        out["speedup_store_hit"] = statistics.median(row["prefill"] / row[name]["store_hit"] for row in rounds)
        out["speedup_container_hit"] = statistics.median(row["prefill"] / row[name]["container_hit"] for row in rounds)
        out["put_over_encode"] = statistics.median(row[name]["put"] / row[name]["encode"] for row in rounds)
        out["speedup_store_hit_best"] = result["prefill_s"] / best["store_hit"]
        result["codecs"][name] = out
        print(f"{name}: store hit {best['store_hit']:.3f} s = {out['speedup_store_hit']:.1f}x faster than prefill "
              f"(median of the rounds' ratios; best prefill {result['prefill_s']:.2f} s), container hit "
              f"{best['container_hit']:.3f} s ({out['speedup_container_hit']:.1f}x), put {best['put']:.3f} s = "
              f"{out['put_over_encode']:.2f}x one encode ({best['encode']:.3f} s); top-1 "
              f"{'agrees' if out['top1_agrees'] else 'DIFFERS'}, max |dlogit| {out['max_abs_logit_diff']:.3g}; hit "
              f"{'=' if out['hit_equals_chunk_by_chunk'] else '!='} chunk-by-chunk decode", flush=True)

    if args.cprofile:
        os.makedirs(args.cprofile, exist_ok=True)
        for name, (_, store_kw) in setups.items():
            with tempfile.TemporaryDirectory() as root:
                store = open_store(root, store_kw)
                profiled(lambda: store.put(id_list[:n], clone_cache(cache)),
                         os.path.join(args.cprofile, f"{name}_put.txt"))
                store.close()
                store = open_store(root, store_kw)
                profiled(lambda: store.longest_prefix(id_list), os.path.join(args.cprofile, f"{name}_hit.txt"))
                store.close()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=DEFAULT_TEXT, help="a real text of at least --tokens + 1 tokens")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens stored (the prompt has one more)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--codecs", default="balanced,calibrated",
                    type=lambda s: [c for c in s.split(",") if c], help="comma-separated: presets and/or calibrated")
    ap.add_argument("--target-kl", type=float, default=0.01, help="the calibrated store's scale comes from this target")
    ap.add_argument("--scale", type=float, help="the calibrated store's fixed scale (instead of --target-kl)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each measures every figure once)")
    ap.add_argument("--cprofile", metavar="DIR", help="write cProfile statistics of one put and one hit per codec")
    ap.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.tokens < 1:
        ap.error("--repeat and --tokens must be >= 1")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads, user_api="blas"):  # numpy's BLAS runs the KLT products
        result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
