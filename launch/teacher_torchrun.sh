#!/usr/bin/env bash
# Teacher training under torchrun (one node; CPU/gloo or one GPU per rank/NCCL). Extra arguments go to
# `python -m recdistill.train.teacher` unchanged.
#
#   launch/teacher_torchrun.sh                                       # 2 ranks, configs/teacher/tiny.yaml
#   NPROC=2 CONFIG=configs/teacher/tiny.yaml launch/teacher_torchrun.sh --set data.samples_per_day=1200
#   NGPU=8 CONFIG=configs/demo.yaml launch/teacher_torchrun.sh \
#       --set teacher.deepspeed=configs/deepspeed/zero3.json --set teacher.sharding=row_wise \
#       --set teacher.checkpoint_dir=runs/ckpt --eval-out runs/teacher_eval.npz
#
# Environment: NGPU or NPROC (ranks on this node; default: the GPU count, else 2), CONFIG (default
# configs/teacher/tiny.yaml), PYTHON (default .venv/bin/python, else python3); the port is picked free (--standalone),
# LOG_RANK (ranks whose output is shown, default 0; torchrun's --local-ranks-filter).
# The same command run again after a crash resumes from the newest complete checkpoint (teacher.resume=true).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ -z "${NGPU:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
fi
NPROC=${NPROC:-${NGPU:-2}}
[ "$NPROC" -gt 0 ] || NPROC=2
CONFIG=${CONFIG:-configs/teacher/tiny.yaml}
LOG_RANK=${LOG_RANK:-0}
set -x
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m recdistill.train.teacher --config "$CONFIG" "$@"
