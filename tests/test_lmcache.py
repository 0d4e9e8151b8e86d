"""The "seqkv" serde inside LMCache 0.5.6 (seqkv.integrations.lmcache), on CPU with real tensors: through
LMCache's own serde factory and AsyncSerdeProcessor, and through its StorageManager with a filesystem L2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("lmcache")   # CI installs it: the `test` extra pins lmcache==0.5.6

import seqkv   # noqa: E402
from conftest import tiny_cache, tiny_profile   # noqa: E402
from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, ObjectKey, PrefetchTaskSpec   # noqa: E402
from lmcache.v1.distributed.config import (EvictionConfig, L1ManagerConfig, L1MemoryManagerConfig,   # noqa: E402
                                           StorageManagerConfig)
from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config   # noqa: E402
from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor   # noqa: E402
from lmcache.v1.distributed.storage_manager import StorageManager   # noqa: E402

from seqkv.errors import ConfigError, FormatError, ModelMismatchError   # noqa: E402
from seqkv.integrations.chunk_blob import ChunkMismatchError, unframe   # noqa: E402
from seqkv.integrations.chunk_layout import ChunkLayoutError   # noqa: E402
from seqkv.integrations.chunk_positions import StartFinder   # noqa: E402
from seqkv.integrations.lmcache import (SeqKVDeserializer, SeqKVSerializer, codec_from_options, create_serde,   # noqa: E402
                                       memory_object, register)
from seqkv.integrations.lmcache_fs import adapter_spec   # noqa: E402
from seqkv.hf_adapter import build_cache   # noqa: E402
from seqkv.stages.rope import keys_to_post_rope   # noqa: E402
from seqkv.testing import assert_within_bound, model_config   # noqa: E402

LAYOUTS = ("kv", "fused")
TOKENS = 40
KEY = ObjectKey(chunk_hash=b"\x07" * 32, model_name="tiny", kv_rank=0)


@pytest.fixture(scope="module", autouse=True)
def registered():
    from threadpoolctl import threadpool_limits

    register()
    with threadpool_limits(limits=1, user_api="blas"):   # the KLT products are small: BLAS threads only wait
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local model folder holding the tiny test model's config.json (the serde reads nothing else)."""
    model, _cache = tiny_cache("llama", tokens=TOKENS)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.config.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bf16_cache():
    return tiny_cache("llama", tokens=TOKENS, dtype=torch.bfloat16)[1]


def cache_planes(cache):
    """Keys and values of a cache, each [layers, kv_heads, tokens, head_dim]."""
    return (torch.stack([layer.keys[0] for layer in cache.layers]),
            torch.stack([layer.values[0] for layer in cache.layers]))


def chunk_of(cache, kind: str) -> torch.Tensor:
    """The cache as an LMCache chunk: [2, L, T, H*D], or vLLM-CPU's fused [L, T, H*2*D] (per head: K then V)."""
    keys, values = cache_planes(cache)
    layers, heads, tokens, dim = keys.shape
    if kind == "kv":
        return torch.stack([keys, values]).permute(0, 1, 3, 2, 4).reshape(2, layers, tokens, heads * dim).contiguous()
    fused = torch.stack([keys, values], dim=3)   # [L, H, T, 2, D]
    return fused.permute(0, 2, 1, 3, 4).reshape(layers, tokens, heads * 2 * dim).contiguous()


def memory_obj(shape, dtype, fill: torch.Tensor | None = None):
    """A real LMCache TensorMemoryObj (set_used_size and all): ``fill`` or stale random bytes."""
    obj = memory_object(shape, dtype)
    obj.tensor.view(-1).view(torch.uint8).copy_(torch.randint(0, 256, (obj.get_size(),), dtype=torch.uint8))
    if fill is not None:
        obj.tensor.copy_(fill)
    return obj


