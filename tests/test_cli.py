"""The command line: fast paths on golden files, and the model-driven commands on the embedded model (slow)."""
import json
import os

import pytest
from safetensors.torch import load_file

import seqkv
from seqkv.cli import main

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "v1_0_lossless_fp16.skv")


def test_inspect_and_decode_golden(tmp_path, capsys):
    assert main(["inspect", GOLDEN, "--sections"]) == 0
    out = capsys.readouterr().out
    assert "lossless" in out and "layer.1.values" in out
    assert main(["inspect", GOLDEN, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tokens"] == 12 and info["positions"]["next"] == 12
    target = tmp_path / "out.safetensors"
    assert main(["decode", GOLDEN, "-o", str(target)]) == 0
    tensors = load_file(str(target))
    with open(GOLDEN, "rb") as f:
        cache = seqkv.decode(f.read())
    assert tensors["layer.0.keys"].equal(cache.layers[0].keys)


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.skv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    bad = tmp_path / "bad.skv"
    with open(GOLDEN, "rb") as f:
        bad.write_bytes(f.read()[:100])
    assert main(["decode", str(bad), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_encode_inspect_decode_demo_eval(tmp_path, capsys):
    skv = tmp_path / "c.skv"
    assert main(["encode", "--tokens", "200", "--preset", "small", "-o", str(skv)]) == 0
    assert seqkv.inspect(skv.read_bytes())["tokens"] == 200
    # query-aware pruning on the command line: the prefill is observed, the container records the kept positions
    pruned = tmp_path / "p.skv"
    assert main(["encode", "--tokens", "200", "--prune", "snapkv", "--prune-ratio", "0.5", "-o", str(pruned)]) == 0
    info = seqkv.inspect(pruned.read_bytes())
    assert info["pruning"]["source_tokens"] == 200 and info["positions"]["next"] == 200
    assert main(["decode", str(pruned), "-o", str(tmp_path / "p.safetensors")]) == 0
    assert load_file(str(tmp_path / "p.safetensors"))["layer.0.kept.0"].numel() == 100
    assert main(["demo", "--tokens", "300", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "| balanced |" in out and "identical greedy continuation: yes" in out
    js = tmp_path / "r.json"
    md = tmp_path / "r.md"
    assert main(["eval", "--prompt-len", "256", "--continuation-len", "32", "--presets", "lossless", "small",
                 "--json", str(js), "--markdown", str(md)]) == 0
    rows = {r["name"]: r for r in json.loads(js.read_text())[0]["rows"]}
    assert rows["lossless"]["mean_kl"] == 0.0 and rows["lossless"]["ratio"] > rows["shuffle+zstd-3"]["ratio"]
    assert 0 < rows["small"]["mean_kl"] < 0.2 and rows["small"]["ratio"] > 4
    assert "Protocol" in md.read_text()


GOLDEN_PRUNED = os.path.join(os.path.dirname(__file__), "golden", "v1_1_lossless_fp16_pruned_ragged.skv")


def test_decode_writes_the_kept_positions_of_a_pruned_cache(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "p.safetensors"
    assert main(["decode", GOLDEN_PRUNED, "-o", str(out)]) == 0
    with open(GOLDEN_PRUNED, "rb") as f:
        state = seqkv.decode(f.read()).seqkv_pruned
    tensors = load_file(str(out))
    for i, kept in enumerate(state.kept):
        for h, positions in enumerate(kept):
            assert tensors[f"layer.{i}.kept.{h}"].equal(positions)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["next_position"] == str(state.next_position) and "kept" in meta["pruned"]
    assert meta["source_tokens"] == str(state.source_tokens)


def test_decode_writes_every_position_when_they_are_not_contiguous(tmp_path):
    golden = os.path.join(os.path.dirname(__file__), "golden", "v1_0_lossless_bf16_positions.skv")
    with open(golden, "rb") as f:
        data = f.read()
    assert not seqkv.inspect(data)["positions"]["contiguous"]
    out = tmp_path / "p.safetensors"
    assert main(["decode", golden, "-o", str(out)]) == 0
    positions = load_file(str(out))["positions"]
    assert positions.equal(seqkv.token_positions(data)) and len(positions) == seqkv.inspect(data)["tokens"]
    assert int(positions[-1]) + 1 == seqkv.inspect(data)["positions"]["next"]
    assert main(["decode", GOLDEN, "-o", str(out)]) == 0   # contiguous: start and next say it all
    assert "positions" not in load_file(str(out))


def test_prune_arguments_are_checked_before_the_model_loads(tmp_path, capsys):
    out = str(tmp_path / "x.skv")
    for args, message in [(["--prune-ratio", "0.5"], "need --prune NAME"),
                          (["--prune", "snapkv"], "--prune needs --prune-ratio"),
                          (["--prune", "triattention", "--prune-ratio", "0.5"], "--prune-calibration FILE"),
                          (["--prune", "snapkv", "--prune-ratio", "0.5", "--prune-calibration", "c"], "is for --prune triattention"),
                          (["--prune", "no_such_pruner", "--prune-ratio", "0.5"], "unknown pruner"),
                          (["--prune", "snapkv", "--prune-ratio", "1.5"], "ratio")]:
        assert main(["encode", *args, "-o", out]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not os.path.exists(out)


GOLDEN_CALIBRATED = os.path.join(os.path.dirname(__file__), "golden", "v1_1_calibrated_fp16.skv")
GOLDEN_PROFILE = GOLDEN_CALIBRATED.replace(".skv", ".profile.safetensors")


def test_calibrated_container_needs_its_profile_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["decode", GOLDEN_CALIBRATED, "-o", str(out)]) == 2
    assert "profile" in capsys.readouterr().err
    assert main(["decode", GOLDEN_CALIBRATED, "--profile", GOLDEN_PROFILE, "-o", str(out)]) == 0
    assert len(load_file(str(out))) == 2 * seqkv.inspect(open(GOLDEN_CALIBRATED, "rb").read())["layers"]
    js, md = tmp_path / "a.json", tmp_path / "a.md"
    assert main(["analyze", GOLDEN_CALIBRATED, "--profile", GOLDEN_PROFILE, "--json", str(js), "--markdown", str(md)]) == 0
    report = json.loads(js.read_text())
    assert report["totals"]["coded"] > 0 and len(report["tensors"]) == 2 * seqkv.inspect(open(GOLDEN_CALIBRATED, "rb").read())["layers"]
    assert "| all |" in md.read_text()
    bad = tmp_path / "bad.profile"
    bad.write_bytes(b"nonsense")
    assert main(["analyze", GOLDEN_CALIBRATED, "--profile", str(bad)]) == 2


def test_rate_targets_need_a_profile(tmp_path, capsys):
    assert main(["encode", "--target-kl", "0.01", "-o", str(tmp_path / "x.skv")]) == 2
    assert "--profile" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_encode_analyze_on_the_embedded_model(tmp_path, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    profile = tmp_path / "p.safetensors"
    assert main(["calibrate", "--text", os.path.join(root, "bench", "calibration", "calib_argparse.txt"),
                 "--tokens", "400", "--continuation-len", "48", "-o", str(profile)]) == 0
    skv = tmp_path / "c.skv"
    assert main(["encode", "--tokens", "300", "--profile", str(profile), "--target-kl", "0.01", "-o", str(skv)]) == 0
    info = seqkv.inspect(skv.read_bytes())
    assert info["profile"]["sha256"] == seqkv.Profile.load(profile).hash
    assert info["rate_control"]["target"] == {"kl": 0.01}
    assert main(["analyze", str(skv), "--profile", str(profile)]) == 0
    assert "| all |" in capsys.readouterr().out
    # TriAttention's query centres added to the profile: the codec part (and so every container) is unchanged
    tri = tmp_path / "p2.safetensors"
    assert main(["calibrate", "--add-triattention", str(profile), "--text",
                 os.path.join(root, "bench", "calibration", "calib_argparse.txt"), "--tokens", "400", "-o", str(tri)]) == 0
    extended = seqkv.Profile.load(tri)
    assert extended.triattention is not None and extended.codec_hash == info["profile"]["sha256"]
    assert len(seqkv.decode(skv.read_bytes(), profile=extended).layers) == 30
