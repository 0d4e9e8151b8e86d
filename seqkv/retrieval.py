"""Retrieval-grade probes of a codec (docs/retrieval.md): passkey retrieval and a copy probe.

Both follow the quality protocol of design notes §5 (prefill, encode, decode, then run the model
after the *decoded* cache at the recorded next position) but score what users of stored documents
depend on, where KV compression fails first:

* **passkey**: a number sentence (the needle) is inserted at several depths of real text (the
  haystack); the haystack is prefilled and stored; the question is teacher-forced after the decoded
  cache and the answer greedy-decoded; a trial counts when the passkey's digits appear in the answer.
* **copy probe**: a passage of the prefix is repeated after the stored cache; KL(p_ref || p_codec)
  and top-1 agreement on the repeated tokens, against the run over the uncompressed cache.

A row to score is one of: ``None`` (the uncompressed cache), a dict of :func:`seqkv.encode`
keyword arguments (any of them, ``prune=`` and ``profile=`` included: a calibrated container is
decoded with the same ``profile``), or a callable ``cache -> (decoded_cache, stored_bytes)`` for
anchors outside the codec (e.g. HF's quantized cache).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, field

import torch

from . import codec
from .errors import ConfigError
from .generation import greedy_continue
from .hf_adapter import cache_layers
from .quality import QualityProbe, clone_cache, compare_logits, continuation_logits, prefill

# the default haystack: real prose shipped in the package, so `seqkv eval --passkey` needs no checkout
PACKAGED_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "texts", "psf_license.txt")
PASSKEY_DEPTHS = (0.05, 0.25, 0.5, 0.75, 0.95)
PASSKEYS_PER_DEPTH = 2
HAYSTACK_TOKENS = 1600
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
PROMPT_FORMATS = ("chat", "plain")
DEFAULT_PROMPT_FORMAT = "plain"   # 10/10 uncompressed on SmolLM2-135M-Instruct; "chat" 8/10 (docs/retrieval.md)
ANSWER_TOKENS = 12          # " 48213." plus room for a preamble
COPY_LEAD = 32              # fresh tokens between the prefix and the repeat
COPY_REPEAT = 256           # repeated tokens
COPY_SOURCE_DEPTH = 0.25    # where in the prefix the repeated passage starts
_SENTENCE_END = re.compile(r"[.;:]\s+|\n\s*\n")
_PLACEHOLDER = "\x00HAYSTACK\x00"


def packaged_text() -> str:
    with open(PACKAGED_TEXT, encoding="utf-8") as f:
        return f.read()


# -- rows: how a cache is stored and read back -----------------------------------------------------

def query_aware_pruners(rows: dict) -> list:
    """The query-aware pruners among the rows' ``prune=`` options (they must watch each prefill)."""
    return [kw["prune"] for kw in rows.values()
            if isinstance(kw, dict) and getattr(kw.get("prune"), "query_aware", False)]


@contextlib.contextmanager
def watching(model, pruners, tokens: int):
    """Record the prefill's queries for ``pruners`` (kvpress style); on exit keep the first ``tokens``
    (a reference continuation run inside the block is not part of the stored prefill)."""
    with contextlib.ExitStack() as stack:
        for p in pruners:
            stack.enter_context(p.observe(model))
        yield
    for p in pruners:
        p.observer.queries = {k: v[:, :tokens] for k, v in p.observer.queries.items()}


def raw_fp16_bytes(cache) -> int:
    return 2 * sum(k.numel() + v.numel() for k, v in cache_layers(cache))


def reporter(progress):
    """``progress`` as a function of one line: a callable as is, True prints to stderr, else nothing."""
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return lambda line: None


def stored_and_decoded(spec, cache, model):
    """``(decoded cache, next position or None, stored bytes)`` of one row applied to ``cache``."""
    if spec is None:
        return cache, None, raw_fp16_bytes(cache)
    if callable(spec):
        decoded, nbytes = spec(cache)
        return decoded, None, int(nbytes)
    if not isinstance(spec, dict):
        raise ConfigError(f"a row is None, encode() keywords (a dict) or a callable, got {type(spec).__name__}")
    blob = codec.encode(cache, model=model, **spec)
    decoded = codec.decode(blob, profile=spec.get("profile"))
    return decoded, codec.inspect(blob)["positions"]["next"], len(blob)


