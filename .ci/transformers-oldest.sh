#!/usr/bin/env bash
# The fast test subset against the OLDEST transformers seqkv accepts (the lower bound of pyproject.toml's
# "transformers>=..." requirement), in a throw-away venv built from a copy of this tree: the tree's own
# extension build and the main environment are left alone.  .ci/run runs it after the main test command.
#
#   bash .ci/transformers-oldest.sh [extra pytest arguments]
#
# KEEP=1 keeps the temporary folder (venv + copy) and prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
TESTS=(tests/test_model_calls.py tests/test_codec.py tests/test_prompt_cache.py tests/test_testing_public.py
       tests/test_shipped_profile.py tests/test_import_cost.py)

OLDEST=$("$PY" - <<'EOF'
import re
text = open("pyproject.toml", encoding="utf-8").read()
m = re.search(r'"transformers\s*>=\s*([0-9][0-9.]*)', text)
if not m:
    raise SystemExit("pyproject.toml has no transformers>=X requirement")
print(m.group(1))
EOF
)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/seqkv-tf-oldest.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  trap 'echo "kept: $WORK"' EXIT
else
  trap 'rm -rf "$WORK"' EXIT
fi
start=$SECONDS

# 1. the venv: torch, the oldest transformers, seqkv's other dependencies and what building it needs
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q torch==2.13.0
"$VPY" -m pip install -q "transformers==$OLDEST"
"$VPY" -m pip install -q "setuptools>=68" wheel "cython>=3.0" "numpy>=2.0" \
  zstandard constriction safetensors tqdm gguf accelerate pytest hypothesis

# 2. a copy of the tree (tracked files and untracked ones git does not ignore), built and installed there
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
cd "$WORK/src"
"$VPY" -m pip install -q -e . --no-deps --no-build-isolation
"$VPY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

# 3. the fast tests
set +e
"$VPY" -m pytest -q -p no:cacheprovider -m "not slow" "${TESTS[@]}" "$@"
rc=$?
set -e
echo "transformers-oldest ($OLDEST): pytest exit $rc, $((SECONDS - start)) s in all"
exit $rc
