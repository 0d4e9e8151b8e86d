"""The retrieval probes (seqkv/retrieval.py): mechanics on a tiny random model, 10/10 on the real one."""
import re

import pytest
import torch

import seqkv
from seqkv.errors import ConfigError
from seqkv.evaluate import evaluate_text, format_table
from seqkv.generation import greedy_continue
from seqkv.model_calls import cache_of
from seqkv.quality import clone_cache, prefill
from seqkv.retrieval import (ANSWER_PREFIX, NEEDLE, UNCOMPRESSED, CopyProbe, ask, copy_eval, copy_sequence,
                             found_passkey, insert_needle, packaged_text, passkey_eval, passkey_trials, prompt_parts,
                             stored_and_decoded)

from conftest import tiny_model

SMALL = {"haystack_tokens": 300}   # trials on the tiny model: a short haystack keeps them fast


class CharTokenizer:
    """A character tokenizer into the tiny models' 96 ids: newline is 0, printable ASCII 32..126 is 1..95."""
    eos_token_id = None

    def __call__(self, text, return_tensors="pt", add_special_tokens=True):
        ids = [0 if c == "\n" else ord(c) - 31 if 32 <= ord(c) <= 126 else ord("?") - 31 for c in text]

        class Encoded:
            input_ids = torch.tensor([ids])
        return Encoded()

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i == 0 else chr(int(i) + 31) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        turns = "".join(f"<{m['role']}>{m['content']}</{m['role']}>\n" for m in messages)
        return turns + ("<assistant>" if add_generation_prompt else "")


TOK = CharTokenizer()


def text():
    return packaged_text()


# -- building the haystack ---------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [0.0, 0.05, 0.5, 0.95, 1.0])
def test_needle_goes_to_the_sentence_boundary_nearest_its_depth(depth):
    hay = "One. Two two. Three three three. Four; five: six\n\nseven eight nine ten."
    out = insert_needle(hay, "NEEDLE.", depth)
    at = out.index("NEEDLE.")
    assert out.replace("NEEDLE. ", "", 1) == hay
    assert at == 0 or hay[:at].rstrip()[-1] in ".;:" or hay[:at].endswith("\n\n")
    bounds = [0, 5, 14, 33, 39, 42, len(hay)]   # every boundary the rule knows
    assert at == min(bounds, key=lambda b: abs(b - depth * len(hay)))


@pytest.mark.parametrize("depth", [-0.1, 1.5])
def test_needle_depth_outside_the_haystack_is_refused(depth):
    with pytest.raises(ConfigError, match="depth"):
        insert_needle("a. b.", "x", depth)


def test_trials_have_one_distinct_passkey_each_in_the_stored_context():
    trials = passkey_trials(TOK, text(), depths=(0.1, 0.9), per_depth=3, seed=5, **SMALL)
    assert [t.depth for t in trials] == [0.1] * 3 + [0.9] * 3
    assert len({t.passkey for t in trials}) == 6 and all(re.fullmatch(r"\d{5}", t.passkey) for t in trials)
    for t in trials:
        context = TOK.decode(t.context_ids[0].tolist())
        assert NEEDLE.format(key=t.passkey) in context
        assert t.passkey not in TOK.decode(t.question_ids[0].tolist())   # the question does not give it away
    early, late = (TOK.decode(trials[i].context_ids[0].tolist()).index(NEEDLE[:12]) for i in (0, 3))
    assert early < late
    assert [t.passkey for t in passkey_trials(TOK, text(), depths=(0.1, 0.9), per_depth=3, seed=5, **SMALL)] == \
        [t.passkey for t in trials]


def test_a_text_shorter_than_the_haystack_is_refused():
    with pytest.raises(ConfigError, match="haystack"):
        passkey_trials(TOK, "Too short.", **SMALL)


