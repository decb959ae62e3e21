"""Student trainer: one device, its own sampled view, teacher signals joined by sample id (DESIGN §4).

    recdistill student --config configs/demo.yaml --set student.signals_uri=runs/demo-x/signals
    recdistill student --config configs/demo.yaml \\
        --set student.towers=single --set student.tower_loss=task          # the base student: no distillation
    recdistill student --config configs/demo.yaml --set student.debias=exact --set student.beta=auto

The student reads its own (more down-sampled) view of the training days, looks up the teacher's raw logits of
each batch in the signal store, maps them with the configured debias mode (recdistill/distill/debias.py) and
trains: main tower on the task loss, auxiliary tower (or the single tower) on `student.tower_loss`. It then
evaluates on the *unsampled* evaluation days, every prediction in the true space (the student's own correction g
applied), and exports the served part (backbone + main tower) with torch.export, checking the exported program
against the model. Device: cuda:0 when present, else CPU.

Risk isolation (DESIGN 'does it survive production'): samples with no signal, or with a non-finite one, get no
distillation loss (counted); and a batch whose teacher logits do not rank the batch's own labels better than
`student.signal_min_auc` (by two standard errors) is treated as garbage and gets no distillation loss at all (counted in
`signals/rejected_batches`). Either way training goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recdistill.config import Config, SamplingConfig
from recdistill.data.batch import Batch
from recdistill.data.loader import BatchLoader, Position
from recdistill.data.roles import roles_for
from recdistill.data.source import DataSource, build_source, phase_days
from recdistill.distill import metrics
from recdistill.distill.debias import distill_pair, true_space, within_of
from recdistill.distill.gate import TaskGate
from recdistill.distill.losses import AutoBeta, distill_loss, hint_loss, task_loss, valid_signal
from recdistill.models.cross import plan_crosses
from recdistill.models.dense import FIT_ROWS
from recdistill.models.student import ServedStudent, StudentModel
from recdistill.serve import EXAMPLE_BATCH, ServingSpec, export_served, load_served
from recdistill.signals.bounded import open_reader
from recdistill.signals.schema import hidden_uri
from recdistill.tracking import Tracker, console, progress
from recdistill.train import student_checkpoint as ckpt


def rows_done_at(loader: BatchLoader) -> Callable[[Position | None], int]:
    """f(position) = source rows of the loader's work items before the one `position` lies in (f(None) or f of the
    end position: all of them), for a progress bar over one pass with a true total."""
    before, total = {}, 0
    for item in loader.items():
        before[(item.day, item.chunk)] = total
        total += item.stop - item.start
    return lambda pos: total if pos is None or pos.day is None else before[(pos.day, pos.chunk)]


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda:0 when CUDA is present, else cpu; anything else as a torch device string."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_signal_auc(teacher_logit: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     with_se: bool = False) -> float | tuple[float, float]:
    """AUC of the teacher's logits against the batch's labels on the `mask` rows (rank formula; NaN with fewer
    than 5 positives or 5 negatives, too few to judge); with `with_se`, also its Hanley-McNeil standard error."""
    s, y = teacher_logit[mask].double(), labels[mask] > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 5 or n_neg < 5:
        return (float("nan"), float("nan")) if with_se else float("nan")
    ranks = torch.empty_like(s)
    ranks[torch.argsort(s)] = torch.arange(1, len(s) + 1, dtype=s.dtype)
    a = float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return (a, metrics.auc_standard_error(a, n_pos, n_neg)) if with_se else a


@dataclass
class SignalCounts:
    """Teacher-signal bookkeeping of one training run (samples unless named otherwise)."""

    looked_up: int = 0
    joined: int = 0  # found and finite: got a distillation loss unless its batch was rejected
    missing: int = 0
    rejected_non_finite: int = 0
    rejected_batches: int = 0  # batches whose signals failed the quality gate
    rejected_batch_samples: int = 0
    corrupt_shards: int = 0  # store shards skipped as corrupt (signals.on_corrupt=skip): their samples are missing
    corrupt_rows: int = 0  # rows those shards held, by their commit markers
    task_gated_batches: int = 0  # (batch, task) pairs whose distillation the per-task gate turned off
    hint_joined: int = 0  # samples that got the representation hint (student.hint_weight)


class StudentTrainer:
    """Trains and evaluates one student (see module docstring). `train()`, `evaluate()`, `export()`."""

    def __init__(self, cfg: Config, *, run_dir: str | Path, source: DataSource | None = None,
                 tracker: Tracker | None = None, name: str = "student", open_store: bool = True) -> None:
        self.cfg, self.s = cfg, cfg.student
        self.batch_size = self.s.batch_size or cfg.data.batch_size
        self.run_dir, self.name, self.tracker = Path(run_dir), name, tracker
        self.device = pick_device(self.s.device)
        self.source = source if source is not None else build_source(cfg.data)
        schema = self.source.schema
        self.kinds = {t.name: t.kind for t in schema.tasks}
        self.within = within_of(schema.tasks)
        self.num_traffic = schema.num_traffic
        self.train_days, self.eval_days, self.stream_days = phase_days(self.source.days(), cfg.data.eval_days,
                                                                       cfg.stream.days)
        if self.s.train_days is not None:
            self.train_days = self.train_days[-self.s.train_days:]
        self.view = cfg.sampling.student
        # the representation hint applies to distilled students only; the store is read in the batch phase
        self.hint = bool(self.s.hint_weight) and "distill" in self.s.tower_loss
        self.hidden_reader = self._open_hidden() if self.hint and open_store else None
        if self.hint and not open_store:
            console(f"{name}: student.hint_weight is not used in the streaming phase (the signal stream carries "
                    "logits only): this student distils logits alone")
        torch.manual_seed(self.s.seed if self.s.seed is not None else cfg.experiment.seed)
        self.model = StudentModel(schema, features=self.s.features, emb_dim=self.s.emb_dim, hidden=self.s.hidden,
                                  depth=self.s.depth, history_len=self.s.history_len,
                                  decoupled=self.s.towers == "decoupled",
                                  interactions=self.s.interactions, match_features=self.s.match_features,
                                  roles=roles_for(cfg.data.roles, self.source, "student"),
                                  crosses=plan_crosses({f: schema.sparse[f] for f in self.s.features or schema.sparse},
                                                       self.s.crosses, max_vocab=self.s.cross_max_vocab,
                                                       order=self.s.cross_order, buckets=self.s.cross_buckets),
                                  summary_len=self.s.history_summary, dense=self.s.dense,
                                  dense_bins=self.s.dense_bins,
                                  hint_dim=self._hint_dim()).to(self.device)
        self._fit_dense()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=self.s.lr)
        self.auto_beta = AutoBeta(self.s.beta_ratio) if self.s.beta == "auto" else None
        self.counts = SignalCounts()
        self.reader, self.teacher_view, self.distill_cols, self.distill_by, self.task_gate = None, None, {}, {}, None
        if self.s.tower_loss != "task" and open_store:  # else: use_stream_signals()
            self._open_signals()
        self.steps = self.samples = 0
        self.digest = ckpt.student_digest(cfg)

    def _fit_dense(self, rows: int = FIT_ROWS) -> None:
        """Fit the model's dense encoding (the bins' quantile edges) to the first `rows` rows of the student's view
        of its training days, read inline (a deterministic function of data and config, so a resumed run fits the
        same edges, and its checkpoint holds them anyway)."""
        if self.model.dense_emb is None or not self.train_days:
            return
        got, n = [], 0
        # inline (no worker or thread): the pass stops early and nothing is left running
        for positioned in self.loader(self.train_days, self.view).stream(workers=0, prefetch=0):
            got.append(positioned.batch.dense)
            n += len(positioned.batch)
            if n >= rows:
                break
        if n:
            self.model.fit_dense(torch.cat(got)[:rows].to(self.device))

    def _open_signals(self) -> None:
        uri = self.s.signals_uri or self.cfg.signals.uri
        sig = self.cfg.signals
        self.reader = open_reader(uri, memory_mb=sig.reader_memory_mb, cache_dir=sig.reader_cache_dir,
                                  on_corrupt=sig.on_corrupt)
        if self.reader.meta is None:
            raise FileNotFoundError(f"student.tower_loss={self.s.tower_loss} needs teacher signals, but {uri} has no "
                                    "committed signal shard (run the teacher first, or set student.signals_uri)")
        self.counts.corrupt_shards = self.reader.stats.corrupt_shards
        self.counts.corrupt_rows = self.reader.stats.corrupt_rows
        if self.counts.corrupt_shards:
            console(f"{self.name}: skipped {self.counts.corrupt_shards} corrupt signal shard(s) of {uri} "
                    f"({self.counts.corrupt_rows} rows; signals.on_corrupt=skip): those samples train on labels only")
        meta = self.reader.meta
        self._teacher_tasks(meta.tasks, meta.sampling, f"teacher signals at {uri}")

    def _open_hidden(self):  # noqa: ANN202 - SignalReader | BoundedSignalReader
        """The store of the teacher's representations; a missing one is an error that says how to write one."""
        uri = hidden_uri(self.s.signals_uri or self.cfg.signals.uri)
        sig = self.cfg.signals
        reader = open_reader(uri, memory_mb=sig.reader_memory_mb, cache_dir=sig.reader_cache_dir,
                             on_corrupt=sig.on_corrupt)
        if reader.meta is None:
            raise FileNotFoundError(f"student.hint_weight={self.s.hint_weight} needs the teacher's representations, "
                                    f"but {uri} has no committed shard (train the teacher with "
                                    "teacher.signal_hidden > 0, or set student.hint_weight=0)")
        return reader

    def _hint_dim(self) -> int:
        """Width of the hint head: the representation store's; in the streaming phase (no store) the configured
        teacher.signal_hidden, so that a batch-phase checkpoint with a hint head loads (the head then rests)."""
        if self.hidden_reader is not None:
            return len(self.hidden_reader.meta.tasks)
        return self.cfg.teacher.signal_hidden if self.hint else 0

    def _teacher_tasks(self, tasks: list[str], view: SamplingConfig, where: str) -> None:
        """What distillation uses of a teacher with `tasks` (its signal columns, in order) trained on `view`."""
        self.teacher_view = view  # the teacher's logits live in the space of the view it trained on
        # Distillation covers the binary tasks both sides have; continuous heads learn from labels only.
        self.distill_cols = {t: tasks.index(t) for t, k in self.kinds.items() if k == "binary" and t in tasks}
        if not self.distill_cols:
            raise ValueError(f"{where} have tasks {tasks}; none is a binary task of the student "
                             f"({[t for t, k in self.kinds.items() if k == 'binary']})")
        # a task within the sampling task is mapped between the views with the teacher's logit of that task
        by = self.view.task
        self.distill_by = {t: tasks.index(by) for t in self.distill_cols
                           if self.within.get(t) == by == view.task and by in tasks}
        self.task_gate = TaskGate(list(self.distill_cols), rows=self.s.task_gate_rows) if self.s.task_gate else None

    # ---- losses ------------------------------------------------------------------------------------------------
    def use_stream_signals(self, tasks: list[str], view: SamplingConfig) -> None:
        """Take teacher signals from the joined stream instead of the store: the teacher's task order and view."""
        self._teacher_tasks(tasks, view, "the joined stream's teacher signals")

    def _signals(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw teacher logits [B, T] and a usable mask [B, T] for the batch (on the host), with the counts."""
        logits, found = self.reader.lookup(batch.sample_id)
        self.counts.looked_up += len(batch)
        self.counts.missing = self.reader.stats.missing
        self.counts.rejected_non_finite = self.reader.stats.rejected_non_finite
        return self.gate(batch, logits, found)

    def gate(self, batch: Batch, logits: torch.Tensor, found: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, usable-signal mask [B, T]) of raw teacher logits [B, T] whose rows are present where `found` [B]:
        non-finite logits are rejected per column, and a batch that fails the quality gate gets none (counted)."""
        c = self.counts
        mask = valid_signal(logits, found.unsqueeze(1).expand_as(logits))  # a NaN in any column rejects that one
        gate_task = next(iter(self.distill_cols))
        col = self.distill_cols[gate_task]
        # The gate is a one-sided test: the batch's signals pass only if their AUC is two standard errors above
        # signal_min_auc. A bare threshold lets ~1 in 4 random-garbage batches of 64 samples through (the AUC of
        # noise on 64 samples has a standard error near 0.07); two SEs let ~2% through at any batch size, while a
        # real teacher still passes at 64 samples.
        batch_auc, se = batch_signal_auc(logits[:, col], batch.labels[gate_task], mask[:, col], with_se=True)
        if batch_auc == batch_auc and batch_auc - 2 * se < self.s.signal_min_auc:  # NaN (too few labels) passes
            c.rejected_batches += 1
            c.rejected_batch_samples += int(mask[:, col].sum())
            return logits, torch.zeros_like(mask)
        c.joined += int(mask.all(1).sum())  # samples whose every signal column is used
        return logits, mask

    def _distill(self, z: dict[str, torch.Tensor], batch: Batch, t_logits: torch.Tensor, t_mask: torch.Tensor,
                 main: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distillation loss of the tower outputs `z`; `main`: the served tower's outputs (per-task gate)."""
        total = None
        for task, col in self.distill_cols.items():
            by = self.distill_by.get(task)
            mask = t_mask[:, col] if by is None else t_mask[:, col] & t_mask[:, by]
            z_by = None if by is None else t_logits[:, by]
            target, pred = distill_pair(self.s.debias, t_logits[:, col], z[task], batch.traffic, self.teacher_view,
                                        self.view, self.num_traffic, z_by)
            if self.task_gate is not None:  # teacher vs served tower, both in the distillation loss's space
                _, served = distill_pair(self.s.debias, t_logits[:, col], main[task], batch.traffic,
                                         self.teacher_view, self.view, self.num_traffic, z_by)
                if not self.task_gate.update(task, target, served, batch.labels[task], mask):
                    self.counts.task_gated_batches += 1
                    mask = torch.zeros_like(mask)
            loss = distill_loss(target, pred, mask, kind=self.s.distill_loss, temperature=self.s.temperature)
            total = loss if total is None else total + loss
        return total

    def _hidden(self, batch: Batch, t_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's representations [B, H] of the batch and the rows that take the hint [B]: found, and with a
        usable logit (a row whose logits are missing, rejected or gated gets no hint either)."""
        hidden, found = self.hidden_reader.lookup(batch.sample_id)
        mask = found & t_mask.any(1)
        self.counts.hint_joined += int(mask.sum())
        return hidden, mask

    def loss(self, batch: Batch, t_logits: torch.Tensor | None, t_mask: torch.Tensor | None,
             t_hidden: torch.Tensor | None = None, h_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The step's losses: `total` to backpropagate, plus its parts (detached) for logging. `t_hidden` [B, H] /
        `h_mask` [B]: the teacher's representations and the rows that take the hint (student.hint_weight)."""
        out = self.model(batch)
        kinds, cont = self.kinds, self.s.continuous_loss
        l_main = task_loss(out.main, batch.labels, kinds, continuous=cont)
        tower = out.aux if out.aux is not None else out.main
        parts = {"loss/main_task": l_main.detach()}
        tower_total = None
        if "task" in self.s.tower_loss:
            tower_task = task_loss(tower, batch.labels, kinds, continuous=cont) if out.aux is not None else l_main
            tower_total = tower_task
        if "distill" in self.s.tower_loss:
            l_d = self._distill(tower, batch, t_logits, t_mask, out.main)
            beta = self.auto_beta(l_main, l_d) if self.auto_beta is not None else torch.tensor(float(self.s.beta))
            parts.update({"loss/distill": l_d.detach(), "distill/beta": beta.detach()})
            tower_total = beta * l_d if tower_total is None else tower_total + beta * l_d
            if out.hint is not None and t_hidden is not None:
                l_h = hint_loss(out.hint, t_hidden, h_mask)
                parts["loss/hint"] = l_h.detach()
                tower_total = tower_total + self.s.hint_weight * l_h
        # Decoupled: the main tower's loss is the task loss alone; the tower loss reaches only aux + backbone.
        total = l_main + tower_total if out.aux is not None else tower_total
        parts["loss/total"] = total.detach()
        return {"total": total, **parts}

    # ---- training ----------------------------------------------------------------------------------------------
    def loader(self, days: list[int], view) -> BatchLoader:  # noqa: ANN001 - SamplingConfig | None
        return BatchLoader(self.source, days, self.batch_size, view=view, prefetch=self.cfg.data.prefetch,
                           workers=self.cfg.data.workers)

    def train_step(self, batch: Batch, t_logits: torch.Tensor | None = None, t_mask: torch.Tensor | None = None
                   ) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch` (on the host); teacher logits and mask from the store unless given."""
        if t_logits is None and self.reader is not None:
            t_logits, t_mask = self._signals(batch)
        t_hidden = h_mask = None
        if t_logits is not None:
            if self.hidden_reader is not None:
                t_hidden, h_mask = (x.to(self.device) for x in self._hidden(batch, t_mask))
            t_logits, t_mask = t_logits.to(self.device), t_mask.to(self.device)
        batch = batch.to(self.device)
        losses = self.loss(batch, t_logits, t_mask, t_hidden, h_mask)
        self.opt.zero_grad(set_to_none=True)
        losses["total"].backward()
        self.opt.step()
        self.steps += 1
        self.samples += len(batch)
        losses["batch"] = batch
        return losses

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint_state(self, **extra: Any) -> dict[str, Any]:
        """JSON-able training state besides weights and optimizer: steps, samples, counts, auto-beta, `extra`."""
        ab = self.auto_beta
        return {"steps": self.steps, "samples": self.samples, "counts": asdict(self.counts),
                "auto_beta": None if ab is None or ab.task_avg is None else
                [float(ab.task_avg), float(ab.distill_avg)], **extra}

    def save_checkpoint(self, dedup: dict[str, np.ndarray] | None = None, files: dict[str, bytes] | None = None,
                        **extra: Any) -> Path:
        """Checkpoint after the current step into student.checkpoint_dir (see student_checkpoint.py)."""
        return ckpt.save(self.s.checkpoint_dir, step=self.steps, model=self.model, opt=self.opt, digest=self.digest,
                         state=self.checkpoint_state(**extra), dedup=dedup, files=files, keep=self.s.checkpoint_keep)

    def load_checkpoint(self, path: Path, *, digest: str | None) -> tuple[dict[str, Any], dict | None]:
        """Load a checkpoint into this trainer (weights, optimizer, counters); returns (state, dedup arrays)."""
        state, dedup = ckpt.load(path, model=self.model, opt=self.opt, digest=digest)
        self.steps, self.samples = int(state["steps"]), int(state["samples"])
        self.counts = SignalCounts(**state["counts"])
        if self.auto_beta is not None and state.get("auto_beta"):
            t, d = state["auto_beta"]
            self.auto_beta.task_avg = torch.tensor(t, dtype=torch.float32, device=self.device)
            self.auto_beta.distill_avg = torch.tensor(d, dtype=torch.float32, device=self.device)
        if self.reader is not None:  # the reader's counters continue from the saved ones
            self.reader.stats.missing = self.counts.missing
            self.reader.stats.rejected_non_finite = self.counts.rejected_non_finite
        console(f"{self.name}: resumed from {path} (step {self.steps})")
        return state, dedup

    def _resume_batch(self) -> tuple[int, Position | None]:
        """(epoch, loader position) to start the batch phase from: the newest checkpoint's when resuming."""
        path = ckpt.newest(self.s.checkpoint_dir) if self.s.resume else None
        if path is None:
            return 0, None
        state, _ = self.load_checkpoint(path, digest=self.digest)
        if state.get("phase") != "batch":
            raise RuntimeError(f"student checkpoint {path} is of the {state.get('phase')!r} phase; the batch phase "
                               "resumes only its own (use another student.checkpoint_dir)")
        pos = Position.from_state(state["position"])
        return (int(state["epoch"]) + 1, None) if pos.day is None else (int(state["epoch"]), pos)

    def train(self) -> dict:
        """`student.epochs` passes over the student's view of the training days; returns a summary. With
        student.checkpoint_dir: checkpoints every student.checkpoint_every steps and at the end, and resumes from
        the newest one (student.resume)."""
        t0 = time.perf_counter()
        start_epoch, start = self._resume_batch()
        loader = self.loader(self.train_days, self.view)
        done_before = rows_done_at(loader)
        per_epoch = done_before(None)
        # Progress in source rows read (the view's kept rows per day are only known once read): a true total.
        bar = progress(total=per_epoch * self.s.epochs, desc=f"{self.name} train", unit="row",
                       enabled=self.cfg.tracking.progress)
        train_metrics = metrics.StreamingMetrics(self.kinds, window=20_000)
        log_every, every = self.s.log_every, self.s.checkpoint_every
        steps0, saved, last_epoch = self.steps, self.steps, self.s.epochs - 1
        for epoch in range(start_epoch, self.s.epochs):
            end = None
            for positioned in loader.stream(start=start if epoch == start_epoch else None):
                losses = self.train_step(positioned.batch)
                end = positioned.end
                bar.update(epoch * per_epoch + done_before(end) - bar.n)
                if self.steps % log_every == 0:
                    batch = losses["batch"]
                    with torch.no_grad():
                        probs = self._true_space(self.model(batch).main, batch)
                    train_metrics.update(batch.labels, probs)
                    self._log(losses, train_metrics, t0)
                if self.s.checkpoint_dir and self.steps % every == 0:
                    self.save_checkpoint(phase="batch", epoch=epoch, position=end.state())
                    saved = self.steps
            bar.update((epoch + 1) * per_epoch - bar.n)  # the pass's last work item is read
        bar.close()
        if self.s.checkpoint_dir and self.steps != saved:
            self.save_checkpoint(phase="batch", epoch=last_epoch, position={"day": None, "chunk": 0, "row": 0})
        secs = time.perf_counter() - t0
        served = sum(q.numel() for q in self.model.without_aux().parameters())  # what the exported program holds
        return {"train/steps": self.steps, "train/samples": self.samples, "train/seconds": secs,
                "train/resumed_at_step": steps0, "model/params": sum(q.numel() for q in self.model.parameters()),
                "model/served_params": served,
                "throughput/samples_per_s": self.samples / max(secs, 1e-9),
                **{f"signals/{k}": v for k, v in asdict(self.counts).items()}}

    def _log(self, losses: dict[str, torch.Tensor], train_metrics: metrics.StreamingMetrics, t0: float) -> None:
        if self.tracker is None:
            return
        vals = {f"{self.name}/{k}": float(v) for k, v in losses.items() if k not in ("total", "batch")}
        vals.update({f"{self.name}/train/{k}": v for k, v in train_metrics.compute().items() if k.startswith("auc/")})
        vals[f"{self.name}/throughput/samples_per_s"] = self.samples / max(time.perf_counter() - t0, 1e-9)
        vals.update({f"{self.name}/signals/{k}": v for k, v in asdict(self.counts).items()})
        self.tracker.log(vals, step=self.steps)

    def _true_space(self, z: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Raw outputs -> what is evaluated and served: sigmoid(g(z)) for binary tasks, the value for continuous."""
        return true_space(z, self.kinds, self.view, batch.traffic, self.num_traffic, self.s.continuous_loss,
                          within=self.within)

    # ---- evaluation and export ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, days: list[int] | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Metrics of the main tower (and of the aux tower, prefixed `aux/`) on the unsampled `days` (default: the
        evaluation days), plus the main tower's predictions: {'sample_id': [N], 'pred_<task>': true-space [N],
        'label_<task>', 'p_true_<task>' (where the data has it)}."""
        return evaluate_students([self], days or self.eval_days)[0]

    def _eval_batch(self, batch: Batch, acc: dict) -> None:
        """Forward one evaluation batch; its predictions, labels and ids into `acc` (see :func:`evaluate_students`)."""
        batch = batch.to(self.device)
        out = self.model(batch)
        acc.setdefault("ids", []).append(batch.sample_id.cpu())
        for name, z in (("main", out.main), ("aux", out.aux)):
            for t, v in (self._true_space(z, batch) if z is not None else {}).items():
                acc.setdefault(name, {}).setdefault(t, []).append(v.cpu())
        for name, d in (("labels", batch.labels), ("p_true", batch.p_true or {})):
            for t, v in d.items():
                acc.setdefault(name, {}).setdefault(t, []).append(v.cpu())

    def _eval_result(self, acc: dict) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        cat = {n: {t: torch.cat(v) for t, v in acc.get(n, {}).items()} for n in ("labels", "p_true", "main", "aux")}
        res = metrics.evaluate(cat["labels"], cat["main"], self.kinds, p_true=cat["p_true"] or None)
        if cat["aux"]:
            res.update({f"aux/{k}": v for k, v in metrics.evaluate(cat["labels"], cat["aux"], self.kinds).items()})
        # Same layout as the teacher's --eval-out file, so the experiment compares both on identical rows.
        preds = {"sample_id": torch.cat(acc["ids"]).numpy()}
        for name, prefix in (("main", "pred_"), ("labels", "label_"), ("p_true", "p_true_")):
            preds.update({prefix + t: v.numpy() for t, v in cat[name].items()})
        return res, preds

    def served(self) -> ServedStudent:
        """The served module: backbone + main tower, true-space outputs."""
        corr = self.view.correction(torch.arange(self.num_traffic), self.num_traffic)
        return ServedStudent(self.model, corr.to(self.device), self.kinds, self.s.continuous_loss,
                             sampling_task=self.view.task, within=self.within, b=self.view.b).eval()

    def export(self, path: str | Path) -> dict:
        """Export the served module with torch.export as `path`.pt2 plus its serving spec `path`.json
        (recdistill/serve.py), reload both and check the program against the model's main tower on an evaluation
        batch of another size than the one it was traced with. A failed export raises (ServeError, with the cause).
        Returns {'export/format', 'export/max_abs_diff', 'export/path'}."""
        spec = ServingSpec.of(self.model, self.source.schema)
        path = export_served(self.served(), spec, path)
        loaded = load_served(path)
        check = next(iter(self.loader(self.eval_days, None))).to(self.device)
        if len(check) == EXAMPLE_BATCH:  # the traced size proves nothing: take fewer
            check = check.select(torch.arange(len(check) - 1, device=self.device))
        with torch.no_grad():
            got = loaded(check)
            want = torch.stack(list(self._true_space(self.model(check).main, check).values()), dim=1)
        diff = float((got - want).abs().max())
        if not diff <= 1e-4:  # NaN fails too
            raise RuntimeError(f"exported student {path} differs from the model by {diff:.3g} (max abs)")
        return {"export/format": "torch.export", "export/max_abs_diff": diff, "export/path": str(path)}


def run_student(cfg: Config, run_dir: str | Path, *, name: str = "student", source: DataSource | None = None,
                tracker: Tracker | None = None) -> dict:
    """Train, evaluate and (if configured) export one student; writes `<run_dir>/<name>.summary.json` and
    `<run_dir>/<name>.eval_preds.npz`; returns the summary (eval metrics under `eval/`)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = StudentTrainer(cfg, run_dir=run_dir, source=source, tracker=tracker, name=name)
    summary = trainer.train()
    res, preds = trainer.evaluate()
    summary.update({f"eval/{k}": v for k, v in res.items()})
    if cfg.student.export:
        summary.update(trainer.export(run_dir / f"{name}_main_tower"))
    np.savez(run_dir / f"{name}.eval_preds.npz", **preds)
    (run_dir / f"{name}.summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if tracker is not None:
        tracker.summary({f"{name}/{k}": v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def evaluate_students(trainers: list[StudentTrainer], days: list[int]
                      ) -> list[tuple[dict[str, float], dict[str, np.ndarray]]]:
    """`StudentTrainer.evaluate(days)` of each trainer, in order. Trainers that read the same data (equal `data`
    config and batch size) share one pass over it: unsampled evaluation days with long histories cost more to make
    than the small students cost to run, and the streaming phase scores every student every day."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trainers):
        groups.setdefault(f"{t.cfg.data.model_dump_json()}|{t.batch_size}", []).append(i)
    out: list = [None] * len(trainers)
    for members in groups.values():
        accs = [{} for _ in members]
        for t in (trainers[i] for i in members):
            t.model.eval()
        try:
            with torch.no_grad():
                for batch in trainers[members[0]].loader(days, None):
                    for i, acc in zip(members, accs, strict=True):
                        trainers[i]._eval_batch(batch, acc)
        finally:
            for t in (trainers[i] for i in members):
                t.model.train()
        for i, acc in zip(members, accs, strict=True):
            out[i] = trainers[i]._eval_result(acc)
    return out
