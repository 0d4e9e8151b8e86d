"""Byte identity of what seqkv writes: sha256 of containers and store entries made from the bench cache.

Run it on two versions of seqkv and compare the JSON files; a refactoring that claims "no behaviour change"
must leave every digest equal (or say which bytes changed and why):

    python bench/byte_identity.py --profile PROFILE --out after.json [--compare before.json]

The cache is the benchmarks' (SmolLM2-135M-Instruct, P=2048 tokens of bench/texts/python_reference.txt,
stored as fp16); PROFILE is a calibrated profile of that model (``seqkv calibrate -o PROFILE``).  Only the
public API is used, so the same script runs against older versions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def digest(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def bench_cache(tokens: int):
    from seqkv.embedded_model import load_embedded_model
    from seqkv.quality import clone_cache, prefill

    model, tok = load_embedded_model()
    with open(os.path.join(HERE, "texts", "python_reference.txt"), encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt").input_ids
    return model, ids[0, :tokens].tolist(), clone_cache(prefill(model, ids, tokens), torch.float16)


def containers(model, cache, profile) -> dict:
    import seqkv

    out = {}
    for preset in ("lossless", "near_lossless", "balanced", "small"):
        out[preset] = seqkv.encode(cache, preset=preset, model=model)
    out["balanced_start100"] = seqkv.encode(cache, preset="balanced", model=model, positions=100)
    out["hadamard_lloydmax3"] = seqkv.encode(cache, preset="balanced", model=model, rotation="hadamard",
                                             quantizer="lloydmax", bits=3)
    out["pruned_keynorm_layer_balanced"] = seqkv.encode(
        cache, preset="balanced", model=model, prune=seqkv.pruner("key_norm", ratio=0.5, level="layer"))
    out["pruned_keynorm_token_lossless"] = seqkv.encode(
        cache, preset="lossless", model=model, prune=seqkv.pruner("key_norm", ratio=0.5))
    if profile is not None:
        out["calibrated_kl0.01"] = seqkv.encode(cache, model=model, profile=profile, target_kl=0.01)
        out["calibrated_kl0.01_cross_layer"] = seqkv.encode(cache, model=model, profile=profile, target_kl=0.01,
                                                            cross_layer=True)
        out["calibrated_scale0.03"] = seqkv.encode(cache, model=model, profile=profile, scale=0.03)
        out["calibrated_pruned_layer"] = seqkv.encode(
            cache, model=model, profile=profile, target_kl=0.01,
            prune=seqkv.pruner("key_norm", ratio=0.5, level="layer"))
    return {name: digest(blob) for name, blob in out.items()}


def store_entries(model, ids, cache, profile) -> dict:
    """Entry bytes of a store holding the cache, then the cache's last 1024 tokens under another prefix
    (so near-duplicate chunks are coded as residuals)."""
    import seqkv
    from seqkv.quality import prefill

    other = ids[:8] + ids[1024:1536]  # another 8-token prefix, then tokens the cache holds at other positions
    other_cache = prefill(model, torch.tensor([other]), len(other))
    out = {}
    setups = [("balanced", dict(preset="balanced")), ("lossless", dict(preset="lossless"))]
    if profile is not None:
        setups.append(("calibrated", dict(profile=profile, codec_options={"scale": 0.03})))
    for name, kwargs in setups:
        with tempfile.TemporaryDirectory() as root:
            store = seqkv.PrefixStore("file://" + root, model=model, chunk_tokens=256, **kwargs)
            store.put(ids, cache)
            store.put(other, other_cache)
            for seq_name, seq in (("cache", ids), ("other", other)):
                dtype = "float16" if seq_name == "cache" else "float32"
                for i, key in enumerate(store.keys_for(seq, dtype=dtype)):
                    data = store.backend.get(key)
                    out[f"store_{name}_{seq_name}_{i}"] = None if data is None else digest(data)
            store.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", help="a calibrated profile of the embedded model (calibrated rows need it)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="a JSON file of an earlier run: print every digest that differs")
    args = ap.parse_args(argv)
    import seqkv

    torch.manual_seed(0)
    model, ids, cache = bench_cache(args.tokens)
    profile = seqkv.Profile.load(args.profile) if args.profile else None
    result = {"seqkv": seqkv.__file__, "containers": containers(model, cache, profile),
              "store": store_entries(model, ids, cache, profile)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"{len(result['containers'])} containers, {len(result['store'])} store entries -> {args.out}")
    if args.compare:
        with open(args.compare) as f:
            before = json.load(f)
        differ = [(group, name) for group in ("containers", "store")
                  for name in sorted(set(before[group]) | set(result[group]))
                  if before[group].get(name) != result[group].get(name)]
        for group, name in differ:
            print(f"DIFFERS {group}/{name}: {before[group].get(name)} -> {result[group].get(name)}")
        print(f"{len(differ)} of {len(result['containers']) + len(result['store'])} differ")
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
