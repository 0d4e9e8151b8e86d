"""`seqkv store put|get|stats|gc`."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from seqkv.cli import main
from seqkv.model_calls import cache_of
from seqkv.store import PrefixStore


@torch.no_grad()
def _fill(url: str, prompts: int = 3, tokens: int = 20) -> None:
    model = tiny_model("llama")
    with PrefixStore(url, model=model, chunk_tokens=8) as store:
        for seed in range(prompts):
            ids = torch.randint(0, 96, (1, tokens), generator=torch.Generator().manual_seed(seed))
            store.put(ids[0].tolist(), cache_of(model(ids, use_cache=True)))


def _json_out(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_stats_and_gc(tmp_path, capsys):
    url = (tmp_path / "store").as_uri()
    _fill(url)
    assert main(["store", "stats", url]) == 0
    stats = _json_out(capsys)
    assert stats["entries"] == 9 and stats["backend"] == "dir" and stats["bytes_stored"] > 0
    total = stats["bytes_stored"]

    assert main(["store", "gc", url, "--max-bytes", str(total)]) == 0
    assert _json_out(capsys)["evicted"] == 0

    assert main(["store", "gc", url, "--max-bytes", str(total // 2)]) == 0
    gc = _json_out(capsys)
    assert gc["evicted"] > 0 and gc["bytes_stored"] <= total // 2 and gc["bytes_freed"] > 0

    assert main(["store", "stats", url]) == 0
    after = _json_out(capsys)
    assert after["entries"] == 9 - gc["evicted"] and after["bytes_stored"] == gc["bytes_stored"]

    assert main(["store", "gc", url, "--max-bytes", "0"]) == 0
    assert _json_out(capsys)["entries"] == 0


def test_store_errors_exit_2(tmp_path, capsys):
    assert main(["store", "stats", "http://example.invalid/x"]) == 2
    assert "unsupported store URL" in capsys.readouterr().err
    assert main(["store", "gc", (tmp_path / "s").as_uri(), "--max-bytes", "-1"]) == 2
    assert "--max-bytes" in capsys.readouterr().err
    assert main(["store", "stats", "file://host/x"]) == 2
    # argument errors are found before the embedded model is loaded
    assert main(["store", "put", (tmp_path / "s").as_uri(), "--chunk-tokens", "0"]) == 2
    assert "--chunk-tokens" in capsys.readouterr().err
    assert main(["store", "get", (tmp_path / "s").as_uri(), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read text file" in capsys.readouterr().err
    assert main(["store", "stats", (tmp_path / "s").as_uri(), "--backend-option", "oops"]) == 2
    assert main(["store", "put", (tmp_path / "s").as_uri(), "--profile", "p.safetensors"]) == 2
    assert "--profile needs --scale" in capsys.readouterr().err
    assert main(["store", "get", (tmp_path / "s").as_uri(), "--scale", "0.03"]) == 2
    assert "give --profile too" in capsys.readouterr().err
    assert main(["store", "put", (tmp_path / "s").as_uri(), "--profile", "p", "--scale", "0.03", "--step", "0.2"]) == 2
    assert "with --profile use --scale" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["store", "gc", (tmp_path / "s").as_uri()])  # --max-bytes is required
    assert exc.value.code == 2


@pytest.mark.slow
def test_put_get_embedded_model(tmp_path, capsys):
    from safetensors import safe_open

    url = (tmp_path / "store").as_uri()
    out = tmp_path / "prefix.safetensors"
    assert main(["store", "get", url, "--tokens", "300", "--chunk-tokens", "128"]) == 0
    assert "0 of 300 leading tokens are stored" in capsys.readouterr().out
    assert main(["store", "get", url, "--tokens", "300", "--chunk-tokens", "128", "-o", str(out)]) == 2
    assert "nothing to write" in capsys.readouterr().err

    assert main(["store", "put", url, "--tokens", "300", "--chunk-tokens", "128"]) == 0
    assert "stored 300 tokens in 3 chunks" in capsys.readouterr().out
    assert main(["store", "put", url, "--tokens", "300", "--chunk-tokens", "128"]) == 0
    assert "0 written" in capsys.readouterr().out

    assert main(["store", "get", url, "--tokens", "300", "--chunk-tokens", "128", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "300 of 300 leading tokens are stored" in text
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["next_position"] == "300"
        keys = f.get_tensor("layer.0.keys")
        assert keys.shape[-2] == 300 and keys.dtype == torch.float32
        assert len(f.keys()) == 2 * 30
    # a longer prompt than what was stored: the whole chunks match
    assert main(["store", "get", url, "--tokens", "400", "--chunk-tokens", "128"]) == 0
    assert "256 of 400 leading tokens are stored" in capsys.readouterr().out
    # another chunk size is another namespace
    assert main(["store", "get", url, "--tokens", "300", "--chunk-tokens", "64"]) == 0
    assert "0 of 300" in capsys.readouterr().out
    assert main(["store", "stats", url]) == 0
    assert _json_out(capsys)["entries"] == 3
