"""What the continuation really reads, against the soft codes the encoder chose (the diagnostic behind sparing
the last 64 tokens, docs/soft_pruning.md).

    python bench/soft_pruning_reads.py [--text T] [--target-kl K] [--recent-tokens R]

Encodes the text's P=2048 cache at ``--target-kl`` (default 0.001) twice, closed loop: with soft codes (both
readers, codes up to 8, the last ``--recent-tokens`` at code 0: the readers bench's variant
``both-recentR-cap8``; 0 gives the codes stop 22 used, 64 today's default) and with uniform steps.  Then runs
the model (eager attention) on the real continuation (C=256) after the uncompressed cache and prints, per
layer, the share of the continuation's attention that lands on tokens coded 2x coarser or more (code >= 4)
against the share the encoder's expected attention put there; then the continuation positions whose KL rose
most against uniform steps, and the coarse prefix tokens those positions read most.  SmolLM2-135M-Instruct,
shipped profile, 2 torch threads.
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
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.model_calls import with_cache  # noqa: E402
from seqkv.quality import QualityProbe, clone_cache, continuation_logits  # noqa: E402
from soft_pruning_readers import encode_recording_soft, variant_steps  # noqa: E402

P, C, COARSE = 2048, 256, 4


def per_position_kl(model, probe, profile, blob) -> np.ndarray:
    """KL(reference || decoded) at each of the C continuation positions."""
    decoded = seqkv.decode(blob, profile=profile)
    logits = continuation_logits(model, clone_cache(decoded, probe.model_dtype), probe.token_ids, P, C, P)
    ref, test = torch.log_softmax(probe.ref_logits, -1), torch.log_softmax(logits, -1)
    return (ref.exp() * (ref - test)).sum(-1).clamp_min(0).numpy()


@torch.no_grad()
def continuation_attention(model, probe) -> list[torch.Tensor]:
    """Per layer, the continuation's attention to the P prefix tokens, averaged over heads: [C, P]."""
    model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        layer.self_attn.config._attn_implementation = "eager"
    out = model(probe.token_ids[:, P:P + C], **with_cache(model, clone_cache(probe.cache, probe.model_dtype)),
                position_ids=torch.arange(P, P + C)[None], output_attentions=True, use_cache=True)
    return [a[0, :, :, :P].mean(0) for a in out.attentions]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="bench/texts/python_reference.txt")
    ap.add_argument("--target-kl", type=float, default=0.001)
    ap.add_argument("--recent-tokens", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    model, tok = load_embedded_model()
    profile = seqkv.shipped_profile(model)
    with open(os.path.join(ROOT, args.text), encoding="utf-8") as f:
        probe = QualityProbe(model, tok(f.read(), return_tensors="pt").input_ids, P, C)
    ids = probe.token_ids[0, :P]
    soft_blob, soft = encode_recording_soft(variant_steps(f"both-recent{args.recent_tokens}-cap8"), probe.cache,
                                            model=model, profile=profile, target_kl=args.target_kl, token_ids=ids)
    uniform_blob = seqkv.encode(probe.cache, model=model, profile=profile, target_kl=args.target_kl,
                                token_ids=ids, token_steps=False)
    kl_soft, kl_uniform = (per_position_kl(model, probe, profile, b) for b in (soft_blob, uniform_blob))
    print(f"soft: {len(soft_blob)} bytes, mean KL {kl_soft.mean():.6f}; uniform: {len(uniform_blob)} bytes, "
          f"mean KL {kl_uniform.mean():.6f}")
    attention, codes, weights = continuation_attention(model, probe), soft.codes, soft.weights
    print("layer | continuation's attention on tokens coded >= 4 | the encoder's expected share | tokens coded >= 4")
    for layer, a in enumerate(attention):
        coarse = codes[(layer, "keys")] >= COARSE
        actual = a.mean(0).double().numpy()
        expected = weights[(layer, "keys")] / weights[(layer, "keys")].sum()
        print(f"{layer:5d} | {actual[coarse].sum() / actual.sum():.3f} | {expected[coarse].sum():.3f} | "
              f"{coarse.mean():.3f}")
    ids = probe.token_ids[0]
    for i in np.argsort(kl_uniform - kl_soft)[:8]:
        read = sum(a[i] * torch.from_numpy(codes[(layer, "keys")] >= COARSE).float()
                   for layer, a in enumerate(attention))
        top = torch.topk(read, 5).indices.tolist()
        print(f"position {i}: KL soft {kl_soft[i]:.4f} uniform {kl_uniform[i]:.4f}; context "
              f"{tok.decode(ids[P + i - 8:P + i + 1])!r} -> {tok.decode(ids[P + i + 1:P + i + 2])!r}; "
              f"coarse prefix tokens it reads most: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
