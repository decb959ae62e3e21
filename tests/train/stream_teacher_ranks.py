"""One rank of the streaming-teacher equivalence test (tests/train/test_stream_teacher_ranks.py), run alone or under
torchrun: a fresh teacher (no checkpoint) on the sample stream already published under `stream.path`, its logits
on the signal stream there; rank 0 writes what the signal stream holds to OUT (.npz: sample_id, logits, step).

    python tests/train/stream_teacher_ranks.py CONFIG OUT [--set KEY=VALUE ...]
"""

import sys
import zlib

import numpy as np
import torch

from recdistill.config import load_config
from recdistill.streams import open_stream
from recdistill.streams.base import column_np
from recdistill.train.distributed import destroy_distributed, init_distributed
from recdistill.train.stream_teacher import StreamingTeacher
from recdistill.train.teacher import TeacherTrainer


def same_tables(dmp: torch.nn.Module) -> None:
    """Every embedding table set to values that depend only on its name and shape: DMP materialises each shard with
    its own rank's random state, so fresh 1-rank and 2-rank teachers' tables differ (their dense parts are seeded
    alike on every rank). DMP loads full tensors into its shards."""
    full = {}
    for k, v in dmp.state_dict().items():
        if k.startswith("embed.") and k.endswith(".weight"):
            g = torch.Generator().manual_seed(zlib.crc32(k.encode()))
            full[k] = torch.randn(tuple(v.size()), generator=g) * 0.05
    assert full, "no embedding table in the teacher's state"
    dmp.load_state_dict(full, strict=False)


def main(argv: list[str]) -> None:
    cfg_path, out, sets = argv[0], argv[1], [a for a in argv[2:] if a != "--set"]
    cfg = load_config(cfg_path, sets)
    info = init_distributed()
    try:
        trainer = TeacherTrainer(cfg, info)
        same_tables(trainer.dmp)
        if info.rank != 0:
            StreamingTeacher(trainer, None, None).follow()
            trainer.close()
            return
        teacher = StreamingTeacher(trainer, open_stream(cfg.stream, "samples", consumer="teacher"),
                                   open_stream(cfg.stream, "signals", producer_id="teacher"))
        teacher.run()
        teacher.finish()
        teacher.close()
        sig = open_stream(cfg.stream, "signals", consumer="check")
        ids, logits, steps = [], [], []
        while True:
            table, cursor = sig.poll(1 << 20, 0.0)
            if table is None or not table.num_rows:
                break
            ids.append(column_np(table, "sample_id"))
            logits.append(np.asarray(table.column("logits").combine_chunks().flatten()).reshape(table.num_rows, -1))
            steps.append(column_np(table, "teacher_step"))
        np.savez(out, sample_id=np.concatenate(ids), logits=np.concatenate(logits), step=np.concatenate(steps),
                 trained=teacher.counts.trained, published=teacher.counts.published)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