def wait(query, task_id, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(task_id)
        if result is not None:
            return result
        time.sleep(0.01)
    raise AssertionError("the serde task did not finish")


def processor(model_dir, **options):
    """LMCache's own factory builds the serde from its JSON options, as an L2 adapter spec would."""
    return create_serde_processor(SerdeConfig(type="seqkv", kwargs={"model": model_dir, **options}))


def round_trip(proc, chunk: torch.Tensor):
    """Serialize ``chunk`` and deserialize it again through the AsyncSerdeProcessor: (ok flags, blob, out)."""
    src = memory_obj(chunk.shape, chunk.dtype, chunk)
    size = proc.estimate_serialized_size(MemoryLayoutDesc(shapes=[chunk.shape], dtypes=[chunk.dtype]))
    temp = memory_obj([size], torch.uint8)
    ok_out = wait(proc.query_serialize_result, proc.submit_serialize([src], [temp], [KEY]))
    blob = bytes(temp.byte_array)     # narrowed to the bytes written (what an L2 adapter stores)
    out = memory_obj(chunk.shape, chunk.dtype)
    ok_in = wait(proc.query_deserialize_result, proc.submit_deserialize([temp], [out], [KEY]))
    return (ok_out, ok_in), blob, out.tensor


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view({2: torch.int16, 4: torch.int32}[x.element_size()])


def test_import_seqkv_does_not_import_lmcache():
    code = ("import sys, seqkv, seqkv.integrations, seqkv.cli\nseqkv.cli.build_parser()\n"
            "print('lmcache' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("kind", LAYOUTS)
def test_lossless_is_bit_exact_on_bf16_chunks(model_dir, bf16_cache, kind):
    chunk = chunk_of(bf16_cache, kind).clone()
    flat = chunk.view(-1)
    flat[3], flat[5], flat[7], flat[11] = float("nan"), float("inf"), -0.0, -float("inf")  # kept too
    proc = processor(model_dir, preset="lossless")
    try:
        ok, blob, out = round_trip(proc, chunk)
    finally:
        proc.close()
    assert ok == (True, True)
    assert torch.equal(bits(out), bits(chunk))
    assert seqkv.inspect(unframe(blob))["preset"] == "lossless"


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("options", [{"preset": "balanced"}, {"preset": "small"}], ids=["balanced", "small"])
def test_presets_round_trip_within_their_bound(model_dir, bf16_cache, kind, options):
    chunk = chunk_of(bf16_cache, kind)
    proc = processor(model_dir, **options)
    try:
        ok, blob, out = round_trip(proc, chunk)
    finally:
        proc.close()
    assert ok == (True, True)
    container = unframe(blob)
    assert seqkv.inspect(container)["preset"] == options["preset"]
    assert_within_bound(bf16_cache, config=model_config_of(model_dir), data=bytes(container))
    # and LMCache's buffer holds exactly what the container decodes to, in the chunk's own layout
    assert torch.equal(bits(out), bits(chunk_of(seqkv.decode(bytes(container)), kind)))


def model_config_of(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def calibrated_round_trip(model_dir, tmp_path, chunk: torch.Tensor, **target):
    """``chunk`` through the serde with the tiny model's profile (saved to a file, as a user would give it):
    (profile, the container, the deserialized chunk)."""
    profile = tiny_profile("llama")
    path = str(tmp_path / "tiny.profile")
    profile.save(path)
    proc = processor(model_dir, profile=path, **target)
    try:
        ok, blob, out = round_trip(proc, chunk)
    finally:
        proc.close()
    assert ok == (True, True)
    return profile, bytes(unframe(blob)), out


@pytest.mark.parametrize("target", [{"target_kl": 0.01}, {"scale": 0.5}], ids=["target_kl", "scale"])
def test_calibrated_round_trip_within_its_bound(model_dir, bf16_cache, tmp_path, target):
    profile, container, out = calibrated_round_trip(model_dir, tmp_path, chunk_of(bf16_cache, "fused"), **target)
    info = seqkv.inspect(container)
    assert info["preset"] == "calibrated" and info["profile"]["sha256"] == profile.codec_hash
    if "scale" in target:
        assert info["rate_control"]["scale"] == pytest.approx(target["scale"], rel=1e-6)
    assert_within_bound(bf16_cache, config=model_config_of(model_dir), profile=profile, data=container)
    assert torch.equal(bits(out), bits(chunk_of(seqkv.decode(container, profile=profile), "fused")))


def vllm_cpu_amx_chunk(cache, block_size: int) -> torch.Tensor:
    """The cache as vLLM-CPU 0.32's AMX attention kernels page it and LMCache copies the pages (fused shape
    [L, T, H*2*D]): per (block, head), keys then values at the offsets that cpu_attn_reshape_and_cache(...,
    "amx") writes (measured by writing marked tensors through it; docs/lmcache.md)."""
    keys, values = cache_planes(cache)
    layers, heads, tokens, dim = keys.shape
    pages = torch.zeros(layers, tokens // block_size, heads, 2 * block_size * dim, dtype=keys.dtype)
    for t in range(tokens):
        block, tb = divmod(t, block_size)
        for d in range(dim):
            pages[:, block, :, (tb // 16) * 16 * dim + (d // 2) * 32 + (tb % 16) * 2 + d % 2] = keys[:, :, t, d]
            value_at = block_size * dim + (d // 16) * 16 * block_size + (tb // 2) * 32 + (d % 16) * 2 + tb % 2
            pages[:, block, :, value_at] = values[:, :, t, d]
    rows = pages.view(layers, tokens // block_size, heads, block_size, 2 * dim).permute(0, 1, 3, 2, 4)
    return rows.reshape(layers, tokens, heads * 2 * dim).contiguous()


@pytest.mark.parametrize("preset", ["lossless", "balanced"])
def test_vllm_cpu_amx_pages_are_unpacked_to_keys_and_values(model_dir, preset):
    cache = tiny_cache("llama", tokens=32, dtype=torch.bfloat16, seed=6)[1]
    chunk = vllm_cpu_amx_chunk(cache, 16)
    proc = processor(model_dir, preset=preset, packing="vllm_cpu_amx", block_size=16)
    try:
        ok, blob, out = round_trip(proc, chunk)
    finally:
        proc.close()
    assert ok == (True, True)
    assert_within_bound(cache, config=model_config_of(model_dir), data=bytes(unframe(blob)))   # true K and V
    if preset == "lossless":
        assert torch.equal(bits(out), bits(chunk))
    else:
        assert torch.equal(bits(out), bits(vllm_cpu_amx_chunk(seqkv.decode(bytes(unframe(blob))), 16)))
    with pytest.raises(ChunkLayoutError, match="whole 16-token blocks"):
        geometry = SeqKVSerializer(codec_from_options({"model": model_dir})).geometry
        dataclasses.replace(geometry, packing="vllm_cpu_amx", block_size=16).shape_of(chunk[:, :24].shape, chunk.dtype)


def chunk_starting_at(profile, start: int, tokens: int = 32, seed: int = 9):
    """A bf16 cache of ``tokens`` tokens whose keys are the profile's mean pre-RoPE keys plus noise, carrying RoPE
    at positions ``start ..``: what a model's chunk looks like to the start finder."""
    layout = profile.layout
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(layout.layers):
        mu = profile.parts[(i, "keys")].mean.view(layout.kv_heads, 1, layout.head_dim)
        pre = mu + 0.5 * float(mu.abs().mean()) * torch.randn(layout.kv_heads, tokens, layout.head_dim, generator=gen)
        keys = keys_to_post_rope(pre, "keys", torch.arange(start, start + tokens), layout)
        layers.append((keys.bfloat16(), torch.randn(keys.shape, generator=gen).bfloat16()))
    return build_cache(layers)


def test_start_finder_recovers_where_a_chunk_starts():
    profile = tiny_profile("llama")
    finder = StartFinder(profile.layout, profile, max_positions=512)
    for start in (0, 1, 40, 255, 480):
        keys = [layer.keys[0] for layer in chunk_starting_at(profile, start).layers]
        assert finder.start(keys) == start


def test_a_chunk_found_to_start_later_keeps_no_sinks(model_dir, tmp_path):
    cache = chunk_starting_at(tiny_profile("llama"), 40)
    profile, container, out = calibrated_round_trip(model_dir, tmp_path, chunk_of(cache, "kv"))
    info = seqkv.inspect(container)
    assert info["positions"]["start"] == 40 and info["pipeline"]["sink_tokens"] == 0 < profile.sink_tokens
    assert info["profile"]["sha256"] == profile.codec_hash            # the profile itself decodes it
    assert_within_bound(cache, config=model_config_of(model_dir), profile=profile, data=container)
    assert torch.equal(bits(out), bits(chunk_of(seqkv.decode(container, profile=profile), "kv")))
    local = codec_from_options({"model": model_dir, "profile": str(tmp_path / "tiny.profile"), "positions": "local"})
    assert local.start_finder is None


@pytest.mark.parametrize("preset", ["lossless", "balanced"])
def test_estimate_bounds_an_incompressible_chunk(model_dir, preset):
    """Random bit patterns: nothing to compress, the lossless worst case; a lossy preset falls back to it
    (NaN payloads and huge values it cannot carry), and the blob still fits the estimate."""
    gen = torch.Generator().manual_seed(5)
    chunk = torch.randint(-(1 << 15), 1 << 15, (2, 2, 256, 32), generator=gen, dtype=torch.int16).view(torch.bfloat16)
    codec = codec_from_options({"model": model_dir, "preset": preset})
    src, layout = memory_obj(chunk.shape, chunk.dtype, chunk), MemoryLayoutDesc([chunk.shape], [chunk.dtype])
    size = SeqKVSerializer(codec).estimate_serialized_size(layout)
    temp = memory_obj([size], torch.uint8)
    n = SeqKVSerializer(codec).serialize(src, temp, KEY)
    raw = chunk.numel() * 2
    assert raw < n <= size
    assert codec.fallbacks == (0 if preset == "lossless" else 1)
    out = memory_obj(chunk.shape, chunk.dtype)
    SeqKVDeserializer(codec).deserialize(temp, out, KEY)
    assert torch.equal(bits(out.tensor), bits(chunk))


def test_errors_on_bad_chunks(model_dir, bf16_cache):
    codec = codec_from_options({"model": model_dir, "preset": "balanced"})
    ser, de = SeqKVSerializer(codec), SeqKVDeserializer(codec)
    chunk = chunk_of(bf16_cache, "kv")
    temp = memory_obj([ser.estimate_serialized_size(MemoryLayoutDesc([chunk.shape], [chunk.dtype]))], torch.uint8)
    for bad in (torch.zeros(2, 3, 8, 32, dtype=torch.bfloat16),      # 3 layers: the model has 2
                torch.zeros(2, 2, 8, 48, dtype=torch.bfloat16),      # 3 heads' worth of width
                torch.zeros(2, 8, 64, dtype=torch.bfloat16)[:, :0],  # fused, no tokens
                torch.zeros(2, 2, 8, 32, dtype=torch.int16),         # not a float dtype
                torch.zeros(2, 2, 8, 32, dtype=torch.float8_e4m3fn)):
        with pytest.raises(ChunkLayoutError):
            ser.serialize(memory_obj(bad.shape, bad.dtype, bad), temp, KEY)
    with pytest.raises(ChunkLayoutError):
        ser.estimate_serialized_size(MemoryLayoutDesc([torch.Size([2, 2, 8, 33])], [torch.bfloat16]))
    n = ser.serialize(memory_obj(chunk.shape, chunk.dtype, chunk), temp, KEY)
    blob = temp.tensor[:n].clone()

    def load_into(data: torch.Tensor, shape=chunk.shape, dtype=chunk.dtype, decoder=de):
        decoder.deserialize(memory_obj(data.shape, torch.uint8, data), memory_obj(shape, dtype), KEY)

    load_into(blob)   # the intact blob loads
    with pytest.raises(FormatError, match="truncated"):
        load_into(blob[:n - 10])
    with pytest.raises(FormatError, match="truncated"):
        load_into(blob[:9])
    with pytest.raises(FormatError, match="magic"):
        load_into(torch.zeros(n, dtype=torch.uint8))
    with pytest.raises(ChunkMismatchError):
        load_into(blob, shape=torch.Size([2, 2, TOKENS - 1, 32]))
    with pytest.raises(ChunkMismatchError):
        load_into(blob, dtype=torch.float16)
    # another model of the same shapes (another RoPE base): its serde refuses this model's blob
    other = model_config("llama", layers=2, kv_heads=2, heads=4, head_dim=16, rope_theta=500000.0)
    other_dir = os.path.join(os.path.dirname(model_dir), "other-llama")
    other.save_pretrained(other_dir)
    with pytest.raises(ModelMismatchError):
        load_into(blob, decoder=SeqKVDeserializer(codec_from_options({"model": other_dir})))


def test_a_failing_chunk_is_a_failed_serde_task(model_dir):
    proc = processor(model_dir, preset="balanced")
    try:
        bad = torch.zeros(2, 3, 8, 32, dtype=torch.bfloat16)
        ok = wait(proc.query_serialize_result,
                  proc.submit_serialize([memory_obj(bad.shape, bad.dtype, bad)], [memory_obj([64], torch.uint8)], [KEY]))
        junk = memory_obj([64], torch.uint8)
        ok_in = wait(proc.query_deserialize_result,
                     proc.submit_deserialize([junk], [memory_obj([2, 2, 8, 32], torch.bfloat16)], [KEY]))
    finally:
        proc.close()
    assert (ok, ok_in) == (False, False)


@pytest.mark.parametrize("options, message", [
    ({"preset": "balanced", "level": 3}, "unknown seqkv serde option"),
    ({"preset": "balanced", "profile": "shipped"}, "not both"),
    ({"preset": "balanced", "target_kl": 0.01}, "need a calibrated"),
    ({"preset": "tiny"}, "unknown seqkv preset"),
    ({"profile": 3}, "profile must be"),
    ({"profile": "shipped"}, "ships no calibrated profile"),
    ({"model": "/no/such/model"}, "neither a folder nor a file"),
    ({"model": None}, "model must be"),
    ({"gguf_file": "missing.gguf"}, "is not in"),
    ({"preset": "balanced", "positions": "absolute"}, "positions must be"),
    ({"preset": "balanced", "packing": "amx"}, "unknown seqkv serde option"),   # a serde option, not the codec's
])
def test_bad_options_are_config_errors(model_dir, options, message):
    with pytest.raises(ConfigError, match=message):
        codec_from_options({"model": model_dir, **options})
    with pytest.raises(ConfigError, match="needs \"model\""):
        codec_from_options({"preset": "lossless"})


def test_serde_options_outside_the_codec(model_dir):
    for options, message in (({"packing": "amx"}, "packing must be"), ({"block_size": 8}, "block_size must be"),
                             ({"max_workers": 0}, "max_workers must be"), ({"level": 1}, "unknown seqkv serde option")):
        with pytest.raises(ConfigError, match=message):
            create_serde({"model": model_dir, **options})


# -- through LMCache's StorageManager: L1 -> serialize -> L2 on disk -> clear L1 -> load -> deserialize ---------

def storage_manager(adapter: dict) -> StorageManager:
    parser = argparse.ArgumentParser()
    add_l2_adapters_args(parser)
    l2 = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(adapter)]))
    memory = L1MemoryManagerConfig(size_in_bytes=64 << 20, use_lazy=False)
    return StorageManager(StorageManagerConfig(l1_manager_config=L1ManagerConfig(memory_config=memory),
                                               eviction_config=EvictionConfig(eviction_policy="LRU"),
                                               l2_adapter_config=l2))


def store_clear_and_reload(sm: StorageManager, l2_dir: str, chunks: list[torch.Tensor]):
    """Write ``chunks`` to L1, wait for the L2 store, clear L1, prefetch from L2: (hit count, loaded, file sizes)."""
    layout = MemoryLayoutDesc(shapes=[chunks[0].shape], dtypes=[chunks[0].dtype])
    keys = [ObjectKey(chunk_hash=bytes([i + 1]) * 32, model_name="tiny", kv_rank=0) for i in range(len(chunks))]
    reserved = sm.reserve_write(keys, layout)
    for key, chunk in zip(keys, chunks):
        reserved[key].tensor.copy_(chunk)
    sm.finish_write(keys)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        files = [f for f in os.listdir(l2_dir) if f.endswith(".data")] if os.path.isdir(l2_dir) else []
        if len(files) == len(keys) and sm.report_status()["store_controller"]["in_flight_task_count"] == 0:
            break
        time.sleep(0.05)
    sizes = sorted(os.path.getsize(os.path.join(l2_dir, f)) for f in files)
    sm.clear(force=True)
    assert sm.report_status()["l1_manager"]["total_object_count"] == 0
    handle = sm.submit_prefetch_task(PrefetchTaskSpec(key_groups=[GroupedObjectKeys(keys, 0, layout)]))
    assert sm.wait_prefetch_status(handle, 120)
    hits = sm.query_prefetch_status(handle).l2_hit_count
    loaded = []
    if hits == len(keys):
        with sm.read_prefetched_results(keys) as objs:
            loaded = [obj.tensor.clone() for obj in objs]
        sm.finish_read_prefetched(keys)
    return hits, loaded, sizes


@pytest.mark.parametrize("kind", LAYOUTS)
def test_storage_manager_round_trip_through_the_seqkv_fs_adapter(model_dir, tmp_path, kind):
    chunks = [chunk_of(tiny_cache("llama", tokens=TOKENS, dtype=torch.bfloat16, seed=s)[1], kind) for s in (1, 2)]
    l2_dir = str(tmp_path / "l2")
    sm = storage_manager(adapter_spec(l2_dir, {"type": "seqkv", "model": model_dir, "preset": "lossless"}))
    try:
        hits, loaded, sizes = store_clear_and_reload(sm, l2_dir, chunks)
    finally:
        sm.close()
    assert hits == len(chunks)
    for got, chunk in zip(loaded, chunks):
        assert torch.equal(bits(got), bits(chunk))
    estimate = SeqKVSerializer(codec_from_options({"model": model_dir})).estimate_serialized_size(
        MemoryLayoutDesc([chunks[0].shape], [chunks[0].dtype]))
    assert max(sizes) < estimate          # blobs are stored at their own size, not the buffer's


def test_storage_manager_balanced_round_trip(model_dir, tmp_path):
    cache = tiny_cache("llama", tokens=TOKENS, dtype=torch.bfloat16, seed=3)[1]
    l2_dir = str(tmp_path / "l2")
    sm = storage_manager(adapter_spec(l2_dir, {"type": "seqkv", "model": model_dir, "preset": "balanced"}))
    try:
        hits, loaded, _sizes = store_clear_and_reload(sm, l2_dir, [chunk_of(cache, "kv")])
    finally:
        sm.close()
    assert hits == 1
    (name,) = os.listdir(l2_dir)
    with open(os.path.join(l2_dir, name), "rb") as f:
        container = bytes(unframe(f.read()))
    assert_within_bound(cache, config=model_config_of(model_dir), data=container)
    assert torch.equal(bits(loaded[0]), bits(chunk_of(seqkv.decode(container), "kv")))


def test_lmcache_builtin_fs_adapter_cannot_reload_seqkv_blobs(model_dir, tmp_path):
    """Why lmcache_fs exists: LMCache 0.5.6's own fs adapter stores a blob at its size, then refuses to load a
    file shorter than the (upper-bound) buffer.  If a new LMCache loads it, the docs' advice can change."""
    chunks = [chunk_of(tiny_cache("llama", tokens=TOKENS, dtype=torch.bfloat16, seed=4)[1], "kv")]
    l2_dir = str(tmp_path / "l2")
    sm = storage_manager({"type": "fs", "base_path": l2_dir,
                          "serde": {"type": "seqkv", "model": model_dir, "preset": "lossless"}})
    try:
        hits, _loaded, sizes = store_clear_and_reload(sm, l2_dir, chunks)
    finally:
        sm.close()
    assert len(sizes) == 1 and hits == 0


def test_lmcache_server_command_builds_the_server_arguments(model_dir, tmp_path):
    from seqkv.cli import main

    argv = ["lmcache-server", "--l2-dir", str(tmp_path / "l2"), "--model", model_dir, "--preset", "balanced",
            "--dry-run", "--", "--supported-transfer-mode", "engine_driven"]
    proc = subprocess.run([sys.executable, "-m", "seqkv.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = json.loads(proc.stdout.strip().splitlines()[-1])
    assert args[0] == "server" and args[-2:] == ["--supported-transfer-mode", "engine_driven"]
    spec = json.loads(args[args.index("--l2-adapter") + 1])
    assert spec["serde"] == {"type": "seqkv", "model": model_dir, "preset": "balanced", "max_workers": 1}
    assert spec["type"] == "plugin" and spec["adapter_params"] == {"base_path": str(tmp_path / "l2")}
    assert main(["lmcache-server", "--l2-dir", "x", "--model", model_dir, "--preset", "nope", "--dry-run"]) == 2


# -- the real model ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_model_chunks_lossless_and_calibrated():
    """Two 256-token chunks of SmolLM2-135M's bf16 cache on real text, through the serde processor: lossless
    bit-exact in both layouts; with the shipped calibrated profile, each chunk's start found from its keys, the
    second coded without sinks, both within the codec's bound."""
    from seqkv.embedded_model import load_embedded_model
    from seqkv.quality import clone_cache, prefill

    model, tok = load_embedded_model()
    text = open(os.path.join(os.path.dirname(__file__), "..", "bench", "texts_heldout", "gpl3.txt")).read()
    ids = tok(text, return_tensors="pt").input_ids
    whole = clone_cache(prefill(model, ids, 512), torch.bfloat16)
    chunks = []
    for start in (0, 256):
        chunks.append(build_cache([(layer.keys[0, :, start:start + 256], layer.values[0, :, start:start + 256])
                                   for layer in whole.layers]))
    for kind in LAYOUTS:
        proc = create_serde_processor(SerdeConfig("seqkv", {"model": "embedded", "preset": "lossless"}))
        try:
            ok, _blob, out = round_trip(proc, chunk_of(chunks[1], kind))
        finally:
            proc.close()
        assert ok == (True, True) and torch.equal(bits(out), bits(chunk_of(chunks[1], kind)))
    proc = create_serde_processor(SerdeConfig("seqkv", {"model": "embedded", "profile": "shipped", "target_kl": 0.01}))
    try:
        for start, chunk in zip((0, 256), chunks):
            ok, blob, out = round_trip(proc, chunk_of(chunk, "kv"))
            assert ok == (True, True)
            container = bytes(unframe(blob))
            info = seqkv.inspect(container)
            assert info["positions"]["start"] == start
            assert info["pipeline"]["sink_tokens"] == (seqkv.shipped_profile(model).sink_tokens if start == 0 else 0)
            assert_within_bound(chunk, model=model, data=container)
    finally:
        proc.close()
