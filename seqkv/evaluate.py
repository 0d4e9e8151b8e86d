"""`seqkv eval`: the rate and quality protocol of design notes §5 on the embedded model.

For each preset: ratio vs fp16, bits/element, mean/p99 KL, top-1 agreement,
perplexity ratio, encode/decode MB/s (MB of fp16 cache per second), and the
baselines (raw fp16, zstd-3, shuffle+zstd-3) measured in the same run.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import codec
from .baselines import cache_bits, shuffle_bytes, unshuffle_bytes, zstd_compress, zstd_decompress
from .hf_adapter import DTYPES_BY_NAME, cache_layers
from .progress import progress_bar
from .quality import QualityProbe
from .retrieval import UNCOMPRESSED, query_aware_pruners, retrieval_columns, watching


@dataclass
class EvalRow:
    name: str
    bytes: int
    ratio: float
    bits_per_element: float
    mean_kl: float | None
    p99_kl: float | None
    top1: float | None
    ppl_ratio: float | None
    encode_mb_s: float
    decode_mb_s: float
    predicted_kl: float | None = None   # rate control's model, for calibrated rows
    passkey: str | None = None          # passkey retrieval "found/trials" (seqkv/retrieval.py), when asked
    copy_kl: float | None = None        # copy probe: mean KL on the repeated passage, when asked
    copy_top1: float | None = None      # copy probe: top-1 agreement on the repeated passage

    def as_dict(self) -> dict:
        return asdict(self)


def _timed(fn, repeat: int):
    best = float("inf")
    out = None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def load_token_ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def evaluate_text(model, tokenizer, text: str, presets=("lossless", "near_lossless", "balanced", "small"),
                  prompt_len: int = 2048, continuation_len: int = 256, cache_dtype: str = "float16",
                  configs: dict | None = None, repeat: int = 1, progress: bool = False, profile=None,
                  probe: QualityProbe | None = None, passkey: bool = False, copy: bool = False) -> list[EvalRow]:
    """Run the protocol on one text; ``configs`` maps extra row names to encode() keyword dicts.

    With ``profile``, config rows that name no preset use the calibrated codec with it
    (e.g. ``{"target_kl": 0.01}``).  ``probe`` reuses an existing prefill of the same text
    (then query-aware pruners in ``configs`` cannot watch it).  ``passkey`` / ``copy`` add the retrieval
    probes' columns (seqkv/retrieval.py; the lossless baselines show the uncompressed cache's result).
    """
    if probe is None:
        # query-aware pruners in ``configs`` (``prune=``) watch the prefill (not the reference continuation),
        # as kvpress's presses do
        with watching(model, query_aware_pruners(configs or {}), prompt_len):
            probe = QualityProbe(model, load_token_ids(tokenizer, text), prompt_len, continuation_len,
                                 cache_dtype=DTYPES_BY_NAME[cache_dtype])
    layers = cache_layers(probe.cache)
    elements = sum(k.numel() + v.numel() for k, v in layers)
    raw_fp16 = 2 * elements
    mb = raw_fp16 / 1e6
    rows = []

    raw = cache_bits(layers)
    itemsize = layers[0][0].element_size()
    for name, fwd, inv in [
        ("zstd-3", lambda: zstd_compress(raw), lambda b: np.frombuffer(zstd_decompress(b), dtype=np.uint8)),
        ("shuffle+zstd-3", lambda: zstd_compress(shuffle_bytes(raw, itemsize)),
         lambda b: unshuffle_bytes(np.frombuffer(zstd_decompress(b), dtype=np.uint8), itemsize)),
    ]:
        blob, t_enc = _timed(fwd, repeat)
        back, t_dec = _timed(lambda: inv(blob), repeat)  # noqa: B023 (called at once)
        if not np.array_equal(back, raw):
            raise RuntimeError(f"baseline {name} did not round-trip")
        rows.append(EvalRow(name, len(blob), raw_fp16 / len(blob), 8 * len(blob) / elements, 0.0, 0.0, 1.0, 1.0,
                            mb / t_enc, mb / t_dec))

    jobs = [(p, {"preset": p}) for p in presets] + list((configs or {}).items())

    def profile_of(kwargs) -> dict:   # rows naming no preset use the calibrated codec with ``profile``
        return {"profile": profile} if profile is not None and "preset" not in kwargs else {}

    for name, kwargs in progress_bar(jobs, desc="eval", enabled=progress):
        with_profile = profile_of(kwargs)
        blob, t_enc = _timed(lambda: codec.encode(probe.cache, model=model, **kwargs, **with_profile), repeat)  # noqa: B023
        decoded, t_dec = _timed(lambda: codec.decode(blob, **with_profile), repeat)  # noqa: B023
        info = codec.inspect(blob)
        q = probe.score(decoded, next_position=info["positions"]["next"])
        rc = info.get("rate_control") or {}
        rows.append(EvalRow(name, len(blob), raw_fp16 / len(blob), 8 * len(blob) / elements, q.mean_kl, q.p99_kl,
                            q.top1_agreement, q.ppl_ratio, mb / t_enc, mb / t_dec, rc.get("predicted_kl")))
    if passkey or copy:
        specs = {name: {**kw, **profile_of(kw)} for name, kw in jobs}
        columns = retrieval_columns(model, tokenizer, text, specs, passkey, copy, prompt_len,
                                    DTYPES_BY_NAME[cache_dtype], progress=progress)
        for row in rows:   # the zstd baselines decode to the uncompressed cache, bit for bit
            for key, value in columns.get(row.name, columns[UNCOMPRESSED]).items():
                setattr(row, key, value)
    return rows


RETRIEVAL_COLUMNS = [("passkey", "passkey", "s"), ("copy KL", "copy_kl", ".5f"), ("copy top-1", "copy_top1", ".3f")]


def format_table(rows: list[EvalRow], title: str = "") -> str:
    # the retrieval columns appear when some row has them (``evaluate_text(passkey=/copy=)``)
    extra = [(label, key, fmt) for label, key, fmt in RETRIEVAL_COLUMNS if any(getattr(r, key) is not None for r in rows)]
    head = ("| codec | bytes | ratio vs fp16 | bits/elem | mean KL | p99 KL | top-1 | ppl ratio | enc MB/s | dec MB/s |"
            + "".join(f" {label} |" for label, _, _ in extra))
    lines = ([f"**{title}**", ""] if title else []) + [head, "|" + "---|" * (10 + len(extra))]

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    for r in rows:
        lines.append(
            f"| {r.name} | {r.bytes} | {r.ratio:.2f}x | {r.bits_per_element:.3f} | {f(r.mean_kl, '.5f')} | "
            f"{f(r.p99_kl, '.4f')} | {f(r.top1, '.3f')} | {f(r.ppl_ratio, '.4f')} | {r.encode_mb_s:.0f} | {r.decode_mb_s:.0f} |"
            + "".join(f" {f(getattr(r, key), fmt)} |" for _, key, fmt in extra)
        )
    return "\n".join(lines)
