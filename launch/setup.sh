#!/usr/bin/env bash
# Creates or updates .venv from launch/requirements.txt, idempotently.
#   launch/setup.sh            # fresh machine: ~2-4 min; already set up: a few seconds
#   PYTHON=python3.11 launch/setup.sh
# A stamp (hash of the pin file + this script) skips the pip work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
REQ=launch/requirements.txt
stamp="$VENV/.recdistill-setup"
want=$(cat "$REQ" "$0" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  echo "setup: $VENV is up to date"; exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "setup: creating $VENV with $($PY --version)"; "$PY" -m venv "$VENV"; }
# pip's output goes to $VENV/setup.log and is shown only when pip fails (its exit status is kept).
log="$VENV/setup.log"
: > "$log"
pip() {
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" >> "$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -40 >&2; echo "setup: pip $* failed (full log: $log)" >&2; return 1
  fi
}
pip install --upgrade "pip>=24" wheel setuptools
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
grep -v '^\s*#' "$REQ" | grep -v 'no-deps' | sed 's/#.*//' | sed '/^\s*$/d' > "$tmp/deps.txt"
grep 'no-deps' "$REQ" | sed 's/#.*//' | sed '/^\s*$/d' > "$tmp/nodeps.txt"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: CUDA found, using fbgemm-gpu instead of fbgemm-gpu-cpu"
  sed -i 's/^fbgemm-gpu-cpu==/fbgemm-gpu==/' "$tmp/deps.txt"
fi
# DeepSpeed is an sdist: build no CUDA ops at install time (it JIT-builds a small CPU op on first use).
echo "setup: installing pinned stack (see $REQ)"
DS_BUILD_OPS=0 pip install -r "$tmp/deps.txt"
pip install --no-deps -r "$tmp/nodeps.txt"
pip install --no-deps -e .
# DeepSpeed's CPU comm op (30-40 s of g++), built once here into the venv (recdistill/runtime.py), not in a first demo
"$VENV/bin/python" -m recdistill.runtime 2>>"$log" | grep -v "^\[" || { echo "setup: building DeepSpeed's CPU op failed (log: $log)" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch,torchrec,deepspeed;print("torch",torch.__version__,"torchrec",torchrec.__version__,"deepspeed",deepspeed.__version__)' 2>&1 | tail -1))"
