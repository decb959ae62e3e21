"""Teacher trainer: TorchRec-sharded embeddings + DeepSpeed dense, writing raw logits as it trains.

    torchrun --nproc_per_node=2 -m recdistill.train.teacher --config configs/demo.yaml \\
        --set teacher.deepspeed=configs/deepspeed/zero3.json --set teacher.sharding=row_wise
    python -m recdistill.train.teacher --config configs/teacher/tiny.yaml        # one process

Forward distillation: each step's raw logits go to the rank's SignalWriter *before* backward, so the stored
logit is the out-of-sample prediction of the step that first trains on that sample (one pass over the training
days: no sample is trained twice). A window is committed every `signals.window_steps` steps.
Ranks can run out of batches at different steps (their sampled chunks differ in size): every step first agrees
on "all ranks still have a batch" over a small gloo group, so collectives never mismatch; a rank's leftover
batches, and each day's last partial batch, are neither trained nor written.
Not yet here (issue 4): checkpoint/resume, bf16 on GPU, W&B logging of streaming AUC (printed and in JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from recdistill.config import Config, add_config_arguments, config_from_args
from recdistill.data.loader import BatchLoader, build_source
from recdistill.distill.debias import to_true
from recdistill.distill.losses import task_loss
from recdistill.distill.metrics import StreamingMetrics, evaluate
from recdistill.models.teacher import TeacherModel
from recdistill.signals.schema import SignalMeta
from recdistill.signals.writer import SignalWriter
from recdistill.tracking import console
from recdistill.train.distributed import DistInfo, destroy_distributed, init_distributed
from recdistill.train.parallelize import parallelize_teacher


def deepspeed_config(cfg: Config, path: str) -> dict:
    """The DeepSpeed JSON with what the run decides filled in: micro batch, clipping (explicit), precision."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"teacher.deepspeed: no such DeepSpeed config file: {p}")
    ds = json.loads(p.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["gradient_clipping"] = cfg.teacher.grad_clip
    ds.setdefault("zero_allow_untested_optimizer", True)  # a client torch optimizer under ZeRO
    ds["bf16"] = {"enabled": torch.cuda.is_available()}  # fp32 on CPU
    return ds


def stacked_logits(out: dict[str, torch.Tensor], tasks: list[str]) -> torch.Tensor:
    """[B, num_tasks] raw logits in task order (what the signal store records)."""
    return torch.stack([out[t].detach().float() for t in tasks], dim=1)


class TeacherTrainer:
    """One rank's teacher training: `run()` trains one pass over the training days; `close()` always."""

    def __init__(self, cfg: Config, info: DistInfo) -> None:
        from torchrec.optim import RowWiseAdagrad

        self.cfg, self.info = cfg, info
        self.source = build_source(cfg.data)
        self.tasks = self.source.schema.task_names
        self.kinds = {t.name: t.kind for t in self.source.schema.tasks}
        days = self.source.days()
        self.train_days = days[: -cfg.data.eval_days]
        self.eval_days = days[-cfg.data.eval_days:]
        torch.manual_seed(cfg.experiment.seed)  # same initial weights on every rank
        model = TeacherModel(self.source.schema, cfg.teacher)
        self.dmp, self.engine = parallelize_teacher(
            model, sharding=cfg.teacher.sharding, device=info.device,
            ds_config=deepspeed_config(cfg, cfg.teacher.deepspeed),
            dense_optimizer=lambda p: torch.optim.Adam(p, lr=cfg.teacher.lr),
            sparse_optimizer=RowWiseAdagrad, sparse_kwargs={"lr": cfg.teacher.sparse_lr})
        self.control = dist.new_group(backend="gloo")  # CPU-side agreement on step counts, also under NCCL
        self.writer = None
        if cfg.teacher.write_signals:
            meta = SignalMeta(run_id=cfg.experiment.name, teacher_version=cfg.digest(), tasks=self.tasks,
                              sampling=cfg.sampling.teacher)
            self.writer = SignalWriter(cfg.signals.uri, info.rank, meta, queue_size=cfg.signals.queue_size)
        self.metrics = StreamingMetrics(self.kinds, window=20_000)
        self.trained = 0
        self.steps = 0

    def loader(self) -> BatchLoader:
        return BatchLoader(self.source, self.train_days, self.cfg.data.batch_size, view=self.cfg.sampling.teacher,
                           rank=self.info.rank, world_size=self.info.world_size, prefetch=self.cfg.data.prefetch,
                           drop_last=True)  # equal local batch sizes: gloo's all-gather (row-wise) needs them

    def _all_have_batch(self, has: bool) -> bool:
        flag = torch.tensor([1 if has else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.control)
        return bool(flag.item())

    def _any_has_batch(self, has: bool) -> bool:
        flag = torch.tensor([1 if has else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def true_space(self, out: dict[str, torch.Tensor], traffic: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predictions to evaluate: binary tasks as true-space probabilities (the teacher's own sampling
        correction on its raw logit, then a sigmoid), continuous tasks as values (heads predict log1p)."""
        nt = self.source.schema.num_traffic
        return {t: torch.sigmoid(to_true(z.float(), self.cfg.sampling.teacher, traffic, nt))
                if self.kinds[t] == "binary" else torch.expm1(z.float()) for t, z in out.items()}

    def _eval_batches(self, days: list[int]):  # noqa: ANN202 - Iterator[tuple[Batch, int]]
        """(batch padded to batch_size, number of real rows) until every rank's chunk of `days` is done.

        DMP's forward runs collectives (all-to-all; all-gather for row-wise), so every rank forwards the same
        number of batches of the same size: a short last batch is padded by repeating its rows, and a rank that
        is done forwards a filler batch (0 real rows) while others still have data.
        """
        bs = self.cfg.data.batch_size
        loader = BatchLoader(self.source, days, bs, view=None, rank=self.info.rank, world_size=self.info.world_size,
                             prefetch=self.cfg.data.prefetch, drop_last=False)  # unsampled: the true population
        it, filler = iter(loader), None
        while True:
            batch = next(it, None)
            if not self._any_has_batch(batch is not None):
                return
            if batch is None:
                # A rank whose chunks hold no rows at all still needs a batch to forward: one row of the data.
                filler = filler or self.source.read(days[0], 0, 1)
                batch, real = filler, 0
            else:
                filler, real = batch, len(batch)
            if len(batch) != bs:
                batch = batch.select(torch.arange(bs) % len(batch))
            yield batch, real

    @torch.no_grad()  # not inference_mode: gloo collectives fail inside it (DESIGN §5)
    def predict(self, days: list[int]) -> dict[str, np.ndarray]:
        """Every eval sample of `days` exactly once, gathered from all ranks and sorted by sample id:
        {'sample_id', 'pred/<task>', 'label/<task>', and 'p_true/<task>' where the data has ground truth}."""
        cols: dict[str, list[np.ndarray]] = {}
        for batch, real in self._eval_batches(days):
            batch = batch.to(self.info.device)
            preds = self.true_space(self.dmp(batch), batch.traffic)
            part = {"sample_id": batch.sample_id, **{f"pred/{t}": v for t, v in preds.items()},
                    **{f"label/{t}": v for t, v in batch.labels.items()},
                    **{f"p_true/{t}": v for t, v in (batch.p_true or {}).items()}}
            for k, v in part.items():
                cols.setdefault(k, []).append(v[:real].detach().cpu().numpy())
        local = {k: np.concatenate(v) for k, v in cols.items()}
        gathered: list[dict[str, np.ndarray]] = [{} for _ in range(self.info.world_size)]
        dist.all_gather_object(gathered, local, group=self.control)  # on the gloo group: host objects, any backend
        keys = [k for k in gathered[0] if all(k in g for g in gathered)]
        merged = {k: np.concatenate([g[k] for g in gathered]) for k in keys}
        order = np.argsort(merged["sample_id"], kind="stable")
        merged = {k: v[order] for k, v in merged.items()}
        if len(np.unique(merged["sample_id"])) != len(order):
            raise RuntimeError("evaluation counted a sample twice: ranks' eval chunks overlap")
        return merged

    def evaluate(self, days: list[int] | None = None, out_path: str | None = None) -> dict[str, float]:
        """Next-day evaluation on the unsampled `days` (default: the last data.eval_days): AUC / NE / calibration
        per binary task, MSE per continuous task, Bayes-optimal values where the data has p_true. The same
        numbers on every rank. `out_path`: rank 0 writes the gathered predictions there (.npz, see `main`)."""
        days = self.eval_days if days is None else days
        self.dmp.module.train(False)
        try:
            cols = self.predict(days)
        finally:
            self.dmp.module.train(True)
        if out_path is not None and self.info.rank == 0:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            # '/' would become a folder inside the zip archive: npz keys use '_' (sample_id, pred_ctr, label_ctr).
            np.savez(out_path, **{k.replace("/", "_"): v for k, v in cols.items()})
        pick = {f: {t: torch.from_numpy(cols[f"{f}/{t}"]) for t in self.tasks if f"{f}/{t}" in cols}
                for f in ("pred", "label", "p_true")}
        metrics = evaluate(pick["label"], pick["pred"], self.kinds, p_true=pick["p_true"] or None)
        return {"samples": int(len(cols["sample_id"])), **metrics}

    def train_step(self, batch) -> torch.Tensor:  # noqa: ANN001 - Batch
        """Forward, write signals (before backward), backward, step."""
        batch = batch.to(self.info.device)
        out = self.dmp(batch)
        if self.writer is not None:
            window = self.steps // self.cfg.signals.window_steps
            if self.writer.window != window:
                if self.writer.window is not None:
                    self.writer.commit_window()
                self.writer.begin_window(window)
            self.writer.write(batch.sample_id, stacked_logits(out, self.tasks), self.steps)
        loss = task_loss(out, batch.labels, self.kinds, continuous="log_mse")  # heads predict log1p(value)
        self.engine.backward(loss)
        self.engine.step()
        probs = {t: torch.sigmoid(v) if self.kinds[t] == "binary" else torch.expm1(v) for t, v in out.items()}
        self.metrics.update(batch.labels, {t: v.detach() for t, v in probs.items()})
        return loss.detach()

    def run(self, eval_out: str | None = None) -> dict:
        """One pass over the training days (or teacher.steps steps), then the next-day evaluation; returns the
        summary (`eval/<metric>/<task>` keys from :meth:`evaluate`)."""
        it = iter(self.loader())
        t0 = time.perf_counter()
        last_loss = torch.tensor(float("nan"))
        while self.cfg.teacher.steps is None or self.steps < self.cfg.teacher.steps:
            batch = next(it, None)
            if not self._all_have_batch(batch is not None):
                break
            last_loss = self.train_step(batch)
            self.trained += len(batch)
            self.steps += 1
            if self.steps % 20 == 0:
                m = self.metrics.compute()
                console(f"teacher step {self.steps}: loss {float(last_loss):.4f} "
                        + " ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("auc/")), self.info.rank)
        if self.writer is not None:
            self.writer.flush()
        secs = time.perf_counter() - t0
        summary = {"rank": self.info.rank, "steps": self.steps, "trained_samples": self.trained,
                   "seconds": secs, "samples_per_s": self.trained / max(secs, 1e-9), "loss": float(last_loss),
                   **{f"stream/{k}": v for k, v in self.metrics.compute().items()}}
        summary.update({f"eval/{k}": v for k, v in self.evaluate(out_path=eval_out).items()})
        return summary

    def close(self) -> None:
        """Commit the open window and stop the writer (also after an error)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun / the deepspeed launcher / a single process."""
    p = argparse.ArgumentParser(description="recdistill teacher trainer")
    add_config_arguments(p)
    p.add_argument("--summary", default=None, help="write each rank's summary JSON to this path + .rank{r}.json")
    p.add_argument("--eval-out", default=None, metavar="PATH",
                   help="rank 0 writes the eval days' predictions here (.npz: sample_id, pred_<task> = true-space "
                   "probability for binary tasks / value for continuous ones, label_<task>, p_true_<task>)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    info = init_distributed()
    trainer = None
    try:
        trainer = TeacherTrainer(cfg, info)
        summary = trainer.run(eval_out=args.eval_out)
        trainer.close()
        console(f"teacher done: {json.dumps(summary)}", info.rank)
        if args.summary:
            Path(f"{args.summary}.rank{info.rank}.json").write_text(json.dumps(summary))
        return 0
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
