#!/usr/bin/env bash
# Teacher training under the DeepSpeed launcher (one node). The launcher starts `python -u -m
# recdistill.train.teacher --local_rank=N ...` per rank and sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_* and
# LOCAL_SIZE (ranks on this node; the trainer reads it as LOCAL_WORLD_SIZE for TorchRec's shard placement);
# the trainer accepts --local_rank (checked: it parses and is otherwise ignored, LOCAL_RANK decides).
#
#   launch/teacher_deepspeed.sh                                      # 2 ranks, configs/teacher/tiny.yaml
#   NGPU=8 CONFIG=configs/demo.yaml launch/teacher_deepspeed.sh --set teacher.deepspeed=configs/deepspeed/zero3.json
#   NPROC=2 launch/teacher_deepspeed.sh --set data.samples_per_day=1200 --summary runs/ds_sum
#
# Environment: NGPU or NPROC (ranks, default: GPU count, else 2), CONFIG (default configs/teacher/tiny.yaml),
# MASTER_PORT (default 29500), DEEPSPEED (default .venv/bin/deepspeed, else deepspeed).
# On a CPU-only machine the launcher counts no GPUs; --num_gpus is then the number of CPU ranks (gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED=${DEEPSPEED:-$([ -x .venv/bin/deepspeed ] && echo .venv/bin/deepspeed || echo deepspeed)}
if [ -z "${NGPU:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
  NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
fi
NPROC=${NPROC:-${NGPU:-2}}
[ "$NPROC" -gt 0 ] || NPROC=2
CONFIG=${CONFIG:-configs/teacher/tiny.yaml}
set -x
exec "$DEEPSPEED" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" --module recdistill.train.teacher \
  --config "$CONFIG" "$@"
