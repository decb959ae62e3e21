#!/usr/bin/env bash
# The teacher's GPU check in one command (issue 15), for a session that is lent a GPU machine (device tool). The host
# has CUDA torch + Triton but no DeepSpeed, TorchRec or pydantic and no package index: the small wheels travel in the
# git-ignored .whl/ (fill it here first with ../shared/device/fetch-wheels.sh, ~12 MB) and are installed offline.
# TorchRec's CUDA kernels (fbgemm-gpu) do not travel, so the teacher runs with teacher.embedding_backend=torch.
#   bash launch/device_teacher.sh          # through the device tool: carry [".whl"], timeout_s ~570
#   QUICK=1 bash launch/device_teacher.sh  # the same steps on CPU at tiny shapes (tests/test_device_teacher.py)
# Steps: (1) kernel tests compiled on CUDA; (2) the 1b preset, bf16, one rank, STEPS_1B steps: steps/s, samples/s,
# peak memory, MFU (dry-run FLOPs against a measured bf16 matmul rate); (3) 7b under ZeRO-3 + CPU offload, STEPS_7B
# steps; (4) python -m kernels.bench. Results: benchmarks/results/device_teacher-<preset>-<device>.json and
# kernels/results/, copied with the logs to $OUT when set. Environment: STEPS_1B (20), STEPS_7B (3), BATCH (the
# preset's data.batch_size), HISTORY (the preset's), PYTHON (python3; QUICK: .venv/bin/python if present), DS_7B
# (zero3_offload; DeepSpeed's estimate puts 7b's offloaded model states at ~122 GiB of host memory, x1.5 buffer 183,
# against the H200 host's 128 GiB: if it is refused, DS_7B=zero3 keeps them on the GPU, ~126 GiB + ~7 GiB of
# checkpointed activations, see `recdistill teacher --dry-run --preset 7b --world-size 1 --gpu-mem-gib 139`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
if [ -n "${QUICK:-}" ]; then
  PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  PRESET_1B=tiny PRESET_7B=tiny STEPS_1B=2 STEPS_7B=2 BATCH=${BATCH:-16} HISTORY=${HISTORY:-32}
  RESULTS=${RESULTS:-$OUT}  # never over the committed figures
else
  PYTHON=${PYTHON:-python3}
  PRESET_1B=1b PRESET_7B=7b RESULTS=${RESULTS:-benchmarks/results}
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
DS_7B=${DS_7B:-zero3_offload}
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")' \
  | tr 'A-Z ' 'a-z-' | tr -cd 'a-z0-9-')
rcs=()
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the exit code
  echo "== $1"; local name=$1; shift
  "$@" 2>&1 | tee "$OUT/$name.log"; local rc=${PIPESTATUS[0]}
  rcs+=("$name=$rc")
}
if [ -z "${QUICK:-}" ]; then  # on CPU the kernel tests run in CI already (TRITON_INTERPRET)
  step kernel_tests env KERNELS_HYPOTHESIS_EXAMPLES=${EXAMPLES:-50} "$PYTHON" -m pytest -q -p no:cacheprovider tests/kernels
fi
sets=(${BATCH:+--batch "$BATCH"} ${HISTORY:+--history "$HISTORY"})
step teacher_1b "$PYTHON" benchmarks/device_teacher.py --preset "$PRESET_1B" --steps "$STEPS_1B" "${sets[@]}" \
  --precision bf16 --out "$RESULTS/device_teacher-$PRESET_1B-$device.json"
step teacher_7b "$PYTHON" benchmarks/device_teacher.py --preset "$PRESET_7B" --steps "$STEPS_7B" "${sets[@]}" \
  --precision bf16 --deepspeed "configs/deepspeed/$DS_7B.json" --out "$RESULTS/device_teacher-$PRESET_7B-$DS_7B-$device.json"
if [ -z "${QUICK:-}" ]; then
  step kernels_bench "$PYTHON" -m kernels.bench --device cuda
  cp kernels/results/*.json "$OUT"/ 2>/dev/null || true
fi
cp "$RESULTS"/device_teacher-*"$device"*.json "$OUT"/ 2>/dev/null || true
echo "exit codes: ${rcs[*]}"
for r in "${rcs[@]}"; do [ "${r#*=}" = 0 ] || exit 1; done