def test_prompt_formats():
    before, after = prompt_parts(TOK, "chat")
    assert before.startswith("<user>") and after.endswith("<assistant>" + ANSWER_PREFIX)
    before, after = prompt_parts(TOK, "plain")
    assert "<" not in before + after and after.endswith(ANSWER_PREFIX)
    with pytest.raises(ConfigError, match="prompt_format"):
        prompt_parts(TOK, "xml")


@pytest.mark.parametrize("answer,found", [(" 48213.", True), (" 48,213", True), ("48213", True),
                                          (" 482130", False), (" 4821", False), (" 48 213", False), ("", False)])
def test_found_passkey_needs_the_exact_digits(answer, found):
    assert found_passkey(answer, "48213") is found


# -- asking after the decoded cache --------------------------------------------------------------------

def test_ask_after_a_cache_matches_greedy_decoding_of_the_whole_sequence():
    model = tiny_model()
    gen = torch.Generator().manual_seed(3)
    context, question = torch.randint(0, 96, (1, 40), generator=gen), torch.randint(0, 96, (1, 7), generator=gen)
    got = ask(model, prefill(model, context, 40), question, 40, answer_tokens=5)
    ids = torch.cat([context, question], dim=1)
    want = []
    for _ in range(5):   # recompute from scratch: no cache, positions 0..n-1
        want.append(int(model(ids).logits[0, -1].argmax()))
        ids = torch.cat([ids, torch.tensor([[want[-1]]])], dim=1)
    assert got == want


def test_lossless_rows_answer_exactly_as_the_uncompressed_cache():
    model = tiny_model()
    calls = []

    def zeroed(cache):   # an "anchor" that destroys the cache
        calls.append(1)
        out = clone_cache(cache)
        for layer in out.layers:
            layer.keys.zero_()
            layer.values.zero_()
        return out, 1

    rows = {UNCOMPRESSED: None, "lossless": {"preset": "lossless"}, "zeroed": zeroed}
    res = passkey_eval(model, TOK, text(), rows, depths=(0.2, 0.8), per_depth=1, answer_tokens=4, **SMALL)
    assert [r.trials for r in res.values()] == [2, 2, 2] and len(calls) == 2
    assert [a["answer"] for a in res["lossless"].answers] == [a["answer"] for a in res[UNCOMPRESSED].answers]
    assert [a["answer"] for a in res["zeroed"].answers] != [a["answer"] for a in res[UNCOMPRESSED].answers]
    assert res[UNCOMPRESSED].ratio == 1.0 and res["lossless"].ratio > 1.0
    assert res["zeroed"].as_dict()["score"] == f"{res['zeroed'].found}/2"


def test_a_pruned_row_is_asked_at_the_unpruned_next_position():
    model = tiny_model()
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(0))
    cache = clone_cache(prefill(model, ids, 64), torch.float16)
    decoded, next_position, nbytes = stored_and_decoded(
        {"preset": "lossless", "prune": seqkv.pruner("sinks_window", ratio=0.5)}, cache, model)
    assert next_position == 64 and decoded.layers[0].keys.shape[2] == 32 and nbytes > 0
    with pytest.raises(ConfigError, match="row"):
        stored_and_decoded("lossless", cache, model)


def test_query_aware_pruners_watch_every_trial_prefill():
    model = tiny_model()
    snap = seqkv.pruner("snapkv", ratio=0.5)
    res = passkey_eval(model, TOK, text(), {"snapkv": {"preset": "lossless", "prune": snap}},
                       depths=(0.5,), per_depth=2, answer_tokens=2, **SMALL)
    assert res["snapkv"].trials == 2 and res["snapkv"].ratio > 1.9   # half the tokens, then lossless coding
    assert snap.observer.tokens == passkey_trials(TOK, text(), depths=(0.5,), per_depth=2, **SMALL)[-1].context_ids.shape[1]


# -- copy probe ----------------------------------------------------------------------------------------