# -- passkey retrieval -------------------------------------------------------------------------------

@dataclass
class PasskeyTrial:
    depth: float              # the needle's requested depth in the haystack (fraction of its characters)
    passkey: str
    context_ids: torch.Tensor   # [1, n]: instruction + haystack with the needle (what is stored)
    question_ids: torch.Tensor  # [1, m]: asked after the decoded cache


@dataclass
class PasskeyResult:
    found: int = 0
    trials: int = 0
    ratio: float = 0.0                      # mean over trials of raw fp16 bytes / stored bytes
    answers: list = field(default_factory=list)

    @property
    def score(self) -> str:
        return f"{self.found}/{self.trials}"

    def as_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


def haystack_text(tokenizer, text: str, tokens: int = HAYSTACK_TOKENS) -> str:
    """The first ``tokens`` tokens of ``text``, as text."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise ConfigError(f"the haystack text has {ids.numel()} tokens; the passkey probe needs {tokens}")
    return tokenizer.decode(ids[:tokens])


def insert_needle(haystack: str, needle: str, depth: float) -> str:
    """``needle`` inserted at the sentence boundary nearest to ``depth`` (a fraction of the characters)."""
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"a needle depth is a fraction in [0, 1], got {depth!r}")
    bounds = [0] + [m.end() for m in _SENTENCE_END.finditer(haystack)] + [len(haystack)]
    at = min(bounds, key=lambda b: abs(b - depth * len(haystack)))
    return f"{haystack[:at]}{needle} {haystack[at:]}"


def prompt_parts(tokenizer, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> tuple[str, str]:
    """(text before the haystack, text after it): the question goes after the stored cache.  ``chat`` wraps
    the instruction, haystack and question in the tokenizer's chat template (the user turn) and opens the
    assistant turn with the answer's first words; ``plain`` is the same text without the template."""
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "plain":
        return INTRO, f"{QUESTION} {ANSWER_PREFIX}"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": INTRO + _PLACEHOLDER + QUESTION}],
                                         tokenize=False, add_generation_prompt=True)
    before, _, after = chat.partition(_PLACEHOLDER)
    return before, after + ANSWER_PREFIX


