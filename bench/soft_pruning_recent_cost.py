"""What sparing the last tokens costs in bytes: the default container against the same codes with the last
``RECENT_TOKENS`` at the codes their expected attention gives (``recent_tokens=0``, stop 22's default), both at
the scale the closed loop chose for the default.

    python bench/soft_pruning_recent_cost.py seqkv/data/texts/psf_license.txt bench/texts/python_reference.txt

At the same scale the probe reads the same KL for both (it never reads the tail's own decoded KV), so the
difference is what the spared tokens cost at matched probe KL.  SmolLM2-135M-Instruct, P=2048, fp16 cache,
shipped profile, ``target_kl`` 0.01 (``--target-kl``).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import seqkv  # noqa: E402
import seqkv.codec as codec  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.quality import QualityProbe  # noqa: E402
from seqkv.token_importance import RECENT_TOKENS, SoftSteps, token_step_codes  # noqa: E402
from soft_pruning_readers import LIBRARY_SOFT_STEPS, encode_recording_soft  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--target-kl", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    for path in args.texts:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            probe = QualityProbe(model, tok(f.read(), return_tensors="pt").input_ids, 2048, 256)
        blob, soft = encode_recording_soft(LIBRARY_SOFT_STEPS, probe.cache, model=model, profile=profile,
                                           target_kl=args.target_kl, token_ids=probe.token_ids[0, :2048])
        scale = seqkv.inspect(blob)["rate_control"]["scale"]
        # the codes depend on the attention only through ratios, so the mean-1 weights give them back exactly
        attention = [soft.weights[(layer, "keys")].astype(np.float64) for layer in range(len(soft.codes) // 2)]
        assert all(np.array_equal(c, soft.codes[k])
                   for k, c in token_step_codes(attention, profile.sink_tokens).items())
        readers = token_step_codes(attention, profile.sink_tokens, recent_tokens=0)
        spared = len(codec.encode_with_token_steps(probe.cache, profile, soft, scale=scale, model=model))
        unspared = len(codec.encode_with_token_steps(probe.cache, profile, SoftSteps(readers, soft.weights),
                                                     scale=scale, model=model))
        print(f"{os.path.basename(path)}: scale {scale:.5f}; last {RECENT_TOKENS} tokens at code 0: {spared} bytes; "
              f"at their readers' codes: {unspared} bytes; cost {100 * (spared / unspared - 1):+.2f} %", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
