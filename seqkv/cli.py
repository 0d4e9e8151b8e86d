"""The `seqkv` command line: demo, encode, decode, inspect, eval, store."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import SeqKVError

# package data (seqkv/data/, see the PROVENANCE.md files there): the command line needs no checkout
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TEXT = os.path.join(DATA_DIR, "texts", "psf_license.txt")
DEFAULT_TEXT_NAME = "psf_license.txt (CPython's LICENSE, packaged)"
CALIBRATION_DIR = os.path.join(DATA_DIR, "calibration")
PRESET_ORDER = ("lossless", "near_lossless", "balanced", "small")
DEMO_TARGETS = (0.01, 0.001)   # the calibrated rows of `seqkv demo`


def calibration_texts() -> list[str]:
    """The packaged calibration texts (what `seqkv calibrate` reads by default), sorted."""
    return sorted(os.path.join(CALIBRATION_DIR, f) for f in os.listdir(CALIBRATION_DIR) if f.endswith(".txt"))


def _read_text(path: str | None) -> str:
    if path is None:
        path = DEFAULT_TEXT
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise SeqKVError(f"cannot read text file {path!r}: {exc.strerror}") from None


def _model(path: str | None = None):
    from .embedded_model import load_embedded_model, load_local_model

    if path is not None:
        print(f"loading the model in {path}...", file=sys.stderr)
        return load_local_model(path)
    print("loading the embedded model (SmolLM2-135M-Instruct, GGUF)...", file=sys.stderr)
    return load_embedded_model()


def _prefill_text(model, tokenizer, text: str, tokens: int, cache_dtype: str):
    """Tokenize ``text`` and prefill its first ``tokens`` tokens; returns (ids, tokens used, cache in cache_dtype)."""
    from .hf_adapter import DTYPES_BY_NAME
    from .quality import clone_cache, prefill

    if tokens < 2:
        raise SeqKVError(f"--tokens must be at least 2, got {tokens}")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < tokens:
        print(f"note: the text has only {ids.shape[1]} tokens; using all of them", file=sys.stderr)
        tokens = ids.shape[1]
    return ids, tokens, clone_cache(prefill(model, ids, tokens), DTYPES_BY_NAME[cache_dtype])


def cmd_demo(args) -> int:
    """Every preset and the calibrated codec on one real cache: size, measured KL and greedy agreement."""
    from . import codec
    from .generation import greedy_continue
    from .hf_adapter import DTYPES_BY_NAME
    from .quality import QualityProbe, clone_cache

    import torch

    if args.tokens < 8 or args.kl_tokens < 1 or args.new_tokens < 1:
        raise SeqKVError("--tokens must be at least 8, --kl-tokens and --new-tokens at least 1")
    profile = _load_profile(args.profile)
    model, tokenizer = _model()
    ids = tokenizer(_read_text(args.text), return_tensors="pt").input_ids
    n_text = ids.shape[1]
    # the cache holds tokens [0, P); the next C tokens are teacher-forced for the KL, and token P starts
    # the greedy continuation at position P
    kl_tokens = min(args.kl_tokens, n_text // 4)
    prompt = min(args.tokens, n_text - kl_tokens - 1)
    if prompt < 8 or kl_tokens < 1:
        raise SeqKVError(f"the text has only {n_text} tokens: too few for a demo")
    if prompt < args.tokens:
        print(f"note: the text has only {n_text} tokens; prefilling {prompt}", file=sys.stderr)
    probe = QualityProbe(model, ids, prompt, kl_tokens, cache_dtype=DTYPES_BY_NAME[args.cache_dtype])
    cache, model_dtype, first = probe.cache, probe.model_dtype, int(ids[0, prompt])
    print(f"prefilled {prompt} tokens of {args.text or DEFAULT_TEXT_NAME}; cache dtype {args.cache_dtype}; "
          f"KL over the next {kl_tokens} tokens (teacher-forced), greedy agreement over {args.new_tokens} new tokens",
          file=sys.stderr)
    reference = greedy_continue(model, clone_cache(cache, model_dtype), first, prompt, args.new_tokens)
    raw = sum(layer.keys.numel() * 2 * 2 for layer in cache.layers)
    print(f"\nreference continuation: {tokenizer.decode(reference)!r}\n")
    print("| codec | bytes | ratio vs fp16 | bits/elem | mean KL | top-1 | greedy tokens identical | encode ms | decode ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| (fp16 raw) | {raw} | 1.00x | 16.000 | 0 | 1.000 | {args.new_tokens}/{args.new_tokens} | – | – |")
    rows = [(preset, {"preset": preset}) for preset in PRESET_ORDER]
    rows += [(f"calibrated, target_kl={t:g}", {"target_kl": t, **({"profile": profile} if profile else {})})
             for t in DEMO_TARGETS]
    ok = True
    for name, kwargs in rows:
        t0 = time.perf_counter()
        blob = codec.encode(cache, model=model, **kwargs)
        t1 = time.perf_counter()
        decoded = codec.decode(blob, dtype=model_dtype, profile=kwargs.get("profile"))
        t2 = time.perf_counter()
        info = codec.inspect(blob)
        quality = probe.score(decoded, next_position=info["positions"]["next"])
        got = greedy_continue(model, decoded, first, info["positions"]["next"], args.new_tokens)
        same = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), len(reference))
        match = sum(a == b for a, b in zip(got, reference))
        print(f"| {name} | {len(blob)} | {info['ratio_vs_fp16']:.2f}x | {info['bits_per_element']:.3f} | "
              f"{quality.mean_kl:.4f} | {quality.top1_agreement:.3f} | {match}/{len(reference)} (first {same} in a row) | "
              f"{1000 * (t1 - t0):.0f} | {1000 * (t2 - t1):.0f} |", flush=True)
        if name == "lossless":
            exact = all(torch.equal(a.keys, b.keys.to(a.keys.dtype)) and torch.equal(a.values, b.values.to(a.values.dtype))
                        for a, b in zip(cache.layers, codec.decode(blob).layers))
            ok &= exact and got == reference
    used = profile if profile is not None else _shipped_profile(model)
    print(f"\ncalibrated rows: profile {used.codec_hash[:16]}… ({'given' if profile else 'shipped with seqkv'}); "
          "mean KL and top-1 measured against the uncompressed cache, not predicted")
    print("lossless: bit-exact round trip and identical greedy continuation:", "yes" if ok else "NO")
    return 0 if ok else 1


def _shipped_profile(model):
    from .shipped_profiles import shipped_profile

    return shipped_profile(model)


def cmd_encode(args) -> int:
    from . import codec

    options = _encode_options(args)
    pruner = _pruner_from_args(args)  # argument errors before the (slow) model load
    text = _read_text(args.text)
    model, tokenizer = _model()
    if pruner is not None and pruner.query_aware:
        with pruner.observe(model):  # query-aware pruners score with the prefill's queries
            _, n, cache = _prefill_text(model, tokenizer, text, args.tokens, args.cache_dtype)
    else:
        _, n, cache = _prefill_text(model, tokenizer, text, args.tokens, args.cache_dtype)
    blob = codec.encode(cache, model=model, progress=True, prune=pruner, **options)
    _write_atomic(args.output, blob)
    info = codec.inspect(blob)
    print(f"wrote {args.output}: {len(blob)} bytes, {n} tokens, ratio {info['ratio_vs_fp16']:.2f}x vs fp16, "
          f"{info['bits_per_element']:.3f} bits/element")
    return 0


def _require_kl_target(args, targets: dict, flag: str, why: str) -> None:
    """A closed-loop flag needs a KL target: --target-kl, or --profile alone (its default 0.01), and no option
    set so far in ``targets``."""
    if args.target_kl is None and (args.profile is None or targets):
        raise SeqKVError(f"{flag} is for --target-kl ({why})")


def _encode_options(args) -> dict:
    """encode() keywords from --preset/--step or --profile with one rate target."""
    targets = {k: v for k, v in [("target_kl", args.target_kl), ("bits_per_element", args.bits_per_element),
                                 ("max_bytes", args.max_bytes)] if v is not None}
    if getattr(args, "open_loop", False):
        _require_kl_target(args, targets, "--open-loop", "a rate or byte target is met exactly either way")
        targets["closed_loop"] = False
    if getattr(args, "soft_prune", False):
        _require_kl_target(args, targets, "--soft-prune", "soft pruning reads the closed loop's probe")
        targets["token_steps"] = True
    if getattr(args, "no_soft_prune", False):
        if getattr(args, "soft_prune", False):
            raise SeqKVError("--soft-prune and --no-soft-prune contradict each other")
        _require_kl_target(args, targets, "--no-soft-prune", "soft pruning is only ever on in the closed loop")
        targets["token_steps"] = False
    if getattr(args, "no_repeat", False):
        if args.profile is None and not targets:
            raise SeqKVError("--no-repeat is for the calibrated codec (--profile or a rate target): the presets never "
                             "predict repeats")
        targets["repeat"] = False
    if args.profile is None:
        if targets:   # the calibrated codec with the profile seqkv ships for the model
            if args.preset is not None or args.step is not None:
                raise SeqKVError("--target-kl / --bits-per-element / --max-bytes select the calibrated codec: "
                                 "leave out --preset and --step")
            return targets
        options = {"preset": args.preset or "balanced"}
        if args.step is not None:
            options["step"] = args.step
        return options
    if args.preset is not None or args.step is not None:
        raise SeqKVError("--profile selects the calibrated codec: leave out --preset and --step")
    return {"profile": _load_profile(args.profile), **targets}


def _pruner_from_args(args):
    """The --prune pruner, or None."""
    if args.prune is None:
        if args.prune_ratio is not None or args.prune_level is not None:
            raise SeqKVError("--prune-ratio / --prune-level need --prune NAME")
        return None
    from .pruning import pruner

    if args.prune_ratio is None:
        raise SeqKVError("--prune needs --prune-ratio: the fraction of tokens removed, in (0, 1)")
    kwargs = {"ratio": args.prune_ratio}
    calibration = args.prune_calibration or (args.profile if args.prune == "triattention" else None)
    if args.prune == "triattention":
        if calibration is None:
            raise SeqKVError("--prune triattention needs its query centres: --prune-calibration FILE (a saved "
                             "calibration, or a profile made with seqkv calibrate --triattention / --add-triattention)")
        kwargs["calibration"] = calibration
    elif args.prune_calibration is not None:
        raise SeqKVError("--prune-calibration is for --prune triattention")
    if args.prune_level is not None:
        kwargs["level"] = args.prune_level
    elif args.profile is not None:
        kwargs["level"] = "layer"  # the profile's KLT mixes a layer's heads: they must keep the same tokens
    return pruner(args.prune, **kwargs)


def _add_encode_options(parser) -> None:
    parser.add_argument("--preset", choices=PRESET_ORDER, help="codec preset without a profile (default balanced)")
    parser.add_argument("--step", type=float, help="quality knob: quantizer step relative to RMS (lossy presets)")
    parser.add_argument("--profile", help="a calibrated model profile (seqkv calibrate): the calibrated codec "
                                          "(without it, a rate target below uses the profile shipped for the model)")
    parser.add_argument("--target-kl", type=float, help="the calibrated codec: mean KL to meet, measured on the "
                                                        "cache's own last tokens (default 0.01 with --profile)")
    parser.add_argument("--open-loop", action="store_true", help="with --target-kl: the profile's predicted KL only "
                                                                 "(faster; nothing measured, docs/rate_control.md)")
    parser.add_argument("--soft-prune", action="store_true",
                        help="with --target-kl: coarser steps for the tokens attention is expected to read least "
                             "(the default where the closed loop observes the model's queries on caches of 1024 "
                             "tokens or more; this turns it on at any length and makes its absence an error; "
                             "docs/soft_pruning.md)")
    parser.add_argument("--no-soft-prune", action="store_true",
                        help="with --target-kl: every token the same steps (a larger container at the same "
                             "measured KL; a later verbatim copy of an early passage reads less KL)")
    parser.add_argument("--no-repeat", action="store_true",
                        help="the calibrated codec without repeat prediction: 3-19 %% larger on the bench texts, but a container that "
                             "readers older than format 1.4 decode (docs/format.md §6.5)")
    parser.add_argument("--bits-per-element", type=float, help="the calibrated codec: the rate to meet instead")
    parser.add_argument("--max-bytes", type=int, help="the calibrated codec: a byte budget the container never exceeds")


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SeqKVError(f"cannot read {path!r}: {exc.strerror}") from None


def cmd_decode(args) -> int:

    from . import codec

    data = _read_bytes(args.input)
    cache = codec.decode(data, progress=True, profile=_load_profile(args.profile))
    info = codec.inspect(data)
    positions = None
    if info["pruning"] is None and not info["positions"]["contiguous"]:
        positions = codec.token_positions(data)  # start and next alone do not say them
    _save_cache(cache, args.output, info["positions"]["start"], info["positions"]["next"], info["model"]["fingerprint"],
                positions)
    return 0


def _save_cache(cache, path: str, start: int, next_position: int, fingerprint: str, positions=None) -> None:
    """Write per-layer keys/values to a .safetensors file atomically (temporary name, then rename); with
    ``positions`` (tokens not at start, start + 1, ...), also a ``positions`` tensor of every token's."""
    from safetensors.torch import save_file

    import torch

    tensors = {}
    for i, layer in enumerate(cache.layers):
        tensors[f"layer.{i}.keys"] = layer.keys.contiguous()
        tensors[f"layer.{i}.values"] = layer.values.contiguous()
    meta = {"next_position": str(next_position), "start_position": str(start), "model_fingerprint": fingerprint}
    if positions is not None:
        tensors["positions"] = positions.to(torch.int64).contiguous()
    state = getattr(cache, "seqkv_pruned", None)
    if state is not None:
        # a pruned cache is not the tokens 0..n-1: slot j of head h of layer i holds the token at position
        # layer.{i}.kept.{h}[j], and slots past that tensor's length are padding
        for i, kept in enumerate(state.kept):
            for h, positions in enumerate(kept):
                tensors[f"layer.{i}.kept.{h}"] = positions.to(torch.int64).contiguous()
        meta.update(pruned="per-head kept positions in layer.{i}.kept.{h}; later slots are padding",
                    source_tokens=str(state.source_tokens))
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(tensors)} tensors, next position {next_position}")


