"""Fuzz the decoder: mutated containers of every kind decode, or raise a DecodeError subclass, in time and memory
proportional to their size (issue 16).

    python bench/fuzz.py --mutations 100000 --kind balanced          # one kind, the built-in mutator
    python bench/fuzz.py --mutations 100000 --kind all               # every kind, one after the other
    python bench/fuzz.py --engine atheris --kind balanced --mutations 100000   # coverage-guided (libFuzzer)
    python bench/fuzz.py --write-corpus                              # rewrite tests/fuzz_corpus/ (format change)

Run it at low priority on a shared machine (``nice -n 19 python bench/fuzz.py ...``).  Kinds: every preset,
Lloyd-Max with the Hadamard rotation, the calibrated codec, pruned (ragged per head and calibrated per layer)
containers, and store chunk payloads (plain, residual on a base chunk, calibrated), read with
``seqkv.format.open_container(payload, dialect="store_chunk")``.

Each mutation starts from the kind's seed container (tests/fuzz_corpus/KIND.skv) and applies one to three of:
raw byte damage (caught by lengths and checksums), a section payload edit resealed (its checksum and the
section table recomputed, so the edit reaches the parsers), a header edit resealed (a JSON value replaced,
removed or added, the header checksum and section table recomputed; the edits include the named ones of
issue 16, such as doubling ``tokens``), JSON text damage resealed, or preamble edits.  Then it decodes every
layer, and runs ``inspect`` and ``token_positions`` (store chunks: ``chunk_layers``).

Reported per kind: the outcomes (decoded, or each exception type), any exception other than a DecodeError
(a bug: its input is written to --out), the slowest decode (wall and CPU time, and CPU nanoseconds per element
the input justifies), and the largest peak RSS growth of one decode
(Linux VmHWM, reset before each; the script re-runs itself with MALLOC_MMAP_THRESHOLD_=65536 so that freed
buffers leave RSS), in bytes and relative to what the input's size justifies: the format's expansion bound of
MAX_ELEMENTS_PER_BYTE elements per container byte, as float32 (docs/format.md §3), plus a fixed 1 MiB.
The exit status is 1 when any unexpected exception occurred.

``--engine atheris`` drives the same mutations from libFuzzer's input bytes (atheris's FuzzedDataProvider), so
coverage feedback steers them; tests/test_fuzz.py runs a short pass of the built-in engine in the normal suite.
"""
from __future__ import annotations

import argparse
import collections
import copy
import functools
import json
import os
import random
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
CORPUS = os.path.join(TESTS, "fuzz_corpus")
GOLDEN_PROFILE = os.path.join(TESTS, "golden", "v1_1_calibrated_fp16.profile.safetensors")
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import seqkv  # noqa: E402
from seqkv.checksum import crc32c  # noqa: E402
from seqkv.errors import ConfigError, DecodeError  # noqa: E402
from seqkv.format import open_container  # noqa: E402
from seqkv.format.container import FLAG_PRUNED, MAGIC, PREAMBLE, PREAMBLE_SIZE, Container  # noqa: E402
from seqkv.format.header import MAX_ELEMENTS_PER_BYTE  # noqa: E402
from seqkv.profile import Profile, ProfileMismatchError  # noqa: E402

KINDS = ["lossless16", "lossless32", "near_lossless", "balanced", "small", "lloydmax", "calibrated", "pruned",
         "pruned_calibrated", "chunk", "chunk_residual", "chunk_calibrated"]
CHUNK_KINDS = ("chunk", "chunk_residual", "chunk_calibrated")
CALIBRATED_KINDS = ("calibrated", "pruned_calibrated", "chunk_calibrated")
# what any input may cost regardless of its size (exceptions, tracebacks, small tables): the ratios reported are
# peak / (4 bytes x MAX_ELEMENTS_PER_BYTE x input bytes + FIXED_BYTES), and CPU time per (justified + FIXED) element
FIXED_BYTES = 1 << 20
FIXED_ELEMENTS = 1 << 18


# -- the seed corpus ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def profile() -> Profile:
    """The tiny llama profile of tests/conftest.py, as the golden files keep it."""
    return Profile.load(GOLDEN_PROFILE)


