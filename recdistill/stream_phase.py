"""The streaming phase after a batch run: `recdistill stream` and `recdistill demo --streaming`.

    recdistill demo --streaming --set stream.days=4                      # batch, then streaming, end to end
    recdistill stream --config CFG --resume-from runs/demo-X             # streaming after the batch run runs/demo-X
    recdistill stream --config CFG --resume-from RUN --set stream.backend=redis --set stream.start_server=true

A phased simulation, every record through the real stream backend (local by default; redis with
`stream.backend=redis`, its own redis-server with `stream.start_server=true`) and the real joiner. For each
streaming day d (recdistill/data/source.py `phase_days`):

1. publish: the teacher's sampled view of day d goes on the `samples` stream (`stream.rate` rows/s, 0 = as fast as
   possible; event time = the day's timeline, recdistill/streams/records.py), in chunks of 4 global teacher
   batches; after each chunk the teacher, the joiner and the students consume what has arrived (steps 2-4); after
   the day's last chunk the teacher trains its short last batch first, and at the end of the day the joiner is
   flushed and the students train theirs;
2. teach: the teacher, resumed from its batch checkpoint on the batch teacher's ranks (recdistill/train/
   stream_teacher.py; more than one rank: this under torchrun, rank 0 doing everything else), trains
   on the stream and publishes each forward's logits on the `signals` stream and in the signal store;
3. join: the joiner matches the two streams under the watermark and `stream.max_delay_s` into `joined`; its clock
   is the simulated now (the event time of the newest sample published), so join latency is in timeline time;
4. students: each experiment student, resumed from its batch checkpoint (`<run>/students/<name>.ckpt`), trains on
   `joined` (recdistill/train/stream_student.py) with its `stream_set` overrides, or stays `frozen`;
5. score: every student (and the teacher) on day d + 1, unsampled: the per-day next-day AUC table of the report.

Outputs go to `<batch run>/stream/`: the streams (local backend), the teacher's streaming signal store (`signals/`),
each student's materialised signals (`<name>.signals/`, the batch store layout: what it consumed), checkpoints,
report.md and stream_summary.json with the per-day AUCs and the join metrics. The batch run's own files are left as
they were: delete `<batch run>/stream/` to run the phase again.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from recdistill.config import Config, StreamConfig, apply_overrides
from recdistill.data.loader import BatchLoader
from recdistill.data.source import DataSource, build_source, phase_days
from recdistill.errors import UsageError
from recdistill.experiment import student_checkpoint_dir
from recdistill.report import markdown_table, write_report
from recdistill.runtime import intra_op_threads, usable_cores
from recdistill.streams import open_stream, stream_server
from recdistill.streams.joiner import Joiner
from recdistill.streams.records import day_end_ms, sample_records
from recdistill.tracking import Tracker, console
from recdistill.train import student_checkpoint as ckpt


class Publisher:
    """The sample stream's producer: the teacher's view of each streaming day, `seq` counting the rows appended."""

    def __init__(self, cfg: Config, source: DataSource, out) -> None:  # noqa: ANN001 - Stream
        self.cfg, self.source, self.out, self.seq = cfg, source, out, 0
        self.now = 0  # the event time of the newest row appended

    def day(self, day: int, chunk_rows: int):  # noqa: ANN201 - a generator of ints
        """Append `day` at `stream.rate` rows/s in chunks of exactly `chunk_rows` rows (the day's last may be
        short), yielding (the event time of the chunk's last row, whether the day is over) after each (the caller
        lets the consumers catch up there; the day's end comes last, with or without rows of its own). Whole
        chunks: with `chunk_rows` a multiple of the teacher's global batch, no row waits in the teacher's buffer for
        the next chunk, where it could miss max_delay."""
        cfg, tasks = self.cfg, self.source.schema.task_names
        rate, t0, sent, seq0 = cfg.stream.rate, time.monotonic(), 0, self.seq
        held: list[pa.Table] = []  # rows made but not appended yet: fewer than chunk_rows
        for b in BatchLoader(self.source, [day], cfg.data.batch_size, view=cfg.sampling.teacher, prefetch=0):
            held.append(sample_records(b, tasks, cfg.data.samples_per_day, seq0 + sent))
            sent += len(b)
            if rate > 0:  # keep pace with the wall clock: row k goes out k / rate seconds after the first
                time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
            if seq0 + sent - self.seq >= chunk_rows:
                table = pa.concat_tables(held)
                while table.num_rows >= chunk_rows:
                    yield self._append(table.slice(0, chunk_rows)), False
                    table = table.slice(chunk_rows)
                held = [table]
        if seq0 + sent > self.seq:
            self._append(pa.concat_tables(held))
        yield self.now, True

    def _append(self, table: pa.Table) -> int:
        """Append `table`; the event time of its last row."""
        self.out.append(table)
        self.seq += table.num_rows
        self.now = int(table.column("event_time_ms")[-1].as_py())
        return self.now


def _group(cfg: Config, who: str) -> StreamConfig:
    """The stream settings with a consumer group of `who`'s own: `{stream.group}-{who}` (redis; local ignores it)."""
    return cfg.stream.model_copy(update={"group": f"{cfg.stream.group}-{who}"})


def student_init(batch_dir: Path, name: str) -> Path:
    """Student `name`'s newest batch-phase checkpoint in `batch_dir`, or a UsageError naming where it should be."""
    init = ckpt.newest(student_checkpoint_dir(batch_dir, name))
    if init is None:
        raise UsageError(f"{batch_dir}: student '{name}' has no batch-phase checkpoint under "
                         f"{student_checkpoint_dir(batch_dir, name)}",
                         fix="run the batch phase with stream.days set (recdistill demo --streaming)")
    return init


def _students(cfg: Config, batch_dir: Path, out_dir: Path, url: str | None) -> dict:
    """name -> (StreamingStudent or a frozen StudentTrainer), each from its batch-phase checkpoint."""
    from recdistill.train.stream_student import StreamingStudent
    from recdistill.train.student import StudentTrainer

    out = {}
    for run in cfg.experiment.students:
        scfg = apply_overrides(cfg, [*run.set, *run.stream_set, f"student.checkpoint_dir={out_dir / run.name}.ckpt"],
                               origin=f"experiment.students[{run.name}]")
        init = student_init(batch_dir, run.name)
        trainer = StudentTrainer(scfg, run_dir=out_dir, name=run.name, open_store=False)
        if run.frozen:
            trainer.load_checkpoint(init, digest=None)
            out[run.name] = trainer
            continue
        joined = open_stream(_group(scfg, run.name), "joined", url=url, consumer=run.name)  # each gets every row
        out[run.name] = StreamingStudent(trainer, joined,
                                         init_from=init, materialise_uri=str(out_dir / f"{run.name}.signals"))
    return out


def stream_ranks(batch_dir: Path) -> int:
    """Ranks the streaming teacher runs on: those of the batch teacher's newest checkpoint (a checkpoint is resumed
    only by the world size that wrote it)."""
    from recdistill.train.checkpoint import META, latest_checkpoint

    ck = latest_checkpoint(batch_dir / "teacher_ckpt")
    if ck is None:
        raise UsageError(f"{batch_dir}: no teacher checkpoint under {batch_dir / 'teacher_ckpt'} to stream from",
                         fix="run the batch phase with stream.days set (recdistill demo --streaming)")
    return int(json.loads((ck / META).read_text())["world_size"])


def run_stream_phase(cfg: Config, batch_dir: Path, *, tracker: Tracker | None = None,
                     source: DataSource | None = None) -> dict:
    """The streaming phase after the batch run in `batch_dir` (see module docstring); returns the summary. The
    teacher runs on the batch teacher's ranks: in this process when that is one, else under torchrun
    (`python -m recdistill.stream_phase`, log `<run>/stream/stream.log`), rank 0 running the rest."""
    from recdistill.experiment import run_ranks
    from recdistill.train.distributed import destroy_distributed, init_distributed

    source = source or build_source(cfg.data)
    _, _, days = phase_days(source.days(), cfg.data.eval_days, cfg.stream.days)
    if not days:
        raise UsageError("stream.days is 0: there is no streaming phase", fix="--set stream.days=4 (as the batch run)")
    out_dir = batch_dir / "stream"
    if any((out_dir / d).exists() for d in ("signals", "streams", "stream_summary.json")):
        raise UsageError(f"{out_dir} already holds a streaming phase (its streams, checkpoints and signals)",
                         fix=f"delete {out_dir} to run the streaming phase of {batch_dir} again")
    nproc = stream_ranks(batch_dir)
    for run in cfg.experiment.students:  # before any rank starts
        student_init(batch_dir, run.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = [f"signals.uri={batch_dir / 'signals'}", f"teacher.checkpoint_dir={batch_dir / 'teacher_ckpt'}",
            "teacher.resume=true"]
    if cfg.stream.backend == "local":
        sets.append(f"stream.path={out_dir / 'streams'}")
    cfg = apply_overrides(cfg, sets, origin="stream")
    t0 = time.perf_counter()

    def log_day(row: dict, join: dict) -> None:
        if tracker is not None:
            tracker.log({f"stream/{k}": v for k, v in {**row, **join}.items() if isinstance(v, int | float)},
                        step=row["day"])

    if nproc == 1:
        info = init_distributed()
        try:
            res = _phase(cfg, batch_dir, days, info, source, on_day=log_day)
        finally:
            destroy_distributed()
    else:
        from recdistill.config import save_config

        cfg_path = save_config(cfg, out_dir)
        res_path = out_dir / "phase.json"
        run_ranks("recdistill.stream_phase",
                  ["--config", str(cfg_path), "--batch-dir", str(batch_dir), "--out", str(res_path)],
                  nproc, out_dir / "stream.log", what="streaming phase", echo=("stream:", "teacher: resum"))
        res = json.loads(res_path.read_text())
        for row in res["days"]:
            log_day(row, res["join"])
    summary = {**res, "ranks": nproc, "seconds": time.perf_counter() - t0}
    (out_dir / "stream_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["report"] = write_stream_report(out_dir, cfg, res["days"], res["join"])
    return summary


def _phase(cfg: Config, batch_dir: Path, days: list[int], info, source: DataSource,  # noqa: ANN001 - DistInfo
           on_day=None) -> dict:  # noqa: ANN001 - callable(row, join)
    """One rank's streaming phase: rank 0 publishes, drives the teacher, joins, trains and scores the students;
    the other ranks follow rank 0's teacher (recdistill/train/stream_teacher.py). Returns rank 0's {'days',
    'join', 'teacher'} (the other ranks': {})."""
    import torch

    from recdistill.train.stream_student import StreamingStudent
    from recdistill.train.stream_teacher import StreamingTeacher
    from recdistill.train.student import evaluate_students
    from recdistill.train.teacher import TeacherTrainer

    out_dir = batch_dir / "stream"
    trainer = TeacherTrainer(cfg, info, run_dir=out_dir / "teacher")
    if info.rank != 0:
        teacher = StreamingTeacher(trainer, None, None, store_uri=str(out_dir / "signals"))
        teacher.follow()
        trainer.close()
        return {}
    tasks = source.schema.task_names
    # torchrun gives each rank cores / ranks intra-op threads; rank 0 takes them all while the others wait for it
    rank_threads, all_threads = torch.get_num_threads(), max(torch.get_num_threads(), usable_cores())
    rows, join_metrics = [], {}
    with stream_server(cfg.stream) as url:
        samples = open_stream(cfg.stream, "samples", url=url, producer_id="publisher")
        # a consumer group each: members of one group would share the rows (redis), and each needs all of them
        teacher = StreamingTeacher(trainer,
                                   open_stream(_group(cfg, "teacher"), "samples", url=url, consumer="teacher"),
                                   open_stream(cfg.stream, "signals", url=url, producer_id="teacher"),
                                   store_uri=str(out_dir / "signals"))
        joiner = Joiner.from_config(cfg.stream,
                                    open_stream(_group(cfg, "joiner"), "samples", url=url, consumer="joiner"),
                                    open_stream(_group(cfg, "joiner"), "signals", url=url, consumer="joiner"),
                                    open_stream(cfg.stream, "joined", url=url, producer_id="joiner"),
                                    num_tasks=len(tasks))
        clock = [0]
        joiner.clock = lambda: clock[0]  # join latency on the simulated timeline, not the wall clock
        students = _students(cfg, batch_dir, out_dir, url)
        publisher = Publisher(cfg, source, samples)

        streaming = [s for s in students.values() if isinstance(s, StreamingStudent)]
        trainers = [s.t if isinstance(s, StreamingStudent) else s for s in students.values()]
        spent: dict[str, float] = {}

        @contextmanager
        def part(key: str, all_cores: bool = False):  # noqa: ANN202 - a context manager
            """Time the block into spent[key]; `all_cores`: the teacher's other ranks wait meanwhile, so this rank
            may use every core."""
            t = time.perf_counter()
            with intra_op_threads(all_threads if all_cores else rank_threads):
                try:
                    yield
                finally:
                    spent[key] += time.perf_counter() - t

        for day in days:
            spent.update(dict.fromkeys(("teacher", "teacher_eval", "students", "student_eval"), 0.0))
            start = time.perf_counter()
            for now_ms, day_over in publisher.day(day, chunk_rows=4 * cfg.data.batch_size * info.world_size):
                clock[0] = now_ms  # the simulated now: the event time of the newest sample published
                with part("teacher"):
                    teacher.run()
                    if day_over:  # the short last batch, before the joiner looks: its rows are as old as the chunk's
                        teacher.finish()
                with part("students", all_cores=True):
                    joiner.drain()
                    for s in streaming:
                        s.run()
            with part("students", all_cores=True):
                joiner.drain()
                joiner.flush(day_end_ms(day))
                join_metrics = joiner.metrics()
            row = {"day": day, "eval_day": day + 1}
            with part("teacher_eval"):
                row.update({f"teacher/{k}": v for k, v in teacher.evaluate([day + 1]).items() if k.startswith("auc/")})
            with part("students", all_cores=True):
                for name, s in students.items():
                    if isinstance(s, StreamingStudent):
                        s.run()
                        row.update({f"{name}/{k}": v for k, v in s.finish().items() if k.startswith("stream/")})
            with part("student_eval", all_cores=True):  # one pass over the day for all of them
                for name, (res, _) in zip(students, evaluate_students(trainers, [day + 1]), strict=True):
                    row.update({f"{name}/{k}": v for k, v in res.items() if k.startswith("auc/")})
            # the rest of the day: the publisher making the day's rows and appending them
            secs = {"publish": time.perf_counter() - start - sum(spent.values()), **spent}
            row.update({f"seconds/{k}": v for k, v in secs.items()})
            rows.append(row)
            console(f"stream: day {day} done in {sum(secs.values()):.0f} s (publish {secs['publish']:.0f}, teacher "
                    f"{secs['teacher']:.0f}, its evaluation {secs['teacher_eval']:.0f}, joiner and students "
                    f"{secs['students']:.0f}, their evaluation {secs['student_eval']:.0f}); next-day AUC "
                    + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.endswith("auc/ctr")))
            if on_day is not None:
                on_day(row, join_metrics)
        teacher_sum = teacher.summary()
        teacher.close()
        for s in streaming:
            s.close()
    return {"days": rows, "join": join_metrics, "teacher": teacher_sum}


def main(argv: list[str] | None = None) -> int:
    """One rank of a multi-rank streaming phase (launched by :func:`run_stream_phase` under torchrun)."""
    import argparse

    from recdistill.config import load_config
    from recdistill.runtime import prepare_process
    from recdistill.train.distributed import destroy_distributed, init_distributed

    prepare_process()
    p = argparse.ArgumentParser(description="one rank of the streaming phase (recdistill stream runs it)")
    p.add_argument("--config", required=True, help="the phase's resolved config (<run>/stream/config.yaml)")
    p.add_argument("--batch-dir", required=True, help="the batch run")
    p.add_argument("--out", required=True, help="rank 0 writes its result here (JSON)")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    source = build_source(cfg.data)
    _, _, days = phase_days(source.days(), cfg.data.eval_days, cfg.stream.days)
    info = init_distributed()
    try:
        res = _phase(cfg, Path(args.batch_dir), days, info, source)
        if info.rank == 0:
            Path(args.out).write_text(json.dumps(res, default=str))
    finally:
        destroy_distributed()
    return 0


def write_stream_report(out_dir: Path, cfg: Config, rows: list[dict], join: dict) -> Path:
    """report.md: next-day AUC per streaming day and model, and the join metrics."""
    auc_cols = [k for k in rows[0] if k.endswith("auc/ctr")] if rows else []
    table = [{"day": r["day"], "eval day": r["eval_day"], **{k.split("/")[0]: r[k] for k in auc_cols}} for r in rows]
    keep = ("join/join_rate", "join/joined", "join/expired", "join/late", "join/duplicate_samples",
            "join/duplicate_signals", "join/latency_p50_ms", "join/latency_p99_ms", "join/watermark_lag_ms")
    base = cfg.experiment.base_student
    gains = [{"day": r["day"], **{k.split("/")[0]: r[k] - r[f"{base}/auc/ctr"] for k in auc_cols
                                  if not k.startswith((base + "/", "teacher/"))}}
             for r in rows if f"{base}/auc/ctr" in r]
    sections = [
        ("What ran", f"{len(rows)} streaming day(s) on the `{cfg.stream.backend}` backend after the batch phase; "
                     f"max_delay {cfg.stream.max_delay_s} s, rate {cfg.stream.rate or 'unlimited'} rows/s. Students: "
                     + ", ".join(f"`{r.name}`{' (frozen)' if r.frozen else ''} "
                                 f"({' '.join([*r.set, *r.stream_set]) or 'defaults'})"
                                 for r in cfg.experiment.students) + "."),
        ("Next-day AUC (ctr) per streaming day", markdown_table(table)),
        (f"Gain over `{base}` (next-day AUC, ctr)", markdown_table(gains) if gains else "(no base student)"),
        ("Join", markdown_table([{"metric": k, "value": join.get(k)} for k in keep])),
    ]
    return write_report(out_dir, f"recdistill stream — {out_dir.parent.name}", sections, images=[])


if __name__ == "__main__":
    import sys

    sys.exit(main())
