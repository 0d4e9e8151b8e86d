"""``import seqkv`` loads the version and the exception tree only; everything else on first use (seqkv/__init__.py)."""
import json
import subprocess
import sys

HEAVY = ["seqkv.store", "seqkv.store.backend_redis", "seqkv.store.backend_s3", "seqkv.evaluate", "seqkv.pruning",
         "seqkv.pruning.snapkv", "seqkv.pruning.expected_attention", "seqkv.testing", "seqkv.codec", "torch",
         "transformers", "hypothesis", "redis", "boto3"]


def loaded_after(code: str) -> set:
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_import_seqkv_loads_no_backend_pruner_harness_or_torch():
    loaded = loaded_after("import seqkv")
    assert [m for m in HEAVY if m in loaded] == []
    assert "seqkv.errors" in loaded


def test_public_names_load_on_first_use():
    loaded = loaded_after("import seqkv\nseqkv.encode; seqkv.ConfigError; seqkv.__version__")
    assert "seqkv.codec" in loaded and "seqkv.evaluate" not in loaded and "seqkv.store" not in loaded
    code = ("import seqkv\nassert seqkv.PrefixStore.__name__ == 'PrefixStore'\nassert callable(seqkv.pruner)\n"
            "assert callable(seqkv.evaluate_text)\nassert seqkv.pruning.SnapKV.__name__ == 'SnapKV'\n"
            "assert seqkv.ProfileError.__mro__[1] is seqkv.ConfigError\n"
            "from seqkv import *\nassert encode is seqkv.encode and 'PrefixStore' in dir(seqkv)\n"
            "try:\n    seqkv.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)")
    loaded = loaded_after(code)
    assert {"seqkv.store.backend_redis", "seqkv.evaluate", "seqkv.pruning.snapkv"} <= loaded