def build_corpus() -> dict[str, bytes]:
    """Every kind's seed container, made from tests/conftest.py's tiny models (small: 2-10 KB each)."""
    sys.path.insert(0, TESTS)
    from conftest import tiny_cache, tiny_model  # noqa: E402
    from seqkv.layout import layout_from_model
    from seqkv.presets import calibrated_pipeline_config, pipeline_config
    from seqkv.store.chunk_codec import encode_chunk

    out = {}
    model = tiny_model("llama")
    _, c16 = tiny_cache("llama", tokens=12, dtype=torch.float16, seed=3)
    out["lossless16"] = seqkv.encode(c16, preset="lossless", model=model)
    qwen, c32 = tiny_cache("qwen2", tokens=9, seed=3)
    out["lossless32"] = seqkv.encode(c32, preset="lossless", model=qwen, positions=list(range(0, 18, 2)))
    _, cbf = tiny_cache("llama", tokens=16, dtype=torch.bfloat16, seed=3)
    for preset in ("near_lossless", "balanced", "small"):
        out[preset] = seqkv.encode(cbf, preset=preset, model=model, positions=5)
    _, cf32 = tiny_cache("llama", tokens=12, seed=3)
    out["lloydmax"] = seqkv.encode(cf32, preset="balanced", model=model, rotation="hadamard", quantizer="lloydmax",
                                   bits=3, seed=11)
    _, c40 = tiny_cache("llama", tokens=40, dtype=torch.float16, seed=3)
    out["calibrated"] = seqkv.encode(c40, model=model, profile=profile(), scale=0.03)
    out["pruned"] = seqkv.encode(c40, preset="balanced", model=model,
                                 prune=seqkv.pruner("key_norm", ratio=0.5, head_budget="adaptive"))
    out["pruned_calibrated"] = seqkv.encode(c40, model=model, profile=profile(), scale=0.03,
                                            prune=seqkv.pruner("key_norm", ratio=0.5, level="layer"))
    layout = layout_from_model(model)
    layers = [(layer.keys[0], layer.values[0]) for layer in c16.layers]
    pos = torch.arange(12)
    out["chunk"], _ = encode_chunk(layers, pos, pipeline_config("balanced"), layout, "float16",
                                   token_section=bytes(range(24)), token_code="zstd")
    base_layers = open_container(out["chunk"], dialect="store_chunk").chunk_layers()
    near = [(k.float().mul(1.01).half(), v.float().mul(0.99).half()) for k, v in base_layers]
    out["chunk_residual"], info = encode_chunk(near, pos, pipeline_config("balanced"), layout, "float16",
                                               token_section=None, token_code="base",
                                               base=("base-key", base_layers, pos))
    if not info["residual_sections"]:
        raise RuntimeError("the residual chunk sample has no residual section")
    out["chunk_calibrated"], _ = encode_chunk(layers, torch.arange(100, 112), calibrated_pipeline_config(4), layout,
                                              "float16", token_section=bytes(range(8)), token_code="trie",
                                              profile=profile(), scale=0.05)
    return out


def write_corpus() -> None:
    os.makedirs(CORPUS, exist_ok=True)
    for kind, blob in build_corpus().items():
        with open(os.path.join(CORPUS, f"{kind}.skv"), "wb") as f:
            f.write(blob)
        print(f"{kind}: {len(blob)} bytes")


