"""The teacher's next-day evaluation: every eval sample once, over all ranks, in the true space.

The eval days are read unsampled (the true population) and split over the ranks like the training days; the
sharded model forwards them in lockstep (recdistill/train/lockstep.py), each rank keeps its valid rows, and the
predictions are gathered on the host over the gloo control group and sorted by sample id, so every rank computes
the same metrics from the same rows. Predictions are true-space (distill/debias.py `true_space` with the teacher's
own SamplingConfig): what the student's are compared against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recdistill.config import Config
from recdistill.data.loader import BatchLoader
from recdistill.data.source import DataSource
from recdistill.distill.debias import true_space, within_of
from recdistill.distill.metrics import evaluate
from recdistill.train.distributed import DistInfo
from recdistill.train.lockstep import LockstepBatches


def gather_sorted(local: dict[str, np.ndarray], group: dist.ProcessGroup, world_size: int) -> dict[str, np.ndarray]:
    """Collective: every rank's columns concatenated and sorted by 'sample_id' (columns some rank lacks are
    dropped). Refuses a sample id seen twice: the ranks' chunks must not overlap."""
    gathered: list[dict[str, np.ndarray]] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, local, group=group)  # on the gloo group: host objects, any backend
    keys = [k for k in gathered[0] if all(k in g for g in gathered)]
    merged = {k: np.concatenate([g[k] for g in gathered]) for k in keys}
    order = np.argsort(merged["sample_id"], kind="stable")
    merged = {k: v[order] for k, v in merged.items()}
    if len(np.unique(merged["sample_id"])) != len(order):
        raise RuntimeError("evaluation counted a sample twice: ranks' eval chunks overlap")
    return merged


class TeacherEvaluator:
    """Forwards eval days through the sharded teacher on every rank; :meth:`evaluate` gives the metrics."""

    def __init__(self, cfg: Config, source: DataSource, info: DistInfo, group: dist.ProcessGroup) -> None:
        self.cfg, self.source, self.info, self.group = cfg, source, info, group
        self.tasks = source.schema.task_names
        self.kinds = {t.name: t.kind for t in source.schema.tasks}
        self.within = within_of(source.schema.tasks)

    def batches(self, days: list[int]) -> LockstepBatches:
        """This rank's chunk of `days`, unsampled, padded and in lockstep with the other ranks."""
        bs = self.cfg.data.batch_size
        loader = BatchLoader(self.source, days, bs, view=None, rank=self.info.rank, world_size=self.info.world_size,
                             prefetch=self.cfg.data.prefetch, workers=self.cfg.data.workers,
                             drop_last=False)  # unsampled: the true population
        return LockstepBatches(loader, bs, self.group, fallback=lambda: self.source.read(days[0], 0, 1))

    @torch.no_grad()  # not inference_mode: gloo collectives fail inside it (DESIGN §5)
    def predict(self, dmp: torch.nn.Module, days: list[int]) -> dict[str, np.ndarray]:
        """Every eval sample of `days` exactly once, gathered from all ranks and sorted by sample id:
        {'sample_id', 'pred/<task>', 'label/<task>', and 'p_true/<task>' where the data has ground truth}."""
        cols: dict[str, list[np.ndarray]] = {}
        view, nt = self.cfg.sampling.teacher, self.source.schema.num_traffic
        for batch, real in self.batches(days):
            batch = batch.to(self.info.device)
            preds = true_space(dmp(batch), self.kinds, view, batch.traffic, nt, within=self.within)
            part = {"sample_id": batch.sample_id, **{f"pred/{t}": v for t, v in preds.items()},
                    **{f"label/{t}": v for t, v in batch.labels.items()},
                    **{f"p_true/{t}": v for t, v in (batch.p_true or {}).items()}}
            for k, v in part.items():
                cols.setdefault(k, []).append(v[:real].detach().cpu().numpy())
        local = {k: np.concatenate(v) for k, v in cols.items()}
        return gather_sorted(local, self.group, self.info.world_size)

    def evaluate(self, dmp: torch.nn.Module, days: list[int], out_path: str | None = None) -> dict[str, float]:
        """Next-day evaluation on the unsampled `days`: AUC / NE / calibration per binary task, MSE per continuous
        task, Bayes-optimal values where the data has p_true. The same numbers on every rank. `out_path`: rank 0
        writes the gathered predictions there (.npz: sample_id, pred_<task>, label_<task>, p_true_<task>)."""
        dmp.module.train(False)
        try:
            cols = self.predict(dmp, days)
        finally:
            dmp.module.train(True)
        if out_path is not None and self.info.rank == 0:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            # '/' would become a folder inside the zip archive: npz keys use '_' (sample_id, pred_ctr, label_ctr).
            np.savez(out_path, **{k.replace("/", "_"): v for k, v in cols.items()})
        pick = {f: {t: torch.from_numpy(cols[f"{f}/{t}"]) for t in self.tasks if f"{f}/{t}" in cols}
                for f in ("pred", "label", "p_true")}
        metrics = evaluate(pick["label"], pick["pred"], self.kinds, p_true=pick["p_true"] or None)
        return {"samples": int(len(cols["sample_id"])), **metrics}
