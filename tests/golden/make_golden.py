"""Write the golden containers of the current format version (run once per format change).

    python tests/golden/make_golden.py

Each golden file NAME.skv comes with NAME.expected.safetensors, the tensors it
must decode to.  Never regenerate the files of an older version: future readers
must keep decoding them as they are.
"""
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for conftest
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo, when not installed

import seqkv  # noqa: E402
from conftest import tiny_cache, tiny_profile  # noqa: E402

VERSION = "v1_4"  # only the files of this version are written; older versions' files are never regenerated
V1_0_CASES = {  # written by the 1.0 writer (kept here to document them)
    "lossless_fp16": dict(family="llama", dtype=torch.float16, kw={"preset": "lossless"}),
    "lossless_bf16_positions": dict(family="qwen2", dtype=torch.bfloat16,
                                    kw={"preset": "lossless", "positions": list(range(0, 36, 3))}),
    "lossless_fp32": dict(family="mistral", dtype=torch.float32, kw={"preset": "lossless"}),
    "balanced_fp16": dict(family="llama", dtype=torch.float16, kw={"preset": "balanced"}),
    "small_bf16_start100": dict(family="qwen2", dtype=torch.bfloat16, kw={"preset": "small", "positions": 100}),
    "hadamard_lloydmax_fp32": dict(family="llama", dtype=torch.float32,
                                   kw={"preset": "balanced", "rotation": "hadamard", "quantizer": "lloydmax", "bits": 3}),
}
V1_1_CASES = {  # 1.1: pruned containers (flag PRUNED, docs/format.md §9) and the calibrated codec (§11)
    "lossless_fp16_pruned_ragged": dict(family="llama", dtype=torch.float16,
                                        kw={"preset": "lossless"}, prune={"name": "key_norm", "ratio": 0.5, "head_budget": "adaptive"}),
    "balanced_bf16_pruned_chunk": dict(family="qwen2", dtype=torch.bfloat16,
                                       kw={"preset": "balanced"}, prune={"name": "key_norm", "ratio": 0.5, "level": "chunk", "chunk_size": 3}),
    "calibrated_fp16": dict(family="llama", dtype=torch.float16, tokens=40, kw={"scale": 0.03}, profile=True),
}

V1_2_CASES = {  # 1.2: a pruned container coded with the calibrated codec (docs/format.md §9.3)
    "calibrated_fp16_pruned_layer": dict(family="llama", dtype=torch.float16, tokens=40, kw={"scale": 0.03}, profile=True,
                                         prune={"name": "key_norm", "ratio": 0.5, "level": "layer"}),
}

V1_3_CASES = {  # 1.3: klt_uniform's per-token steps (docs/format.md §6.2), codes 0..12 varying by token and layer
    "calibrated_fp16_token_steps": dict(family="llama", dtype=torch.float16, tokens=40, kw={"scale": 0.03}, profile=True,
                                        token_codes=lambda layer, tokens: [(3 * t + layer) % 13 if t < tokens - 8 else 0
                                                                           for t in range(tokens)]),
}


REPEATED_IDS = ([5, 17, 3, 44, 9, 61, 23, 8, 70, 12, 33, 2] + [80, 81, 82]) * 6 + [5, 17, 3, 44]
CASES = {  # 1.4: temporal_ar's repeat prediction (docs/format.md §6.5): a 12-token passage repeated six times
    "calibrated_fp16_repeat": dict(family="llama", dtype=torch.float16, ids=REPEATED_IDS, kw={"scale": 0.02},
                                   profile=True),
}


def cache_of_ids(family, ids, dtype):
    from conftest import tiny_model
    from seqkv.model_calls import cache_of

    model = tiny_model(family)
    with torch.no_grad():
        cache = cache_of(model(torch.tensor([ids]), use_cache=True))
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    return model, cache


def encode_with_token_codes(model, cache, profile, scale, codes_of) -> bytes:
    """A calibrated container with the given per-token step codes (seqkv.encode chooses them from attention
    only in closed loop; a golden file needs fixed ones)."""
    import numpy as np
    from seqkv.codec import encode_with_token_steps
    from seqkv.token_importance import uniform_weights

    tokens = cache.layers[0].keys.shape[2]
    codes = {(i, kind): np.array(codes_of(i, tokens), np.uint8) for i in range(len(cache.layers))
             for kind in ("keys", "values")}
    return encode_with_token_steps(cache, profile, uniform_weights(codes), scale=scale, model=model)


def main():
    for name, case in CASES.items():
        if case.get("ids"):
            model, cache = cache_of_ids(case["family"], case["ids"], case["dtype"])
        else:
            model, cache = tiny_cache(case["family"], tokens=case.get("tokens", 12), dtype=case["dtype"], seed=7)
        prune = dict(case.get("prune") or {})
        pruner = seqkv.pruner(prune.pop("name"), **prune) if prune else None
        base = os.path.join(HERE, f"{VERSION}_{name}")
        profile = None
        if case.get("profile"):
            profile = tiny_profile(case["family"])
            profile.save(base + ".profile.safetensors")
        if case.get("token_codes"):
            blob = encode_with_token_codes(model, cache, profile, case["kw"]["scale"], case["token_codes"])
        else:
            blob = seqkv.encode(cache, model=model, prune=pruner, profile=profile, **case["kw"])
        with open(base + ".skv", "wb") as f:
            f.write(blob)
        decoded = seqkv.decode(blob, profile=profile)
        tensors = {}
        for i, layer in enumerate(decoded.layers):
            tensors[f"layer.{i}.keys"] = layer.keys.contiguous()
            tensors[f"layer.{i}.values"] = layer.values.contiguous()
        state = getattr(decoded, "seqkv_pruned", None)
        for i, kept in enumerate(state.kept if state is not None else []):
            for h, pos in enumerate(kept):
                tensors[f"layer.{i}.kept.{h}"] = pos.clone()
        save_file(tensors, base + ".expected.safetensors")
        print(base, len(blob))


if __name__ == "__main__":
    main()