def cmd_inspect(args) -> int:
    from . import codec

    info = codec.inspect(_read_bytes(args.input), profile=_load_profile(args.profile))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["model"]
    print(f"seqkv container v{info['format_version']} ({info['created_by']})")
    print(f"  preset          {info['preset']}  pipeline {json.dumps(info['pipeline'])}")
    print(f"  model           {m['layers']} layers x {m['kv_heads']} KV heads x head_dim {m['head_dim']}, "
          f"RoPE {m['rope_type']} theta={m['rope_theta']:g}; fingerprint {m['fingerprint'][:16]}")
    print(f"  cache           {info['dtype']}, {info['tokens']} tokens, positions {info['positions']['start']}.."
          f"{info['positions']['next'] - 1} (next {info['positions']['next']})")
    print(f"  size            {info['total_bytes']} bytes (header {info['header_bytes']}), keys {info['keys_bytes']}, "
          f"values {info['values_bytes']}")
    print(f"  ratio vs fp16   {info['ratio_vs_fp16']:.3f}x   bits/element {info['bits_per_element']:.4f}")
    rc = info["rate_control"] or {}
    if "predicted_kl" in rc:   # calibrated: the KL its profile predicts, with the error bar the profile records
        span = rc.get("predicted_kl_range")
        print(f"  predicted KL    {rc['predicted_kl']:.4g}" + (f" (held-out range {span[0]:.4g} to {span[1]:.4g})"
                                                              if span else "") + f"; {rc['predicted_kl_note']}")
    if "measured_kl" in rc:    # closed-loop rate control: what the encoder measured on the cache's own last tokens
        print(f"  measured KL     {rc['measured_kl']:.4g} on the cache's last {rc['probe_tokens']} tokens "
              f"({rc['measurements']} scales tried; docs/rate_control.md)")
    if args.sections:
        for name, size in info["section_bytes"].items():
            print(f"    {name:24s} {size}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate

    paths = args.text or calibration_texts()
    for path in paths:   # a missing text fails before the (slow) model load
        _read_text(path)
    model, tokenizer = _model(args.model)
    t0 = time.perf_counter()
    if args.add_triattention:   # extend an existing profile: same codec part, so its containers still decode
        from .pruning.triattention import calibrate as calibrate_triattention

        base = _load_profile(args.add_triattention)
        ids = [tokenizer(_read_text(p), return_tensors="pt").input_ids[0, :args.tokens] for p in paths]
        profile = base.with_triattention(calibrate_triattention(model, ids))
    else:
        profile = calibrate(model, [_read_text(p) for p in paths], tokenizer=tokenizer, prompt_len=args.tokens,
                            continuation_len=args.continuation_len, progress=True,
                            info={"texts": [os.path.basename(p) for p in paths]}, triattention=args.triattention)
    profile.save(args.output)
    print(f"wrote {args.output}: {profile.nbytes} bytes, sha256 {profile.hash} (codec part {profile.codec_hash}), "
          f"kl_gain {profile.kl_gain:.3f} (samples {profile.info.get('kl_gain_samples')}), "
          f"TriAttention {'yes' if profile.triattention is not None else 'no'}, {time.perf_counter() - t0:.0f} s")
    check = profile.kl_check
    print("held-out KL check: none (one text)" if check is None else
          f"held-out KL check ({check.method}, {check.texts} texts): measured / predicted KL "
          f"{check.low:.3f} to {check.high:.3f}, per target " + ", ".join(
              f"{row['target_kl']:g}: {row['min']:.3f}-{row['max']:.3f} (geomean {row['geomean']:.3f})"
              for row in check.per_target()))
    return 0


def cmd_analyze(args) -> int:
    from .analyze import analyze

    from . import codec
    from .shipped_profiles import profile_for_ref

    profile = _load_profile(args.profile)
    if args.input:
        data = _read_bytes(args.input)
        if profile is None:   # a container made with the shipped profile
            profile = profile_for_ref((codec.inspect(data)["profile"] or {}).get("sha256"))
        result = analyze(data, profile=profile)
        what = args.input
    else:
        model, tokenizer = _model()
        _, n, cache = _prefill_text(model, tokenizer, _read_text(args.text), args.tokens, "float16")
        options = _encode_options(args)
        if "preset" not in options and "profile" not in options:
            options["profile"] = _shipped_profile(model)
        result = analyze(cache, model=model, **options)
        what = f"{os.path.basename(args.text or DEFAULT_TEXT)}, {n} tokens"
    table = result.markdown()
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# seqkv analyze: {what}\n\nWritten by `seqkv {' '.join(sys.argv[1:])}`. Bits per element of "
                    "each tensor (see seqkv/analyze.py for the definitions).\n\n" + table + "\n")
    return 0