@functools.lru_cache(maxsize=None)
def seed(kind: str) -> bytes:
    with open(os.path.join(CORPUS, f"{kind}.skv"), "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def chunk_base():
    """(layers, positions) of the base the residual chunk sample was coded against."""
    reader = open_container(seed("chunk"), dialect="store_chunk")
    return reader.chunk_layers(), reader.positions


# -- running one input -------------------------------------------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_one(kind: str, blob: bytes):
    """Decode ``blob`` as ``kind`` does; returns (outcome name, unexpected exception or None)."""
    try:
        if kind in CHUNK_KINDS:
            reader = open_container(blob, dialect="store_chunk", profile=profile())
            has_base = reader.header.chunk.base is not None
            layers = reader.chunk_layers(chunk_base() if has_base else None)
            elements = sum(k.numel() + v.numel() for k, v in layers)
        else:
            cache = seqkv.decode(blob, profile=profile())
            elements = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
            seqkv.inspect(blob)
            try:
                seqkv.token_positions(blob)
            except ConfigError:
                if getattr(cache, "seqkv_pruned", None) is None:
                    raise
        if elements > MAX_ELEMENTS_PER_BYTE * len(blob):
            raise AssertionError(f"decoded {elements} elements from {len(blob)} bytes, over the expansion bound")
        return "decoded", None
    except (DecodeError, ProfileMismatchError) as exc:  # a mutated profile reference names another profile
        return type(exc).__name__, None
    except Exception as exc:  # noqa: BLE001 - anything else is what we are looking for
        return type(exc).__name__, exc


def warm_up(kind: str) -> None:
    """Decode the seed a few times unmeasured: the first decode imports modules and builds caches."""
    for _ in range(3):
        run_one(kind, seed(kind))


class Stats:
    def __init__(self, kind: str):
        self.kind = kind
        self.runs = 0
        self.outcomes = collections.Counter()
        self.unexpected = []          # (exception repr, traceback, input file)
        self.max_seconds = (0.0, 0)   # (wall seconds, input bytes)
        self.max_cpu = (0.0, 0)       # (CPU seconds of this process, input bytes): what a loaded machine cannot blur
        self.max_cpu_ratio = 0.0      # CPU seconds / (justified elements + FIXED_ELEMENTS), as ns per element
        self.max_peak = (0, 0)        # (peak RSS growth in bytes, input bytes)
        self.max_peak_ratio = 0.0     # peak growth / (what the input justifies, as float32, + FIXED_BYTES)
        self.peak_measured = _reset_peak()

    def run(self, blob: bytes, out_dir: str | None) -> None:
        if self.peak_measured:
            _reset_peak()
        before = _status("VmRSS:")
        t0, c0 = time.perf_counter(), time.process_time()
        outcome, exc = run_one(self.kind, blob)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = max(0, _status("VmHWM:") - before) if self.peak_measured else 0
        self.runs += 1
        self.outcomes[outcome] += 1
        if seconds > self.max_seconds[0]:
            self.max_seconds = (seconds, len(blob))
        if cpu > self.max_cpu[0]:
            self.max_cpu = (cpu, len(blob))
        justified = MAX_ELEMENTS_PER_BYTE * len(blob)
        self.max_cpu_ratio = max(self.max_cpu_ratio, cpu * 1e9 / (justified + FIXED_ELEMENTS))
        if peak > self.max_peak[0]:
            self.max_peak = (peak, len(blob))
        self.max_peak_ratio = max(self.max_peak_ratio, peak / (4 * justified + FIXED_BYTES))
        if exc is not None:
            path = None
            if out_dir:
                os.makedirs(out_dir, exist_ok=True)
                path = os.path.join(out_dir, f"{self.kind}-{self.runs}-{type(exc).__name__}.skv")
                with open(path, "wb") as f:
                    f.write(blob)
            self.unexpected.append((repr(exc)[:300], traceback.format_exc(limit=6), path))

    def report(self) -> dict:
        return {"kind": self.kind, "mutations": self.runs, "outcomes": dict(self.outcomes.most_common()),
                "unexpected": len(self.unexpected),
                "unexpected_examples": [{"exception": e, "input": p, "traceback": tb} for e, tb, p in self.unexpected[:5]],
                "max_decode_seconds": round(self.max_seconds[0], 4), "max_decode_seconds_input_bytes": self.max_seconds[1],
                "max_decode_cpu_seconds": round(self.max_cpu[0], 4), "max_decode_cpu_input_bytes": self.max_cpu[1],
                "max_cpu_ns_per_justified_element": round(self.max_cpu_ratio, 2),
                "max_peak_rss_growth_bytes": self.max_peak[0], "max_peak_input_bytes": self.max_peak[1],
                "max_peak_vs_justified": round(self.max_peak_ratio, 5) if self.peak_measured else None,
                "justified": f"{MAX_ELEMENTS_PER_BYTE} float32 elements per input byte + {FIXED_BYTES >> 20} MiB "
                             f"({FIXED_ELEMENTS} elements for time)"}


# -- mutations ---------------------------------------------------------------------------------------------

class RandomChooser:
    """The choices a mutation makes, from a seeded PRNG."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def bytes(self, n: int) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(n))


class AtherisChooser:
    """The same choices, read from libFuzzer's input (coverage feedback steers them)."""

    def __init__(self, fdp):
        self.fdp = fdp

    def int(self, lo: int, hi: int) -> int:
        return self.fdp.ConsumeIntInRange(lo, hi)

    def choice(self, seq):
        return seq[self.fdp.ConsumeIntInRange(0, len(seq) - 1)]

    def bytes(self, n: int) -> bytes:
        return self.fdp.ConsumeBytes(n)


def split(blob: bytes):
    c = Container(blob)
    return copy.deepcopy(c.header), [bytes(c.section(e["name"])) for e in c.header["sections"]]


def reseal(header: dict, sections: list, like: bytes, *, header_bytes: bytes | None = None) -> bytes:
    """A container of ``header`` and ``sections`` whose section table and checksums are right, with the
    preamble's version and flags of ``like`` (the writer's minor for such contents)."""
    names = [e.get("name", f"s{i}") if isinstance(e, dict) else f"s{i}"
             for i, e in enumerate(header.get("sections") or [])] if isinstance(header, dict) else []
    if header_bytes is None:
        table, offset = [], 0
        for i, payload in enumerate(sections):
            table.append({"name": names[i] if i < len(names) else f"extra.{i}", "offset": offset,
                          "length": len(payload), "crc32c": crc32c(payload)})
            offset += len(payload)
        header_bytes = json.dumps(dict(header, sections=table)).encode()
    _, major, minor, flags, _, _ = PREAMBLE.unpack_from(like, 0)
    return PREAMBLE.pack(MAGIC, major, minor, flags, len(header_bytes), crc32c(header_bytes)) + header_bytes + b"".join(sections)


def _edit_bytes(ch, data: bytearray) -> bytearray:
    op = ch.choice(["flip", "overwrite", "truncate", "extend", "insert", "delete", "zero", "ff", "dup"])
    n = len(data)
    if op == "flip" and n:
        i = ch.int(0, n - 1)
        data[i] ^= 1 << ch.int(0, 7)
    elif op == "overwrite" and n:
        i = ch.int(0, n - 1)
        data[i:i + 8] = ch.bytes(ch.int(1, 8))
    elif op == "truncate":
        del data[ch.int(0, n):]
    elif op == "extend":
        data += ch.bytes(ch.int(1, 64))
    elif op == "insert":
        i = ch.int(0, n)
        data[i:i] = ch.bytes(ch.int(1, 8))
    elif op == "delete" and n:
        i = ch.int(0, n - 1)
        del data[i:i + ch.int(1, 16)]
    elif op in ("zero", "ff") and n:
        i = ch.int(0, n - 1)
        j = min(n, i + ch.int(1, 32))
        data[i:j] = (b"\x00" if op == "zero" else b"\xff") * (j - i)
    elif op == "dup" and n:
        i = ch.int(0, n - 1)
        data[i:i] = data[i:i + ch.int(1, 32)]
    return data


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            if prefix == () and k == "sections":
                continue
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _json_paths(v, prefix + (i,))


def _interesting(ch, old):
    values = [None, True, False, 0, 1, -1, 2, 3, 7, 255, 256, 2**16, 2**26, 2**26 + 1, 2**31, 2**32, 2**40, 2**62,
              2**63, 2**64, -2**63, 10**30, 0.0, 0.5, -0.5, 1e-50, 1e39, -1e39, 1.7e308, "", "x", "false", "0",
              "float16", "bfloat16", "float32", "lossy", "lossless", [], [0], {}, {"id": "uniform"},
              {"id": "hadamard", "seed": 0}, {"id": "temporal_ar"}, {"id": "context_ans"}, {"id": "klt"}]
    if isinstance(old, bool):
        values += [not old, int(old), str(old).lower()]
    elif isinstance(old, int):
        values += [old * 2, old + 1, old - 1, -old, float(old), str(old), old * 1000]
    elif isinstance(old, float):
        values += [old * 2, -old, old / 2, str(old), int(old), old * 1e30]
    elif isinstance(old, str):
        values += [old + "x", old[:-1], old.upper()]
    return ch.choice(values)


def _semantic_edit(ch, header: dict) -> None:
    """The named edits of issue 16 and their relatives: counts and shapes that stay self-consistent."""
    op = ch.choice(["tokens_x2", "tokens_x1000", "tokens+1", "tokens-1", "layers+1", "heads+1", "dim*2", "dtype",
                    "sinks", "rope_1e39", "rope_scaling", "crc_float"])
    pos = header.get("positions") if isinstance(header.get("positions"), dict) else {}
    tokens = header.get("tokens") if isinstance(header.get("tokens"), int) else 1
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    if op.startswith("tokens"):
        new = {"tokens_x2": tokens * 2, "tokens_x1000": tokens * 1000, "tokens+1": tokens + 1,
               "tokens-1": max(1, tokens - 1)}[op]
        header["tokens"] = new
        if isinstance(pos.get("start"), int) and isinstance(pos.get("next"), int):
            pos["next"] = pos["start"] + new if pos.get("contiguous") else pos["next"] + new - tokens
        if isinstance(header.get("pruning"), dict) and isinstance(header["pruning"].get("source_tokens"), int):
            header["pruning"]["source_tokens"] = max(header["pruning"]["source_tokens"], new)
    elif op in ("layers+1", "heads+1", "dim*2"):
        key = {"layers+1": "layers", "heads+1": "kv_heads", "dim*2": "head_dim"}[op]
        if isinstance(header.get(key), int):
            header[key] = header[key] * 2 if op == "dim*2" else header[key] + 1
            model[key] = header[key]
            if key == "head_dim" and isinstance(model.get("rope_inv_freq"), list):
                model["rope_inv_freq"] = model["rope_inv_freq"] * 2
    elif op == "dtype":
        header["dtype"] = ch.choice(["float16", "bfloat16", "float32"])
    elif op == "sinks":
        for key in ("pipeline", "chunk_pipeline"):
            if isinstance(header.get(key), dict):
                header[key]["sink_tokens"] = ch.choice([0, 1, 3, 5, 8, tokens, tokens + 1, 2**26])
    elif op == "rope_1e39" and isinstance(model.get("rope_inv_freq"), list) and model["rope_inv_freq"]:
        model["rope_inv_freq"][ch.int(0, len(model["rope_inv_freq"]) - 1)] = ch.choice([1e39, -1e39, 3.5e38, 1e-45])
    elif op == "rope_scaling":
        model["rope_attention_scaling"] = ch.choice([1e39, 1e-50, 0.0, -1.0, 3.4e38, 1e-38])


def mutate(ch, blob: bytes) -> bytes:
    for _ in range(ch.int(1, 3)):
        try:
            blob = mutate_once(ch, blob)
        except (TypeError, KeyError, IndexError, AttributeError, ValueError):
            # an edit that does not fit what earlier edits left (a mutator limit, not a finding): raw damage instead
            blob = bytes(_edit_bytes(ch, bytearray(blob)))
    return blob


def mutate_once(ch, blob: bytes) -> bytes:
    try:
        header, sections = split(blob)
    except DecodeError:   # an earlier mutation broke the framing: raw damage only
        return bytes(_edit_bytes(ch, bytearray(blob)))
    op = ch.choice(["raw", "section", "section", "section", "header", "header", "header", "semantic", "semantic",
                    "json_text", "preamble", "swap_sections"])
    if op == "raw":
        return bytes(_edit_bytes(ch, bytearray(blob)))
    if op == "section" and sections:
        i = ch.int(0, len(sections) - 1)
        sections[i] = bytes(_edit_bytes(ch, bytearray(sections[i])))
        return reseal(header, sections, blob)
    if op == "swap_sections" and len(sections) > 1:
        i, j = ch.int(0, len(sections) - 1), ch.int(0, len(sections) - 1)
        sections[i], sections[j] = sections[j], sections[i]
        return reseal(header, sections, blob)
    if op == "header":
        paths = [p for p in _json_paths(header) if p]
        path = ch.choice(paths)
        target = header
        for key in path[:-1]:
            target = target[key]
        action = ch.choice(["set", "set", "set", "delete", "add"])
        if action == "delete" and isinstance(target, dict):
            target.pop(path[-1], None)
        elif action == "add" and isinstance(target, dict):
            target[ch.choice(["zz_unknown", "id", "seed", "step", "bits", "cross_layer", "predictor"])] = \
                _interesting(ch, None)
        else:
            target[path[-1]] = _interesting(ch, target[path[-1]])
        return reseal(header, sections, blob)
    if op == "semantic":
        _semantic_edit(ch, header)
        return reseal(header, sections, blob)
    if op == "json_text":
        header_len = PREAMBLE.unpack_from(blob, 0)[4]
        text = _edit_bytes(ch, bytearray(blob[PREAMBLE_SIZE:PREAMBLE_SIZE + header_len]))
        return reseal(header, sections, blob, header_bytes=bytes(text))
    if op == "preamble":
        data = bytearray(blob)
        field = ch.choice([8, 9, 10, 11])   # major, minor, flags
        data[field] = ch.choice([0, 1, 2, 3, 255, data[field] ^ FLAG_PRUNED])
        return bytes(data)
    return bytes(_edit_bytes(ch, bytearray(blob)))


# -- engines -----------------------------------------------------------------------------------------------

def run_builtin(kind: str, mutations: int, seed_value: int, out_dir: str | None, progress_every: int = 0) -> Stats:
    rng = random.Random(f"{kind}-{seed_value}")
    warm_up(kind)
    stats = Stats(kind)
    stats.run(seed(kind), out_dir)   # the seed itself must decode
    if stats.outcomes.get("decoded") != 1:
        raise RuntimeError(f"the seed container of {kind} does not decode: {dict(stats.outcomes)}")
    ch = RandomChooser(rng)
    t0 = time.time()
    for n in range(mutations):
        stats.run(mutate(ch, seed(kind)), out_dir)
        if progress_every and (n + 1) % progress_every == 0:
            print(f"  {kind}: {n + 1}/{mutations} ({time.time() - t0:.0f} s), {dict(stats.outcomes.most_common(4))}",
                  file=sys.stderr, flush=True)
    return stats


def run_atheris(kind: str, mutations: int, out_dir: str | None, libfuzzer_args: list) -> Stats:
    """libFuzzer drives the mutations; seqkv's Python code is instrumented for coverage.  The report is
    printed after the last run (libFuzzer ends the process itself)."""
    import atheris  # pip install atheris (prebuilt wheels for CPython 3.8-3.11 on Linux x86-64)

    for name, module in list(sys.modules.items()):   # coverage of seqkv's Python code (not torch's)
        if (name == "seqkv" or name.startswith("seqkv.")) and module is not None:
            for value in list(vars(module).values()):
                if getattr(value, "__module__", None) == name and callable(value):
                    try:
                        if isinstance(value, type):
                            for attr, member in list(vars(value).items()):
                                if callable(member) and hasattr(member, "__code__"):
                                    setattr(value, attr, atheris.instrument_func(member))
                        elif hasattr(value, "__code__"):
                            setattr(module, value.__name__, atheris.instrument_func(value))
                    except Exception:  # noqa: BLE001 - what cannot be instrumented runs as it is
                        pass
    warm_up(kind)
    stats = Stats(kind)
    blob0 = seed(kind)

    def one_input(data: bytes) -> None:
        ch = AtherisChooser(atheris.FuzzedDataProvider(data))
        stats.run(mutate(ch, blob0), out_dir)   # unexpected exceptions are saved and reported, not raised
        if stats.runs == mutations:
            print(json.dumps({k: v for k, v in stats.report().items() if k != "unexpected_examples"}), flush=True)
            for example in stats.report()["unexpected_examples"]:
                print(example["traceback"], file=sys.stderr, flush=True)

    os.makedirs(out_dir or ".", exist_ok=True)
    atheris.Setup([sys.argv[0], f"-runs={mutations}", "-max_len=4096",
                   f"-artifact_prefix={os.path.join(out_dir or '.', '')}", *libfuzzer_args], one_input)
    atheris.Fuzz()
    return stats


def main(argv=None) -> int:
    if argv is None and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc raises its mmap threshold after large frees and then keeps freed buffers resident, which hides
        # later peaks from VmHWM: a fixed threshold maps (and unmaps) every buffer over 64 KiB
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="balanced", help=f"one of {KINDS}, or 'all'")
    ap.add_argument("--mutations", type=int, default=10000, help="mutated inputs per kind")
    ap.add_argument("--engine", choices=["builtin", "atheris"], default="builtin")
    ap.add_argument("--seed", type=int, default=0, help="the built-in engine's PRNG seed")
    ap.add_argument("--out", default="/tmp/seqkv-fuzz", help="where inputs that raised unexpected exceptions go")
    ap.add_argument("--json", help="write the report here as JSON")
    ap.add_argument("--write-corpus", action="store_true", help="rewrite tests/fuzz_corpus/ and exit")
    ap.add_argument("libfuzzer", nargs="*", help="after --: options for libFuzzer (atheris engine)")
    args = ap.parse_args(argv)
    if args.write_corpus:
        write_corpus()
        return 0
    kinds = KINDS if args.kind == "all" else [args.kind]
    if any(k not in KINDS for k in kinds):
        ap.error(f"--kind must be one of {KINDS} or 'all'")
    if args.engine == "atheris":
        if len(kinds) != 1:
            ap.error("the atheris engine fuzzes one kind per process")
        run_atheris(kinds[0], args.mutations, args.out, args.libfuzzer)
        return 0
    reports = []
    for kind in kinds:
        t0 = time.time()
        stats = run_builtin(kind, args.mutations, args.seed, args.out, progress_every=max(1000, args.mutations // 10))
        report = dict(stats.report(), seconds=round(time.time() - t0, 1))
        reports.append(report)
        print(json.dumps({k: v for k, v in report.items() if k != "unexpected_examples"}), flush=True)
        for example in report["unexpected_examples"]:
            print(example["traceback"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if any(r["unexpected"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
