"""Sessions workload on the real model: 16 chat sessions sharing a system prompt and documents.

    PYTHONPATH=. python bench/sessions_workload.py            # writes docs/sessions.md and docs/sessions.json
    PYTHONPATH=. python bench/sessions_workload.py --step 0.3 --out /tmp/x   # another codec setting
    PYTHONPATH=. python bench/sessions_workload.py --profile build/smollm2.profile.safetensors --scale 0.02 \
        --out docs/sessions_calibrated       # the calibrated codec (a model profile, one fixed scale)

With ``--profile`` the stores use the calibrated codec (PrefixStore(profile=...)) with one fixed quantizer
``scale`` for every chunk of every session: ``--scale`` gives it, or ``--target-kl`` resolves it once by
closed-loop rate control on the first ``--resolve-on`` sessions' caches (seqkv.store.scale_for_kl: the KL
measured on each cache's own last tokens; the finest scale wins).  ``--profile shipped``: the profile seqkv
ships for the embedded model.  The profile is a
shared per-model file like the weights: its size is reported separately, not counted in the ratios.

Workload (SmolLM2-135M-Instruct, its chat template, one torch thread):

* the system prompt (every session): an instruction line and the Zen of Python (bench/texts/zen_of_python.txt);
* 4 documents: the first DOC_TOKENS tokens of each of the four bench texts (bench/texts/PROVENANCE.md);
  the 256 tokens after them are the continuation of the quality protocol;
* session i: the system prompt, then 1 or 2 earlier turns (a short user question written for this
  benchmark, and the model's own greedy answer of up to 40 tokens), then a user turn "Please read this
  document ..." holding the first DOC_TOKENS tokens of document i % 4.  So each document appears in 4
  sessions, each time after different preceding turns (other tokens before it, other positions).

Stored, in this order, into three stores (directory backend, content-defined chunks):

* (a) per-session fp16: every session's cache as raw fp16 on its own (design §5's raw size);
* (b) exact-prefix-only sharing: PrefixStore(near_duplicates=False), the same codec;
* (c) near-duplicate reuse: PrefixStore(near_duplicates=True), the same codec;
* recompute tier: only the token ids (trie-coded), the KV rebuilt by prefill on load.

Chunks are content-defined (about --chunk-tokens tokens) and, unless --no-message-boundaries, a chunk also
starts at every ``<|im_start|>`` token, so that a message is cut the same way in every session.

Quality (design §5): each session's stored cache is read back from store (c) (and (b)), then the next
C=256 tokens of the document are teacher-forced with positions continuing at P = the session's length,
against the same run on the uncompressed fp16 cache; mean KL(p_ref || p_codec) over the C positions.
Ratio = raw fp16 bytes of all sessions / every byte in the store (envelopes, headers, tables, tokens).
The token trie that codes token ids is a shared profile built from bench/texts/textwrap_source.txt
(held out: not part of any session); its size is reported separately, like a model profile.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from seqkv import __version__, encode  # noqa: E402
from seqkv.embedded_model import load_embedded_model  # noqa: E402
from seqkv.model_calls import cache_of  # noqa: E402
from seqkv.quality import clone_cache, compare_logits, continuation_logits  # noqa: E402
from seqkv.profile import Profile  # noqa: E402
from seqkv.store import PrefixStore, scale_for_kl  # noqa: E402
from seqkv.shipped_profiles import shipped_profile  # noqa: E402
from seqkv.token_coding import decode_tokens, encode_tokens  # noqa: E402
from seqkv_ext.trie import TokenTrie  # noqa: E402

TEXTS = os.path.join(HERE, "texts")
DOCS = ["python_reference", "psf_license", "inspect_source", "email_message_source"]
SESSIONS = 16
CONT = 256
QUESTIONS = [
    "What is a context manager in Python?",
    "How do I read a file line by line?",
    "What is the difference between a list and a tuple?",
    "Can you explain what a decorator does?",
    "How do I sort a dictionary by its values?",
    "What does the yield keyword do?",
    "How should I name my variables?",
    "What is a virtual environment?",
    "How do I handle exceptions properly?",
    "What is the GIL?",
    "How do I write a unit test?",
    "What are f-strings?",
    "How do I merge two dictionaries?",
    "What is a lambda function?",
    "How can I make my code faster?",
    "What is duck typing?",
    "How do I check the type of a variable?",
    "What is a generator expression?",
    "When should I use a class?",
    "How do I format a date as a string?",
    "What is the difference between is and ==?",
    "How do I copy a list?",
    "What are type hints good for?",
    "How do I split a string?",
]
SYSTEM = ("You are a helpful assistant for Python programmers. Answer briefly and follow these principles.\n\n")


def load_text(name: str) -> str:
    with open(os.path.join(TEXTS, name + ".txt"), encoding="utf-8") as f:
        return f.read()


def raw_fp16_bytes(model_cfg, tokens: int) -> int:
    return model_cfg["layers"] * 2 * model_cfg["kv_heads"] * model_cfg["head_dim"] * tokens * 2


@torch.no_grad()
def answer(model, tok, system: str, question: str, max_new: int = 40) -> str:
    ids = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def build_sessions(model, tok, doc_tokens: int, count: int = SESSIONS):
    system = SYSTEM + load_text("zen_of_python")
    docs = []
    for name in DOCS:
        ids = tok(load_text(name)).input_ids
        if len(ids) < doc_tokens + CONT + 1:
            raise SystemExit(f"{name}: {len(ids)} tokens, need {doc_tokens + CONT + 1}")
        docs.append((name, ids[:doc_tokens], ids[doc_tokens:doc_tokens + CONT + 1]))
    sessions = []
    q = 0
    for i in range(count):
        turns = 1 + (i % 2)
        messages = [{"role": "system", "content": system}]
        for _ in range(turns):
            question = QUESTIONS[q % len(QUESTIONS)]
            q += 1
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer(model, tok, system, question)}]
        head = tok.apply_chat_template(messages, tokenize=False)
        head += "<|im_start|>user\nPlease read this document and tell me what it is about.\n\n"
        name, doc, cont = docs[i % len(docs)]
        ids = tok(head).input_ids + doc
        sessions.append({"index": i, "doc": name, "turns": turns, "ids": ids, "cont": cont,
                         "doc_start": len(ids) - len(doc)})
    return sessions


def token_profile(tok) -> TokenTrie:
    trie = TokenTrie()
    ids = tok(load_text("textwrap_source")).input_ids
    for s in range(0, len(ids), 256):
        trie.insert(ids[s:s + 256])
    return trie


def store_url(root: str, name: str) -> str:
    return "file://" + os.path.join(root, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="balanced", help="codec preset of the stores (default balanced)")
    ap.add_argument("--step", type=float, default=None, help="quantizer step (the quality knob) on top of the preset")
    ap.add_argument("--pipeline-config", help="a JSON file with a full preset-style pipeline config; "
                                              "replaces --preset/--step")
    ap.add_argument("--profile", help="a calibrated profile file (seqkv calibrate), or 'shipped' (the profile seqkv "
                                      "ships for the embedded model): the calibrated codec, replaces --preset/--step")
    knob = ap.add_mutually_exclusive_group()
    knob.add_argument("--scale", type=float, help="with --profile: the fixed quantizer scale of every chunk")
    knob.add_argument("--target-kl", type=float, help="with --profile: resolve the scale once, by closed-loop rate "
                                                      "control on the first --resolve-on sessions' caches (the finest "
                                                      "scale wins), for this KL")
    ap.add_argument("--resolve-on", type=int, default=1, help="with --target-kl: how many sessions (from session 0) "
                                                                "resolve the scale (default 1)")
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--doc-tokens", type=int, default=900)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "sessions"), help="writes OUT.md and OUT.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sessions", type=int, default=SESSIONS, help="fewer sessions for a smoke run")
    ap.add_argument("--render", metavar="JSON", help="only rewrite OUT.md from a JSON this script wrote")
    ap.add_argument("--no-message-boundaries", action="store_true",
                    help="do not start a chunk at every <|im_start|> (content-defined boundaries only)")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            data = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(render(data["summary"], data["sessions"]))
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = load_embedded_model()
    layout = {"layers": model.config.num_hidden_layers, "kv_heads": model.config.num_key_value_heads,
              "head_dim": model.config.head_dim}
    store_kw = {"model": model, "chunk_tokens": args.chunk_tokens, "chunking": "content"}
    if not args.no_message_boundaries:
        store_kw["boundary_tokens"] = [tok.convert_tokens_to_ids("<|im_start|>")]
    profile = None
    if (args.scale is not None or args.target_kl is not None) and not args.profile:
        ap.error("--scale / --target-kl need --profile")
    if args.profile:
        if args.pipeline_config or args.step is not None:
            ap.error("--profile replaces --pipeline-config and --step")
        if args.scale is None and args.target_kl is None:
            ap.error("--profile needs --scale or --target-kl")
        profile = shipped_profile(model) if args.profile == "shipped" else Profile.load(args.profile)
        store_kw["profile"] = profile
        codec_desc = f"calibrated profile {os.path.basename(args.profile)} (sha256 {profile.hash[:16]}…)"
    elif args.pipeline_config:
        with open(args.pipeline_config) as f:
            store_kw["pipeline_config"] = json.load(f)
        codec_desc = f"pipeline config {args.pipeline_config}"
    else:
        store_kw["preset"] = args.preset
        if args.step is not None:
            store_kw["codec_options"] = {"step": args.step}
        codec_desc = f"preset {args.preset}" + (f", step {args.step}" if args.step is not None else "")
    trie = token_profile(tok)
    vocab = len(tok)
    store_kw.update(token_trie=trie, vocab_size=vocab)

    t0 = time.perf_counter()
    sessions = build_sessions(model, tok, args.doc_tokens, args.sessions)
    build_seconds = time.perf_counter() - t0
    scale_note = None
    if profile is not None:
        if args.scale is not None:
            scale, scale_note = args.scale, f"scale {args.scale:g} (given)"
        else:
            chosen = sessions[:max(1, args.resolve_on)]
            with torch.no_grad():
                caches = [clone_cache(cache_of(model(torch.tensor([s["ids"]]), use_cache=True)), torch.float16)
                          for s in chosen]
            scale = scale_for_kl(caches, profile, args.target_kl, model=model, token_ids=[s["ids"] for s in chosen])
            scale_note = (f"scale {scale:.6g}, resolved once by closed-loop rate control for a measured KL of "
                          f"{args.target_kl:g} on the caches of sessions 0-{len(chosen) - 1} (the finest of their scales)")
        store_kw["codec_options"] = {"scale": scale}
        codec_desc += f", {scale_note}"
    if profile is not None:
        whole_kw = {"profile": profile, "scale": scale}
    elif not args.pipeline_config:
        whole_kw = {"preset": args.preset, **({"step": args.step} if args.step is not None else {})}
    else:
        whole_kw = None
    root = tempfile.mkdtemp(prefix="seqkv-sessions-")
    rows = []
    docs_seen = set()
    try:
        exact = PrefixStore(store_url(root, "exact"), near_duplicates=False, **store_kw)
        near = PrefixStore(store_url(root, "near"), near_duplicates=True, **store_kw)
        recompute_chunks: dict = {}
        warm = TokenTrie()  # the recompute tier with a growing token model: session k coded with sessions < k
        warm_bytes = 0
        for s in sessions:
            ids = torch.tensor([s["ids"]])
            P = ids.shape[1]
            t0 = time.perf_counter()
            with torch.no_grad():
                cache32 = cache_of(model(ids, use_cache=True))
            prefill_seconds = time.perf_counter() - t0
            cache = clone_cache(cache32, torch.float16)  # what a server keeps
            del cache32
            full = torch.tensor([s["ids"] + s["cont"]])
            ref = continuation_logits(model, clone_cache(cache, torch.float32), full, P, CONT, P)
            targets = full[0, P + 1:P + CONT + 1]
            row = {"session": s["index"], "doc": s["doc"], "turns": s["turns"], "tokens": P,
                   "doc_start": s["doc_start"], "raw_fp16_bytes": raw_fp16_bytes(layout, P),
                   "prefill_seconds": prefill_seconds}
            if whole_kw is not None and s["doc"] not in docs_seen:
                # the same codec on the whole cache, one container, nothing shared: what chunking costs
                row["whole_cache_bytes"] = len(encode(cache, model=model, **whole_kw))
            docs_seen.add(s["doc"])
            for label, st in (("exact", exact), ("near", near)):
                t0 = time.perf_counter()
                put = st.put(s["ids"], cache)
                row[f"{label}_put_seconds"] = time.perf_counter() - t0
                row[f"{label}_bytes_written"] = put["bytes_written"]
                row[f"{label}_chunks_written"] = put["chunks_written"]
                row[f"{label}_chunks_reused"] = put["chunks_reused"]
                row[f"{label}_chunks_residual"] = put["chunks_residual"]
            for label, st in (("exact", exact), ("near", near)):
                t0 = time.perf_counter()
                n, got = st.longest_prefix(s["ids"], dtype="float16")
                row[f"{label}_load_seconds"] = time.perf_counter() - t0
                if n != P:
                    raise SystemExit(f"session {s['index']}: the store returned {n} of {P} tokens")
                logits = continuation_logits(model, clone_cache(got, torch.float32), full, P, CONT, P)
                rep = compare_logits(ref, logits, targets)
                row[f"{label}_mean_kl"] = rep.mean_kl
                row[f"{label}_p99_kl"] = rep.p99_kl
                row[f"{label}_top1"] = rep.top1_agreement
            # recompute tier: the token ids only (exact prefixes shared, as chunks), KV rebuilt by prefill
            for key, (a, b) in zip(near.keys_for(s["ids"], "float16"), near.bounds_for(s["ids"])):
                if key not in recompute_chunks:
                    recompute_chunks[key] = encode_tokens(s["ids"][a:b], trie, vocab)
            t0 = time.perf_counter()
            coded = encode_tokens(s["ids"], trie, vocab)
            back = decode_tokens(coded, trie, vocab)
            assert back == s["ids"]
            with torch.no_grad():
                model(torch.tensor([back]), use_cache=True)
            row["recompute_load_seconds"] = time.perf_counter() - t0
            row["recompute_session_token_bytes"] = len(coded)
            warm_coded = encode_tokens(s["ids"], warm, vocab)
            warm_bytes += len(warm_coded)
            row["recompute_warm_token_bytes"] = len(warm_coded)
            warm.insert(s["ids"])
            rows.append(row)
            print(f"session {s['index']:2d} {s['doc']:22s} P={P:5d}  exact {row['exact_bytes_written']:>9d} B "
                  f"KL {row['exact_mean_kl']:.5f} | near {row['near_bytes_written']:>9d} B "
                  f"({row['near_chunks_residual']} residual chunks) KL {row['near_mean_kl']:.5f} | "
                  f"load {row['near_load_seconds']:.2f} s vs recompute {row['recompute_load_seconds']:.2f} s", flush=True)
        exact_stats, near_stats = exact.stats(), near.stats()
        exact.close()
        near.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    import zstandard

    raw = sum(r["raw_fp16_bytes"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    recompute_bytes = sum(len(v) for v in recompute_chunks.values())
    zstd_session_ids = sum(len(zstandard.ZstdCompressor(level=3).compress(np.asarray(s["ids"], "<i4").tobytes()))
                           for s in sessions)
    summary = {
        "codec": codec_desc, "chunk_tokens": args.chunk_tokens, "chunking": "content", "doc_tokens": args.doc_tokens,
        "sessions": len(rows), "tokens": tokens, "continuation": CONT,
        "raw_fp16_bytes": raw,
        "exact_bytes": exact_stats["bytes_stored"], "near_bytes": near_stats["bytes_stored"],
        "ratio_exact": raw / exact_stats["bytes_stored"], "ratio_near": raw / near_stats["bytes_stored"],
        "near_vs_exact": exact_stats["bytes_stored"] / near_stats["bytes_stored"],
        "mean_kl_near": float(np.mean([r["near_mean_kl"] for r in rows])),
        "max_session_kl_near": float(np.max([r["near_mean_kl"] for r in rows])),
        "mean_kl_exact": float(np.mean([r["exact_mean_kl"] for r in rows])),
        "max_session_kl_exact": float(np.max([r["exact_mean_kl"] for r in rows])),
        "near_chunks_residual": near_stats["chunks_residual"], "near_chunks_written": near_stats["chunks_written"],
        "near_residual_bytes_saved": near_stats["residual_bytes_saved"],
        "entry_token_bits_per_token_trie": near_stats["token_bits_per_token"],
        "entry_token_bits_per_token_zstd3": near_stats["token_bits_per_token_zstd3"],
        "entry_tokens_coded": near_stats["tokens_coded"],
        "token_profile_bytes": len(trie.tobytes()),
        "model_profile": None if profile is None else {"sha256": profile.hash, "bytes": profile.nbytes,
                                                       "scale": store_kw["codec_options"]["scale"]},
        "recompute_bytes": recompute_bytes, "ratio_recompute": raw / recompute_bytes,
        "recompute_per_session_token_bytes": sum(r["recompute_session_token_bytes"] for r in rows),
        "zstd3_per_session_id_bytes": zstd_session_ids,
        "recompute_warm_bytes": warm_bytes,
        "message_boundaries": not args.no_message_boundaries,
        "mean_load_seconds_near": float(np.mean([r["near_load_seconds"] for r in rows])),
        "mean_load_seconds_exact": float(np.mean([r["exact_load_seconds"] for r in rows])),
        "mean_load_seconds_recompute": float(np.mean([r["recompute_load_seconds"] for r in rows])),
        "session_build_seconds": build_seconds, "total_seconds": time.perf_counter() - t_start,
        "environment": {"seqkv": __version__, "torch": torch.__version__, "threads": torch.get_num_threads(),
                        "machine": platform.machine(), "cpus": os.cpu_count()},
        "command": "PYTHONPATH=. python bench/sessions_workload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with open(args.out + ".json", "w") as f:
        json.dump({"summary": summary, "sessions": rows}, f, indent=1, sort_keys=True)
    with open(args.out + ".md", "w") as f:
        f.write(render(summary, rows))
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def breakdown(s: dict, rows: list) -> str:
    """Where the bytes of (c) go: sessions that brought a new document vs the ones that reused one."""
    seen, first, later = set(), [], []
    for r in rows:
        (later if r["doc"] in seen else first).append(r)
        seen.add(r["doc"])
    fb = sum(r["near_bytes_written"] for r in first)
    lb = sum(r["near_bytes_written"] for r in later)
    text = (f"Where (c)'s bytes go: the {len(first)} sessions that brought a new document wrote {fb} bytes "
            f"({100 * fb / s['near_bytes']:.0f}%, the system prompt included); the {len(later)} that met their document "
            f"again wrote {lb} bytes ({lb / max(1, len(later)):.0f} per session: their own turns plainly, the document "
            "as residuals). ")
    text += (f"Even at zero bytes for the later sessions the total would be {s['raw_fp16_bytes'] / max(1, fb):.1f}x, so "
             "the ratio is bounded by how well the codec itself codes a first occurrence.")
    first_raw = sum(r["raw_fp16_bytes"] for r in first)
    goal = s["raw_fp16_bytes"] / 50
    text += (f" For 50x the whole store may hold {goal:.0f} bytes; the first-occurrence sessions alone are {first_raw} "
             f"bytes of fp16, so even if every later session cost nothing they would need {first_raw / goal:.1f}x "
             f"compression, where this codec gives them {first_raw / max(1, fb):.2f}x (their chunks are coded "
             "plainly: nothing earlier to be a residual of, apart from the system prompt; compare the whole-cache "
             f"ratios of [rd.md](rd.md) at KL <= 0.01). The later sessions alone wrote {lb / goal:.2f} times that "
             "budget.")
    if all("whole_cache_bytes" in r for r in first):
        wb = sum(r["whole_cache_bytes"] for r in first)
        text += (f" The same codec on the first-occurrence sessions as whole caches (one container each, nothing "
                 f"shared) takes {wb} bytes ({first_raw / wb:.2f}x): the store's chunks, envelopes and shared system "
                 f"prompt together come to {100 * (fb / wb - 1):+.1f}% against that.")
    text += "\n"
    return text


def render(s: dict, rows: list) -> str:
    out = [f"# Sessions workload: {s['sessions']} chat sessions, shared system prompt and documents\n",
           f"Written by `{s['command']}` (seqkv {s['environment']['seqkv']}, torch {s['environment']['torch']}, "
           f"{s['environment']['threads']} torch thread, {s['environment']['machine']}, {s['environment']['cpus']} CPUs; "
           f"{s['total_seconds']:.0f} s in all). The workload and protocol are described in the script's docstring.\n",
           f"Codec: {s['codec']}; content-defined chunks of about {s['chunk_tokens']} tokens"
           f"{' (and a chunk starts at every <|im_start|>)' if s['message_boundaries'] else ''}; caches stored as float16; "
           f"{s['sessions']} sessions, {s['tokens']} tokens in all; quality: C={s['continuation']} teacher-forced "
           "tokens of the document's real continuation, positions continuing at P.\n",
           "## Totals\n",
           "| storage | bytes | ratio vs per-session fp16 | mean KL (mean over sessions) | worst session's mean KL | mean load s |",
           "|---|---|---|---|---|---|",
           f"| (a) per-session fp16 | {s['raw_fp16_bytes']} | 1.00x | 0 | 0 | - |",
           f"| (b) exact-prefix sharing | {s['exact_bytes']} | {s['ratio_exact']:.2f}x | {s['mean_kl_exact']:.5f} | "
           f"{s['max_session_kl_exact']:.5f} | {s['mean_load_seconds_exact']:.2f} |",
           f"| (c) + near-duplicate residuals | {s['near_bytes']} | {s['ratio_near']:.2f}x | {s['mean_kl_near']:.5f} | "
           f"{s['max_session_kl_near']:.5f} | {s['mean_load_seconds_near']:.2f} |",
           f"| recompute tier (token ids only) | {s['recompute_bytes']} | {s['ratio_recompute']:.0f}x | 0 (same model) | 0 | "
           f"{s['mean_load_seconds_recompute']:.2f} (decode ids + prefill) |",
           "",
           f"Near-duplicate reuse: {s['near_chunks_residual']} of the {s['near_chunks_written']} chunks written to (c) are "
           f"residuals; they saved {s['near_residual_bytes_saved']} section bytes against coding them plainly; (c) is "
           f"{s['near_vs_exact']:.2f}x smaller than (b).\n",
           breakdown(s, rows),
           *([] if not s.get("model_profile") else [
               f"Model profile: {s['model_profile']['bytes']} bytes (sha256 {s['model_profile']['sha256'][:16]}…), shared "
               "by every cache of the model like the weights, reported separately and not counted above; quantizer "
               f"scale {s['model_profile']['scale']:.6g} for every chunk.\n"]),
           "Runs of this workload: [sessions.md](sessions.md) (preset balanced), "
           "[sessions_calibrated.md](sessions_calibrated.md) (the calibrated codec, a model profile).\n",
           f"Token ids in the stored entries: {s['entry_tokens_coded']} ids coded, {s['entry_token_bits_per_token_trie']:.2f} "
           f"bits/token with the token trie (a cold shared profile of {s['token_profile_bytes']} bytes built from held-out "
           f"text, reported separately and not counted above) vs {s['entry_token_bits_per_token_zstd3']:.2f} bits/token "
           "for zstd-3 of the same chunks' ids as int32. Recompute tier: every session's whole id sequence trie-coded is "
           f"{s['recompute_per_session_token_bytes']} bytes ({s['zstd3_per_session_id_bytes']} with zstd-3); with exact "
           f"prefixes shared as chunks, {s['recompute_bytes']} bytes. With a warm token model instead (session k "
           f"coded with a trie of sessions 0..k-1, which a reader must rebuild in the same order): "
           f"{s['recompute_warm_bytes']} bytes, {8 * s['recompute_warm_bytes'] / s['tokens']:.2f} bits/token.\n",
           "## Per session\n",
           "| session | doc | earlier turns | P | doc starts at | fp16 bytes | (b) bytes written | (b) KL | (c) bytes written | "
           "(c) residual chunks | (c) KL | (c) top-1 | load s | recompute s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['session']} | {r['doc']} | {r['turns']} | {r['tokens']} | {r['doc_start']} | {r['raw_fp16_bytes']} | "
                   f"{r['exact_bytes_written']} | {r['exact_mean_kl']:.5f} | {r['near_bytes_written']} | "
                   f"{r['near_chunks_residual']} | {r['near_mean_kl']:.5f} | {r['near_top1']:.3f} | "
                   f"{r['near_load_seconds']:.2f} | {r['recompute_load_seconds']:.2f} |")
    out.append("")
    out.append("Bytes written per session are the entries that session added (later sessions reuse earlier ones); "
               "the totals are every byte in the store at the end.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
