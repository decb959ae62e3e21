#!/usr/bin/env bash
# The GPU check of the Triton kernels in one command, for a session that is lent a GPU machine (device tool).
# The GPU host has its own torch 2.11 / triton 3.6 and no package index; kernels/ needs nothing else, the tests need
# pytest and hypothesis. Here, before the call (fills the git-ignored .whl/):
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig packaging hypothesis attrs sortedcontainers
# Then, through the device tool (carry [".whl"], timeout_s ~540):
#   bash launch/device_kernels.sh            # kernel tests on CUDA (compiled, not the interpreter), then the bench
#   QUICK=1 bash launch/device_kernels.sh    # tiny bench shapes (checks the script, numbers meaningless)
# Writes kernels/results/<device>-<date>.{json,png} and copies them, with the test log, to $OUT (when set).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name(0))'
# tests/conftest.py leaves TRITON_INTERPRET unset on CUDA: the kernels compile for the GPU here.
KERNELS_HYPOTHESIS_EXAMPLES=${EXAMPLES:-100} python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 \
  | tee "$OUT/kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m kernels.bench ${QUICK:+--quick} --device cuda 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
cp kernels/results/*.json kernels/results/*.png "$OUT"/ 2>/dev/null || true
echo "kernel tests exit $tests_rc, bench exit $bench_rc"
exit $(( tests_rc || bench_rc ))
