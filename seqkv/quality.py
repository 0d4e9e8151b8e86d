"""The quality protocol of design notes §5.

1. prefill P tokens of real text;
2. encode, then decode the cache;
3. teacher-force the next C tokens against the decoded cache, with
   ``position_ids`` continuing at the recorded next position;
4. compare with the uncompressed run: mean and p99 of KL(p_ref || p_codec)
   over the C positions, top-1 agreement and the perplexity ratio.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ConfigError
from .model_calls import cache_of, with_cache


@dataclass
class QualityReport:
    mean_kl: float
    p99_kl: float
    median_kl: float
    top1_agreement: float
    ppl_ratio: float
    positions: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def clone_cache(cache, dtype=None):
    """A deep copy of a DynamicCache, optionally cast (the forward pass appends to the one it is given)."""
    from transformers import DynamicCache

    out = DynamicCache()
    for i, layer in enumerate(cache.layers):
        out.update(layer.keys.to(dtype=dtype, copy=True), layer.values.to(dtype=dtype, copy=True), i)
    state = getattr(cache, "seqkv_pruned", None)   # a pruned cache keeps its kept positions
    if state is not None:
        out.seqkv_pruned = state.copy()
    return out


@torch.no_grad()
def prefill(model, token_ids: torch.Tensor, prompt_len: int):
    """Run the model on the first ``prompt_len`` tokens; returns the DynamicCache."""
    ids = token_ids[:, :prompt_len]
    out = model(ids, use_cache=True)
    return cache_of(out)


@torch.no_grad()
def continuation_logits(model, cache, token_ids: torch.Tensor, start: int, count: int, next_position: int):
    """Teacher-force tokens ``start .. start+count-1`` after ``cache``; positions begin at ``next_position``."""
    ids = token_ids[:, start:start + count]
    from .pruning.attention import pruned_attention

    position_ids = torch.arange(next_position, next_position + count).unsqueeze(0)
    with pruned_attention(model, cache):   # per-head padding masks, for ragged pruned caches
        out = model(ids, **with_cache(model, cache), position_ids=position_ids, use_cache=True)
    return out.logits[0].float()


def compare_logits(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> QualityReport:
    logp_ref = torch.log_softmax(ref_logits, dim=-1)
    logp_test = torch.log_softmax(test_logits, dim=-1)
    kl = (logp_ref.exp() * (logp_ref - logp_test)).sum(-1).clamp_min(0.0)
    nll_ref = -logp_ref.gather(-1, targets[:, None]).squeeze(-1)
    nll_test = -logp_test.gather(-1, targets[:, None]).squeeze(-1)
    return QualityReport(
        mean_kl=float(kl.mean()),
        p99_kl=float(torch.quantile(kl, 0.99)),
        median_kl=float(kl.median()),
        top1_agreement=float((ref_logits.argmax(-1) == test_logits.argmax(-1)).float().mean()),
        ppl_ratio=float(torch.exp(nll_test.mean() - nll_ref.mean())),
        positions=int(kl.numel()),
    )


class QualityProbe:
    """Holds one prefilled cache and its reference continuation, to score many codecs against."""

    def __init__(self, model, token_ids: torch.Tensor, prompt_len: int = 2048, continuation_len: int = 256,
                 cache_dtype: torch.dtype = torch.float16):
        if token_ids.dim() == 1:
            token_ids = token_ids.unsqueeze(0)
        need = prompt_len + continuation_len + 1
        if token_ids.shape[1] < need:
            raise ConfigError(f"the text has {token_ids.shape[1]} tokens; the protocol needs {need} (P + C + 1)")
        self.model = model
        self.token_ids = token_ids
        self.prompt_len = prompt_len
        self.continuation_len = continuation_len
        # the stored cache is what a server keeps (fp16 by default); the reference continues from it
        self.model_dtype = next(model.parameters()).dtype
        self.cache = clone_cache(prefill(model, token_ids, prompt_len), dtype=cache_dtype)
        self.targets = token_ids[0, prompt_len + 1:prompt_len + continuation_len + 1]
        self.ref_logits = continuation_logits(
            model, clone_cache(self.cache, self.model_dtype), token_ids, prompt_len, continuation_len, prompt_len
        )

    def score(self, decoded_cache, next_position: int | None = None) -> QualityReport:
        pos = self.prompt_len if next_position is None else next_position
        logits = continuation_logits(
            self.model, clone_cache(decoded_cache, self.model_dtype), self.token_ids, self.prompt_len, self.continuation_len, pos
        )
        return compare_logits(self.ref_logits, logits, self.targets)