def _load_profile(path):
    if path is None:
        return None
    from .profile import Profile

    return Profile.load(path)


def cmd_eval(args) -> int:
    from .evaluate import evaluate_text, format_table

    configs = {}
    for item in args.config or []:
        name, sep, raw = item.partition("=")
        try:
            kwargs = json.loads(raw) if sep else None
        except ValueError as exc:
            raise SeqKVError(f"--config {item!r}: not JSON: {exc}") from None
        if not name or not isinstance(kwargs, dict):
            raise SeqKVError(f"--config needs NAME='{{\"preset\": ..., options}}', got {item!r}")
        configs[name] = kwargs
    profile = _load_profile(args.profile)
    model, tokenizer = _model()
    texts = args.text or [None]
    out = []
    report = []
    for path in texts:
        rows = evaluate_text(model, tokenizer, _read_text(path), presets=args.presets, prompt_len=args.prompt_len,
                             continuation_len=args.continuation_len, cache_dtype=args.cache_dtype,
                             configs=configs, repeat=args.repeat, progress=True, profile=profile,
                             passkey=args.passkey, copy=args.copy)
        title = f"{os.path.basename(path or DEFAULT_TEXT)} (P={args.prompt_len}, C={args.continuation_len}, {args.cache_dtype} cache)"
        table = format_table(rows, title)
        print(table + "\n", flush=True)
        report.append(table)
        out.append({"text": path, "rows": [r.as_dict() for r in rows]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.markdown:
        import platform

        import torch

        from .version import __version__

        preamble = (
            "# seqkv results\n\n"
            f"Written by `seqkv {' '.join(sys.argv[1:])}` (seqkv {__version__}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, {platform.machine()}, {os.cpu_count()} CPUs).\n\n"
            "Protocol (design notes §5): SmolLM2-135M-Instruct (the embedded GGUF, run in fp32 on the CPU); prefill "
            f"P={args.prompt_len} tokens of the text; the cache is stored as {args.cache_dtype}; encode, decode, then "
            f"teacher-force the next C={args.continuation_len} tokens with positions continuing at P, against the "
            "uncompressed cache's run. Mean/p99 KL(p_ref || p_codec) over the C positions, top-1 agreement, and the "
            "perplexity ratio exp(NLL_codec - NLL_ref). Ratio = raw fp16 bytes / every container byte; bits/elem = "
            "container bits / (layers x 2 x kv_heads x head_dim x tokens). MB/s are MB of fp16 cache per second of "
            "encode or decode (one run each, on a shared 2-core machine: see `bench/` for repeated, one-thread "
            "timings). The baselines compress the same stored bytes in the same run.\n\n"
        )
        if args.passkey or args.copy:
            preamble += ("Passkey (found/10, asked after the decoded cache) and copy probe (KL and top-1 on a passage "
                         "of the prefix repeated after it): docs/retrieval.md; the zstd baselines decode to the "
                         "uncompressed cache, so they show its result.\n\n")
        with open(args.markdown, "w") as f:
            f.write(preamble + "\n\n".join(report) + "\n")
    return 0


def _backend_options(items) -> dict:
    options = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SeqKVError(f"--backend-option needs NAME=VALUE, got {item!r}")
        options[name] = value
    return options


def _open_store(args, model=None):
    from .store import PrefixStore

    kw = {}
    if hasattr(args, "preset"):
        kw["preset"] = args.preset
    if hasattr(args, "chunk_tokens"):
        kw["chunk_tokens"] = args.chunk_tokens
    if getattr(args, "chunking", None):
        kw["chunking"] = args.chunking
    if getattr(args, "step", None) is not None:
        kw["codec_options"] = {"step": args.step}
    if getattr(args, "profile", None):
        # the calibrated codec: one fixed scale for every chunk (part of every key, like the profile)
        kw["profile"] = _load_profile(args.profile)
        kw["codec_options"] = {"scale": args.scale}
        kw.pop("preset", None)
    return PrefixStore(args.url, model=model, **kw, **_backend_options(args.backend_option))


def _check_store_args(args) -> None:
    """Fail before the (slow) model load on arguments that cannot work."""
    if args.chunk_tokens < 1:
        raise SeqKVError(f"--chunk-tokens must be at least 1, got {args.chunk_tokens}")
    if args.tokens < 1:
        raise SeqKVError(f"--tokens must be at least 1, got {args.tokens}")
    if args.profile and args.scale is None:
        raise SeqKVError("--profile needs --scale: the quantizer knob every chunk is coded with (seqkv.store.scale_for_kl "
                         "turns a KL target into one; 0.03 kept every session of docs/sessions_calibrated.md under KL 0.01)")
    if args.scale is not None and not args.profile:
        raise SeqKVError("--scale is the calibrated codec's knob: give --profile too (or --preset/--step for presets)")
    if args.profile and args.step is not None:
        raise SeqKVError("--step is a preset's knob; with --profile use --scale")
    _backend_options(args.backend_option)


def cmd_store_put(args) -> int:
    _check_store_args(args)
    text = _read_text(args.text)
    model, tokenizer = _model()
    ids, n, cache = _prefill_text(model, tokenizer, text, args.tokens, args.cache_dtype)
    with _open_store(args, model) as store:
        t0 = time.perf_counter()
        out = store.put(ids[0, :n].tolist(), cache)
        seconds = time.perf_counter() - t0
    codec_name = f"calibrated, scale {args.scale}" if args.profile else args.preset
    print(f"stored {n} tokens in {out['chunks']} chunks of {args.chunk_tokens} ({codec_name}, {args.cache_dtype} "
          f"cache): {out['chunks_written']} written ({out['bytes_written']} bytes), {out['chunks_reused']} already "
          f"stored ({out['bytes_reused']} bytes), {seconds:.2f} s")
    return 0


def cmd_store_get(args) -> int:
    _check_store_args(args)
    text = _read_text(args.text)
    model, tokenizer = _model()
    ids = tokenizer(text, return_tensors="pt").input_ids
    total = min(args.tokens, ids.shape[1])
    with _open_store(args, model) as store:
        n, cache = store.longest_prefix(ids[0, :total].tolist())
        fingerprint = store.fingerprint
    print(f"{n} of {total} leading tokens are stored")
    if args.output:
        if cache is None:
            raise SeqKVError(f"no prefix of the text is stored in {args.url}; nothing to write to {args.output}")
        _save_cache(cache, args.output, 0, n, fingerprint)
    return 0


def cmd_store_stats(args) -> int:
    with _open_store(args) as store:
        print(json.dumps(store.stats(), indent=2, sort_keys=True))
    return 0


def cmd_store_gc(args) -> int:
    if args.max_bytes < 0:
        raise SeqKVError(f"--max-bytes must be non-negative, got {args.max_bytes}")
    with _open_store(args) as store:
        print(json.dumps(store.gc(max_bytes=args.max_bytes), indent=2, sort_keys=True))
    return 0


def _add_store_parser(sub) -> None:
    st = sub.add_parser("store", help="a prefix store of compressed caches (file://, redis://, s3://)")
    ssub = st.add_subparsers(dest="store_command", required=True)

    def common(q, *, model: bool):
        q.add_argument("url", help="file:///path, redis://host:port/db or s3://bucket/prefix")
        q.add_argument("--backend-option", action="append", metavar="NAME=VALUE",
                       help="backend option (repeatable), e.g. key_prefix=... (redis) or endpoint_url=... (s3)")
        if model:
            q.add_argument("--text", help="text file (default: the packaged psf_license.txt)")
            q.add_argument("--tokens", type=int, default=2048, help="leading tokens of the text (default 2048)")
            q.add_argument("--preset", default="lossless", choices=PRESET_ORDER,
                           help="the store's preset (part of every key; default lossless)")
            q.add_argument("--chunk-tokens", type=int, default=256,
                           help="tokens per stored chunk (part of every key; default 256)")
            q.add_argument("--chunking", default="fixed", choices=["fixed", "content"],
                           help="chunk boundaries: every --chunk-tokens tokens, or content-defined so that a document "
                                "after other turns is found again as a near-duplicate (part of every key; default fixed)")
            q.add_argument("--step", type=float, help="quantizer step of a lossy preset (part of every key)")
            q.add_argument("--profile", help="a calibrated model profile (seqkv calibrate): store with the calibrated "
                                             "codec instead of --preset (its hash is part of every key)")
            q.add_argument("--scale", type=float,
                           help="with --profile: the quantizer scale of every chunk (part of every key)")

    sp = ssub.add_parser("put", help="prefill a text with the embedded model and store its cache")
    common(sp, model=True)
    sp.add_argument("--cache-dtype", default="float32", choices=["float16", "bfloat16", "float32"],
                    help="stored cache dtype (default float32, the model's: what cached_generate reuses losslessly)")
    sp.set_defaults(func=cmd_store_put)

    sg = ssub.add_parser("get", help="how many leading tokens of a text are stored; -o writes them as .safetensors")
    common(sg, model=True)
    sg.add_argument("-o", "--output", help="write the stored prefix's keys/values here (like `seqkv decode`)")
    sg.set_defaults(func=cmd_store_get)

    ss = ssub.add_parser("stats", help="entries, bytes and counters of a store, as JSON")
    common(ss, model=False)
    ss.set_defaults(func=cmd_store_stats)

    sc = ssub.add_parser("gc", help="evict entries down to --max-bytes: lowest expected reuse, then least recently "
                                    "used; never a referenced residual base")
    common(sc, model=False)
    sc.add_argument("--max-bytes", type=int, required=True)
    sc.set_defaults(func=cmd_store_gc)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqkv", description="Compress transformer KV caches.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="encode a real cache at every preset and continue generation from it")
    d.add_argument("--text", help="text file to prefill (default: the packaged psf_license.txt)")
    d.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    d.add_argument("--kl-tokens", type=int, default=256,
                   help="continuation tokens teacher-forced to measure the KL and top-1 (default 256)")
    d.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate (default 32)")
    d.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    d.add_argument("--profile", help="the calibrated rows' profile (default: the one shipped for the embedded model)")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("encode", help="prefill a text with the embedded model and write the encoded cache")
    e.add_argument("--text", help="text file (default: the packaged psf_license.txt)")
    e.add_argument("--tokens", type=int, default=2048)
    _add_encode_options(e)
    e.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    e.add_argument("--prune", metavar="NAME", help="drop tokens first with this pruner (docs/pruning.md): "
                                                 "sinks_window, key_norm, snapkv, expected_attention, triattention, ...")
    e.add_argument("--prune-ratio", type=float, help="with --prune: the fraction of tokens removed")
    e.add_argument("--prune-level", choices=["token", "layer", "chunk"],
                   help="with --prune: token (per head; default), layer or chunk (default layer with --profile)")
    e.add_argument("--prune-calibration", metavar="FILE",
                   help="with --prune triattention: its calibration (a saved one, or a profile that carries one; "
                        "default: --profile)")
    e.add_argument("-o", "--output", required=True)
    e.set_defaults(func=cmd_encode)

    dd = sub.add_parser("decode", help="decode a container to a .safetensors file of per-layer keys/values")
    dd.add_argument("input")
    dd.add_argument("-o", "--output", required=True)
    dd.add_argument("--profile", help="the profile a calibrated container was encoded with")
    dd.set_defaults(func=cmd_decode)

    i = sub.add_parser("inspect", help="show a container's header, sizes, ratio and bits/element")
    i.add_argument("input")
    i.add_argument("--json", action="store_true")
    i.add_argument("--sections", action="store_true", help="list every section's size")
    i.add_argument("--profile", help="a calibrated container's profile, for the predicted KL's error bar "
                   "(default: the one seqkv ships, when the container names it)")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("eval", help="ratio, KL, top-1, perplexity ratio and MB/s on real text, with baselines")
    v.add_argument("--text", action="append", help="text file (repeatable; default: the packaged psf_license.txt)")
    v.add_argument("--presets", nargs="*", default=list(PRESET_ORDER), choices=PRESET_ORDER)
    v.add_argument("--config", action="append", metavar="NAME=JSON",
                   help='an extra row: encode() keywords as JSON, e.g. hadamard=\'{"preset": "balanced", "rotation": "hadamard"}\'')
    v.add_argument("--prompt-len", type=int, default=2048)
    v.add_argument("--continuation-len", type=int, default=256)
    v.add_argument("--cache-dtype", default="float16", choices=["float16", "bfloat16"])
    v.add_argument("--repeat", type=int, default=1, help="timing repeats (best is kept)")
    v.add_argument("--profile", help="a calibrated profile: --config rows without a preset use it "
                   "(e.g. t01='{\"target_kl\": 0.01}'; default: the profile shipped for the embedded model)")
    v.add_argument("--passkey", action="store_true",
                   help="add passkey retrieval: 10 needles in ~1600 tokens of the text, asked after the decoded cache "
                   "(docs/retrieval.md)")
    v.add_argument("--copy", action="store_true",
                   help="add the copy probe: KL and top-1 on a passage of the prefix repeated after the decoded cache")
    v.add_argument("--json", help="also write the rows as JSON here")
    v.add_argument("--markdown", help="also write the tables as markdown here")
    v.set_defaults(func=cmd_eval)

    a = sub.add_parser("analyze", help="bits per layer and kind vs entropy and Gaussian R(D) bounds")
    a.add_argument("input", nargs="?", help="a container to analyse (else: prefill --text and encode it)")
    a.add_argument("--text", help="text file to prefill with the embedded model (default psf_license.txt)")
    a.add_argument("--tokens", type=int, default=2048)
    _add_encode_options(a)
    a.add_argument("--json", help="also write the analysis as JSON here")
    a.add_argument("--markdown", help="also write the table as markdown here")
    a.set_defaults(func=cmd_analyze)

    c = sub.add_parser("calibrate", help="calibrate a model profile (KLT, sensitivities) on real text")
    c.add_argument("--text", action="append", help="text file (repeatable; default: the packaged calibration "
                   "texts, seqkv/data/calibration/*.txt)")
    c.add_argument("--model", metavar="DIR", help="calibrate this local Hugging Face model folder (config, weights and "
                   "tokenizer; nothing is downloaded) instead of the embedded SmolLM2-135M-Instruct")
    c.add_argument("--tokens", type=int, default=2048, help="tokens per text (default 2048)")
    c.add_argument("--continuation-len", type=int, default=256)
    c.add_argument("-o", "--output", required=True, help="profile file to write (.safetensors)")
    c.add_argument("--triattention", action="store_true",
                   help="also store the TriAttention pruner's query centres (profile version 2)")
    c.add_argument("--add-triattention", metavar="PROFILE",
                   help="only add the TriAttention query centres to this existing profile (fast; same codec part)")
    c.set_defaults(func=cmd_calibrate)

    _add_store_parser(sub)
    from .integrations import lmcache_server   # LMCache itself is imported only when the command runs
    lmcache_server.add_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SeqKVError as exc:
        print(f"seqkv: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