def test_copy_sequence_repeats_a_passage_of_the_prefix():
    ids = torch.arange(200).unsqueeze(0)
    seq = copy_sequence(ids, prompt_len=100, lead=10, repeat=30, source_depth=0.2)
    assert seq.shape == (1, 140)
    assert torch.equal(seq[0, :110], ids[0, :110]) and torch.equal(seq[0, 110:], ids[0, 20:50])
    with pytest.raises(ConfigError, match="inside the prefix"):
        copy_sequence(ids, prompt_len=100, lead=10, repeat=90, source_depth=0.2)
    with pytest.raises(ConfigError, match="tokens"):
        copy_sequence(ids[:, :105], prompt_len=100, lead=10, repeat=30)


def test_copy_probe_is_exact_for_lossless_and_measures_a_lossy_codec():
    model = tiny_model()
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(1))
    probe = CopyProbe(model, ids, prompt_len=160, lead=8, repeat=40)
    exact = probe.score({"preset": "lossless"}, model)
    assert exact.mean_kl == 0.0 and exact.top1 == 1.0 and exact.positions == 39 and exact.ratio > 1.0
    assert probe.score(None, model).mean_kl == 0.0
    lossy = probe.score({"preset": "small", "step": 1.5}, model)
    assert lossy.mean_kl > 0.0 and lossy.ratio > exact.ratio
    assert lossy.ref_copy_top1 == exact.ref_copy_top1


def test_copy_eval_scores_a_pruned_row_against_the_full_cache():
    model = tiny_model()
    res = copy_eval(model, TOK, text(), {"lossless": {"preset": "lossless"},
                                         "snapkv": {"preset": "lossless", "prune": seqkv.pruner("snapkv", ratio=0.75)}},
                    prompt_len=160, lead=8, repeat=40)
    assert res["lossless"].mean_kl == 0.0 and res["snapkv"].mean_kl > 0.0


# -- seqkv eval's columns ------------------------------------------------------------------------------

def test_evaluate_text_adds_the_retrieval_columns(monkeypatch):
    import seqkv.retrieval as retrieval

    monkeypatch.setattr(retrieval, "passkey_trials", lambda tok, t, **kw: passkey_trials(tok, t, depths=(0.5,), **SMALL))
    model = tiny_model()
    rows = evaluate_text(model, TOK, text(), presets=("lossless", "small"), prompt_len=256, continuation_len=16,
                         passkey=True, copy=True)
    by = {r.name: r for r in rows}
    assert by["lossless"].copy_kl == 0.0 and by["zstd-3"].copy_kl == 0.0 and by["small"].copy_kl > 0.0
    assert by["lossless"].passkey == by["zstd-3"].passkey and re.fullmatch(r"\d/2", by["small"].passkey)
    table = format_table(rows)
    assert "| passkey | copy KL | copy top-1 |" in table.splitlines()[0]
    assert "passkey" not in format_table(evaluate_text(model, TOK, text(), presets=("lossless",), prompt_len=256,
                                                       continuation_len=16))


def test_eval_command_takes_the_probe_flags():
    from seqkv.cli import build_parser

    args = build_parser().parse_args(["eval", "--passkey", "--copy"])
    assert args.passkey and args.copy
    args = build_parser().parse_args(["eval"])
    assert not args.passkey and not args.copy


# -- the real model ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_retrieves_every_passkey_uncompressed_and_lossless():
    from seqkv.embedded_model import load_embedded_model

    model, tok = load_embedded_model()
    rows = {UNCOMPRESSED: None, "lossless": {"preset": "lossless"}}
    res = passkey_eval(model, tok, text(), rows)
    assert res[UNCOMPRESSED].score == "10/10", res[UNCOMPRESSED].answers
    assert res["lossless"].score == "10/10", res["lossless"].answers
    copy = copy_eval(model, tok, text(), rows)
    assert copy["lossless"].mean_kl == 0.0 and copy["lossless"].top1 == 1.0
    assert copy[UNCOMPRESSED].ref_copy_top1 > 0.5   # the model does copy the repeated passage
