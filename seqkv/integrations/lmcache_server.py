"""``seqkv lmcache-server``: LMCache's ``lmcache server`` with the seqkv serde registered, on a filesystem L2.

    seqkv lmcache-server --l2-dir /var/cache/l2 --model embedded --preset balanced \\
        -- --supported-transfer-mode engine_driven --l1-size-gb 2

registers the ``"seqkv"`` serde in this process, adds one L2 adapter (:mod:`.lmcache_fs`'s short-read fs
adapter at ``--l2-dir`` with the serde options given here) and hands everything after ``--`` to
``lmcache server`` unchanged (``--l2-adapter`` included: more adapters can be added).  The serde options are
checked before LMCache starts, so a wrong model path or preset is a seqkv error, not a server traceback.

Nothing here imports LMCache until the command runs: ``seqkv --help`` works without it.
"""
from __future__ import annotations

import argparse
import json
import os

from ..errors import ConfigError


def add_parser(sub) -> None:
    """Add the ``lmcache-server`` subcommand to the ``seqkv`` command line's subparsers."""
    p = sub.add_parser("lmcache-server", help="run `lmcache server` with the seqkv serde on a filesystem L2",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--l2-dir", required=True, help="folder of the filesystem L2 (created if missing)")
    p.add_argument("--model", required=True, help="local model folder, config.json, .gguf file, or 'embedded'")
    p.add_argument("--gguf-file", help="the GGUF file inside --model's folder, where the model is one")
    codec = p.add_mutually_exclusive_group()
    codec.add_argument("--preset", help="lossless (default), near_lossless, balanced or small")
    codec.add_argument("--profile", help="a calibrated profile file, or 'shipped' (the model's shipped profile)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-kl", type=float, help="calibrated rate target (default 0.01)")
    target.add_argument("--scale", type=float, help="calibrated codec's step scale, instead of --target-kl")
    p.add_argument("--packing", choices=("tokens", "vllm_cpu_amx"),
                   help="how fused chunks are packed: per token (default), or vLLM-CPU's AMX pages (docs/lmcache.md)")
    p.add_argument("--block-size", type=int, help="the engine's KV block size, for --packing vllm_cpu_amx (default 128)")
    p.add_argument("--serde-workers", type=int, default=1, help="serde threads (default 1)")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads (default 1: the codec's small matrix products only lose from more, and "
                        "on a busy CPU much; sets OPENBLAS_NUM_THREADS unless already set)")
    p.add_argument("--dry-run", action="store_true", help="print the `lmcache` arguments as JSON and exit")
    p.add_argument("lmcache_args", nargs=argparse.REMAINDER,
                   help="after --: arguments for `lmcache server` (e.g. --supported-transfer-mode engine_driven)")
    p.set_defaults(func=cmd_lmcache_server)


def serde_options(args) -> dict:
    """The ``"serde"`` object the command line describes."""
    options = {"type": "seqkv", "model": args.model, "max_workers": args.serde_workers}
    for name in ("gguf_file", "preset", "profile", "target_kl", "scale", "packing", "block_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def lmcache_argv(args) -> list[str]:
    """The ``lmcache`` command line: ``server``, the seqkv L2 adapter, then the arguments after ``--``."""
    from .lmcache_fs import adapter_spec

    rest = list(args.lmcache_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    spec = adapter_spec(args.l2_dir, serde_options(args))
    return ["server", "--l2-adapter", json.dumps(spec, separators=(",", ":")), *rest]


def cmd_lmcache_server(args) -> int:
    # before numpy loads OpenBLAS (nothing has imported it yet: the command line imports no numerics)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.blas_threads))
    try:
        from .lmcache import create_serde, register
    except ImportError as exc:
        raise ConfigError(f"`seqkv lmcache-server` needs LMCache: pip install lmcache==0.5.6 ({exc})") from None
    options = serde_options(args)
    options.pop("type")
    create_serde(options).close()   # the serde options, checked here (ConfigError) rather than inside the server
    argv = lmcache_argv(args)
    if args.dry_run:
        print(json.dumps(argv))
        return 0
    register()
    from lmcache.cli.main import main as lmcache_main

    lmcache_main(argv)
    return 0