def passkey_trials(tokenizer, text: str, depths=PASSKEY_DEPTHS, per_depth: int = PASSKEYS_PER_DEPTH,
                   haystack_tokens: int = HAYSTACK_TOKENS, prompt_format: str = DEFAULT_PROMPT_FORMAT,
                   seed: int = 0) -> list[PasskeyTrial]:
    """``len(depths) * per_depth`` trials, each with its own 5-digit passkey (fixed by ``seed``)."""
    if per_depth < 1 or not depths:
        raise ConfigError("the passkey probe needs at least one depth and one passkey per depth")
    haystack = haystack_text(tokenizer, text, haystack_tokens)
    before, after = prompt_parts(tokenizer, prompt_format)
    question_ids = tokenizer(after, return_tensors="pt", add_special_tokens=False).input_ids
    keys = random.Random(seed).sample(range(10000, 100000), len(depths) * per_depth)
    trials = []
    for i, key in enumerate(keys):
        depth = depths[i // per_depth]
        context = before + insert_needle(haystack, NEEDLE.format(key=key), depth)
        trials.append(PasskeyTrial(depth, str(key), tokenizer(context, return_tensors="pt").input_ids, question_ids))
    return trials


def found_passkey(answer: str, passkey: str) -> bool:
    """True when the passkey's digits are one of the answer's digit runs (``48,213`` counts as 48213)."""
    return passkey in re.findall(r"\d+", answer.replace(",", ""))


@torch.no_grad()
def ask(model, cache, question_ids: torch.Tensor, next_position: int, answer_tokens: int = ANSWER_TOKENS) -> list[int]:
    """Teacher-force the question after ``cache`` (which it extends) at ``next_position``, then greedy-decode."""
    n = question_ids.shape[1]
    logits = continuation_logits(model, cache, question_ids, 0, n, next_position)
    first = int(logits[-1].argmax())
    return [first] + greedy_continue(model, cache, first, next_position + n, answer_tokens - 1)


def answer_text(tokenizer, tokens: list[int]) -> str:
    """The answer up to its first end-of-sequence token."""
    eos = tokenizer.eos_token_id
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def passkey_eval(model, tokenizer, text: str, rows: dict, cache_dtype: torch.dtype = torch.float16,
                 trials: list[PasskeyTrial] | None = None, answer_tokens: int = ANSWER_TOKENS,
                 progress=False, **trial_options) -> dict[str, PasskeyResult]:
    """Passkey retrieval of every row (``{name: None | encode() keywords | callable}``, module docstring).

    Each trial's context is prefilled once (its cache stored as ``cache_dtype``, as a server keeps it)
    and every row is scored on it; ``trial_options`` go to :func:`passkey_trials`.  ``progress`` is
    True (lines on stderr) or a function called with a line per trial and row."""
    trials = passkey_trials(tokenizer, text, **trial_options) if trials is None else trials
    model_dtype = next(model.parameters()).dtype
    watchers = query_aware_pruners(rows)
    results = {name: PasskeyResult() for name in rows}
    log = reporter(progress)
    for trial in trials:
        n = trial.context_ids.shape[1]
        with watching(model, watchers, n):
            stored = clone_cache(prefill(model, trial.context_ids, n), dtype=cache_dtype)
        for name, spec in rows.items():
            decoded, next_position, nbytes = stored_and_decoded(spec, stored, model)
            tokens = ask(model, clone_cache(decoded, model_dtype), trial.question_ids,
                         n if next_position is None else next_position, answer_tokens)
            answer = answer_text(tokenizer, tokens)
            res = results[name]
            hit = found_passkey(answer, trial.passkey)
            res.found += hit
            res.trials += 1
            res.ratio += (raw_fp16_bytes(stored) / nbytes - res.ratio) / res.trials
            res.answers.append({"depth": trial.depth, "passkey": trial.passkey, "answer": answer, "found": hit})
            log(f"passkey depth {trial.depth:.2f} key {trial.passkey} {name}: {answer!r} {'ok' if hit else 'MISS'}")
    return results


# -- copy probe --------------------------------------------------------------------------------------

@dataclass
class CopyResult:
    mean_kl: float
    p99_kl: float
    top1: float          # top-1 agreement with the uncompressed run on the repeated tokens
    ref_copy_top1: float  # how often the uncompressed run's top-1 is the repeated token itself
    positions: int
    ratio: float

    def as_dict(self) -> dict:
        return asdict(self)


def copy_sequence(token_ids: torch.Tensor, prompt_len: int, lead: int = COPY_LEAD, repeat: int | None = None,
                  source_depth: float = COPY_SOURCE_DEPTH) -> torch.Tensor:
    """[1, prompt_len + lead + repeat]: the text's first ``prompt_len + lead`` tokens, then ``repeat`` tokens
    copied from the prefix starting at ``source_depth * prompt_len`` (``repeat`` defaults to
    :data:`COPY_REPEAT`, at most half the prefix)."""
    ids = token_ids.reshape(1, -1)
    repeat = min(COPY_REPEAT, prompt_len // 2) if repeat is None else repeat
    start = int(source_depth * prompt_len)
    if lead < 1 or repeat < 2 or start + repeat > prompt_len:
        raise ConfigError(f"the copy probe needs lead >= 1, repeat >= 2 and the repeated passage inside the prefix "
                          f"(start {start} + repeat {repeat} > prompt_len {prompt_len})")
    if ids.shape[1] < prompt_len + lead:
        raise ConfigError(f"the text has {ids.shape[1]} tokens; the copy probe needs {prompt_len + lead}")
    return torch.cat([ids[:, :prompt_len + lead], ids[:, start:start + repeat]], dim=1)


class CopyProbe:
    """One prefill of a copy sequence and its reference run; :meth:`score` scores a row on the repeat.

    The continuation (``lead`` fresh tokens, then the repeat) is teacher-forced after the stored cache;
    KL and top-1 are read on the positions whose next token is a repeated one after the first, i.e.
    where a model that retrieves the earlier passage can predict it (``repeat - 1`` positions)."""

    def __init__(self, model, token_ids: torch.Tensor, prompt_len: int = HAYSTACK_TOKENS, lead: int = COPY_LEAD,
                 repeat: int | None = None, source_depth: float = COPY_SOURCE_DEPTH,
                 cache_dtype: torch.dtype = torch.float16, watchers=()):
        seq = copy_sequence(token_ids, prompt_len, lead, repeat, source_depth)
        with watching(model, watchers, prompt_len):
            # the last position's logits predict a token past the sequence: the protocol's C + 1 rule
            self.quality = QualityProbe(model, seq, prompt_len, seq.shape[1] - prompt_len - 1, cache_dtype=cache_dtype)
        self.repeat_from = lead   # continuation index of the first repeated input token

    def score(self, spec, model) -> CopyResult:
        q = self.quality
        decoded, next_position, nbytes = stored_and_decoded(spec, q.cache, model)
        logits = continuation_logits(model, clone_cache(decoded, q.model_dtype), q.token_ids, q.prompt_len,
                                     q.continuation_len, q.prompt_len if next_position is None else next_position)
        ref, test, targets = (x[self.repeat_from:] for x in (q.ref_logits, logits, q.targets))
        report = compare_logits(ref, test, targets)
        return CopyResult(report.mean_kl, report.p99_kl, report.top1_agreement,
                          float((ref.argmax(-1) == targets).float().mean()), report.positions,
                          raw_fp16_bytes(q.cache) / nbytes)


def copy_eval(model, tokenizer, text: str, rows: dict, prompt_len: int = HAYSTACK_TOKENS,
              cache_dtype: torch.dtype = torch.float16, progress=False, **options) -> dict[str, CopyResult]:
    """The copy probe of every row (``{name: None | encode() keywords | callable}``) on ``text``;
    ``options`` (lead, repeat, source_depth) go to :class:`CopyProbe`."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    probe = CopyProbe(model, ids, prompt_len, cache_dtype=cache_dtype, watchers=query_aware_pruners(rows), **options)
    results = {}
    log = reporter(progress)
    for name, spec in rows.items():
        results[name] = r = probe.score(spec, model)
        log(f"copy {name}: KL {r.mean_kl:.5f} top-1 {r.top1:.3f} ratio {r.ratio:.2f}x")
    return results


# -- the columns `seqkv eval` adds ------------------------------------------------------------------

UNCOMPRESSED = "uncompressed"


def retrieval_columns(model, tokenizer, text: str, rows: dict, passkey: bool = True, copy: bool = True,
                      prompt_len: int = HAYSTACK_TOKENS, cache_dtype: torch.dtype = torch.float16,
                      progress=False) -> dict[str, dict]:
    """``{name: {"passkey": "x/n", "copy_kl": .., "copy_top1": ..}}`` for every row and for the uncompressed
    cache (under :data:`UNCOMPRESSED`); the passkey haystack and the copy probe's prefix come from ``text``,
    the copy probe's prefix is ``prompt_len`` tokens long."""
    rows = {UNCOMPRESSED: None, **rows}
    out = {name: {} for name in rows}
    if passkey:
        for name, r in passkey_eval(model, tokenizer, text, rows, cache_dtype=cache_dtype, progress=progress).items():
            out[name]["passkey"] = r.score
    if copy:
        for name, r in copy_eval(model, tokenizer, text, rows, prompt_len, cache_dtype=cache_dtype,
                                 progress=progress).items():
            out[name].update(copy_kl=r.mean_kl, copy_top1=r.top1)
    return out
