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
    from seqkv.embedded_model import load_embedded_model

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
    assert main(["demo", "--tokens", "300", "--kl-tokens", "32", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "| balanced |" in out and "identical greedy continuation: yes" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.splitlines() if line.startswith("| ")}
    for name in ("calibrated, target_kl=0.01", "calibrated, target_kl=0.001"):   # measured KL and top-1 columns
        assert 0 < float(rows[name][3]) < 0.2 and 0.5 < float(rows[name][4]) <= 1
    assert float(rows["lossless"][3]) == 0 and float(rows["lossless"][4]) == 1
    assert int(rows["calibrated, target_kl=0.01"][0]) < int(rows["calibrated, target_kl=0.001"][0])
    assert "shipped with seqkv" in out
    # a rate target without --profile: the shipped profile
    shipped = tmp_path / "s.skv"
    assert main(["encode", "--tokens", "200", "--target-kl", "0.01", "-o", str(shipped)]) == 0
    model, _ = load_embedded_model()
    assert seqkv.inspect(shipped.read_bytes())["profile"]["sha256"] == seqkv.shipped_profile(model).codec_hash
    assert main(["decode", str(shipped), "-o", str(tmp_path / "s.safetensors")]) == 0
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


def test_rate_targets_select_the_calibrated_codec_not_a_preset(tmp_path, capsys):
    # without --profile a rate target uses the profile shipped for the model (slow test below); with a preset it
    # is refused before the model loads
    for extra in (["--preset", "balanced"], ["--step", "0.2"]):
        assert main(["encode", "--target-kl", "0.01", *extra, "-o", str(tmp_path / "x.skv")]) == 2
        assert "leave out --preset and --step" in capsys.readouterr().err


def test_default_texts_ship_in_the_package_as_copies_of_bench():
    from seqkv import cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.dirname(os.path.abspath(cli.__file__))
    assert cli.DEFAULT_TEXT.startswith(package) and cli.CALIBRATION_DIR.startswith(package)
    texts = cli.calibration_texts()
    assert [os.path.basename(p) for p in texts] == ["calib_argparse.txt", "calib_topics.txt", "calib_unittest.txt"]
    pairs = [(cli.DEFAULT_TEXT, os.path.join(root, "bench", "texts", "psf_license.txt"))]
    pairs += [(p, os.path.join(root, "bench", "calibration", os.path.basename(p))) for p in texts]
    for packaged, bench in pairs:
        with open(packaged, "rb") as a, open(bench, "rb") as b:
            assert a.read() == b.read(), packaged
    for folder in (os.path.dirname(cli.DEFAULT_TEXT), cli.CALIBRATION_DIR):
        assert os.path.exists(os.path.join(folder, "PROVENANCE.md"))


def test_calibrate_a_local_model_folder(tmp_path, capsys):
    """`seqkv calibrate --model DIR`: what the shipped-profile error tells users of other models to run."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_model

    words = [f"w{i}" for i in range(95)]
    core = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tiny-llama"
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(folder)
    tiny_model("llama").save_pretrained(folder)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(words[(i * 7) % 95] for i in range(300)))
    out = tmp_path / "tiny.profile"
    assert main(["calibrate", "--model", str(folder), "--text", str(text), "--tokens", "200",
                 "--continuation-len", "32", "-o", str(out)]) == 0
    profile = seqkv.Profile.load(out)
    assert profile.layout.fingerprint == seqkv.layout_from_model(tiny_model("llama")).fingerprint
    assert main(["calibrate", "--model", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err


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
