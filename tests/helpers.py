"""Shared test data: a small Schema and random Batches with jagged sparse features and histories.

Importable from every test file (pytest's `pythonpath` includes tests/).
"""

from pathlib import Path

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batch import Batch, History, Schema, TaskSpec, offsets_from_lengths
from recdistill.data.sampling import SamplingConfig
from recdistill.signals.schema import SignalMeta, shard_path

#: The checkout, and the tiny teacher preset by absolute path: tests pass from any working directory.
ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "teacher" / "tiny.yaml")

#: A short teacher run on 2 ranks, 4 steps of 32 (tests/train), and its ZeRO-1 form (fp32, no activation
#: checkpointing: tests/train/conftest.py's one_node_zero1, shared by test_teacher_launchers.py and
#: test_teacher_scale.py).
SHORT_SETS = ["data.samples_per_day=600", "data.num_days=2", "data.batch_size=32", "teacher.steps=4",
              "signals.window_steps=2", "tracking.mode=disabled", "tracking.progress=false"]
ZERO1_SETS = [*SHORT_SETS, "teacher.deepspeed=configs/deepspeed/zero1.json", "teacher.precision=fp32",
              "teacher.activation_checkpointing=none"]

SCHEMA = Schema(tasks=(TaskSpec("ctr"), TaskSpec("watch_time", "continuous")), dense=("d0", "d1"),
                sparse={"user_id": 50, "item_id": 40, "item_cat": 7}, history={"item": 40, "cat": 7, "ts": 10**9},
                num_traffic=2, max_history=30)


def make_batch(n: int = 9, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    keys = list(SCHEMA.sparse)
    vals = torch.cat([torch.randint(0, SCHEMA.sparse[k], (n,), generator=g) for k in keys])
    hl = torch.randint(0, 30, (n,), generator=g)
    hl[0] = 0  # an empty history
    tot = int(hl.sum())
    hist = History(offsets_from_lengths(hl), {"item": torch.randint(0, 40, (tot,), generator=g),
                                              "cat": torch.randint(0, 7, (tot,), generator=g),
                                              "ts": torch.arange(tot)})
    return Batch(sample_id=torch.arange(n), day=torch.zeros(n, dtype=torch.int32),
                 traffic=torch.zeros(n, dtype=torch.int64),
                 labels={"ctr": (torch.rand(n, generator=g) < 0.3).float(), "watch_time": torch.rand(n, generator=g)},
                 dense=torch.randn(n, 2, generator=g),
                 sparse=KeyedJaggedTensor(keys=keys, values=vals, lengths=torch.ones(n * len(keys), dtype=torch.int64)),
                 history=hist)


def assert_same_batch(a: Batch, b: Batch, what: str = "") -> None:
    """Every field of two Batches equal (values and dtypes), `what` named in the failure message."""
    for name in ("sample_id", "day", "traffic", "dense"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {name}"
    assert a.sampling == b.sampling, f"{what}: sampling"
    for fa, fb, name in ((a.labels, b.labels, "labels"), (a.p_true or {}, b.p_true or {}, "p_true")):
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa), f"{what}: {name}"
    assert a.sparse.keys() == b.sparse.keys(), f"{what}: sparse keys"
    for k in a.sparse.keys():
        assert torch.equal(a.sparse[k].values(), b.sparse[k].values()), f"{what}: sparse {k}"
        assert torch.equal(a.sparse[k].lengths(), b.sparse[k].lengths()), f"{what}: sparse {k} lengths"
    assert torch.equal(a.history.offsets, b.history.offsets), f"{what}: history offsets"
    assert a.history.fields.keys() == b.history.fields.keys(), f"{what}: history fields"
    for k in a.history.fields:
        assert torch.equal(a.history.fields[k], b.history.fields[k]), f"{what}: history {k}"


# ---- signal store -------------------------------------------------------------------------------------------
META = SignalMeta(run_id="r1", teacher_version="abc123", tasks=["ctr", "cvr"],
                  sampling=SamplingConfig(name="teacher", r=0.5))


def ids_of(step: int, rank: int = 0, n: int = 8) -> torch.Tensor:
    """The sample ids a (simulated) teacher step trains on."""
    return torch.arange(n) + step * 1000 + rank * 100


def logits_of(ids: torch.Tensor) -> torch.Tensor:
    """Deterministic logits per sample id, so any stored row can be checked."""
    x = ids.double()
    return torch.stack([torch.sin(x), torch.cos(x)], 1).float()


# ---- an oracle teacher for student tests ---------------------------------------------------------------------
def write_oracle_signals(cfg, uri: str, *, window_steps: int = 4, corrupt: dict | None = None) -> dict:
    """Write, through the real SignalWriter, what a perfect teacher would: logit(p_true) mapped into the teacher's
    sampled space, for every sample of the teacher's view of the training days (batches of data.batch_size).

    `corrupt` = {window: 'garbage' | 'nan' | 'missing' | 'truncated'}: that whole window is random N(0, 3) logits,
    NaN, never written, or committed and then cut in half on disk (a reader with signals.on_corrupt=skip skips its
    shard). Returns {'rows': written, 'windows': n}.
    """
    from recdistill.data.loader import BatchLoader
    from recdistill.data.source import build_source
    from recdistill.distill.debias import to_sampled
    from recdistill.signals.writer import SignalWriter

    src = build_source(cfg.data)
    view, nt = cfg.sampling.teacher, src.schema.num_traffic
    meta = SignalMeta(run_id="oracle", teacher_version="oracle", tasks=src.schema.task_names, sampling=view)
    corrupt, rows, g = corrupt or {}, 0, torch.Generator().manual_seed(7)
    steps = 0
    with SignalWriter(uri, 0, meta, window_steps=window_steps) as w:
        for step, b in enumerate(BatchLoader(src, src.days()[: -cfg.data.eval_days], cfg.data.batch_size, view=view,
                                             prefetch=0)):
            steps = step + 1
            kind = corrupt.get(step // window_steps)
            if kind == "missing":
                continue
            cols = []
            for t in src.schema.task_names:
                p = b.p_true[t].double()
                if t == "watch_time":
                    cols.append(torch.log1p(p).float())
                    continue
                p = p.clamp(1e-6, 1 - 1e-6)
                cols.append(to_sampled((torch.log(p) - torch.log1p(-p)).float(), view, b.traffic, nt))
            logits = torch.stack(cols, 1)
            if kind == "garbage":
                logits = 3 * torch.randn(logits.shape, generator=g)
            elif kind == "nan":
                logits = torch.full_like(logits, float("nan"))
            w.write(b.sample_id, logits, step)
            rows += len(b)
    for window in (w for w, kind in corrupt.items() if kind == "truncated" and w * window_steps < steps):
        path = Path(shard_path(uri, window, 0))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return {"rows": rows, "windows": -(-steps // window_steps)}


def oracle_logits(batch, tasks, view, num_traffic):
    """[B, T] raw logits a perfect teacher with sampling view `view` would write (logit(p_true) in its sampled space;
    log1p of the expectation for watch_time)."""
    from recdistill.distill.debias import to_sampled

    cols = []
    for t in tasks:
        p = batch.p_true[t].double()
        if t == "watch_time":
            cols.append(torch.log1p(p).float())
            continue
        p = p.clamp(1e-6, 1 - 1e-6)
        cols.append(to_sampled((torch.log(p) - torch.log1p(-p)).float(), view, batch.traffic, num_traffic))
    return torch.stack(cols, 1)


def publish_oracle_joined(cfg, days, *, stall=None, nan=None) -> dict:
    """Publish the teacher's view of `days` on the real sample stream, oracle signals on the signal stream, and run
    the real joiner into the `joined` stream (cfg.stream: backend, path, partitions, max_delay_s).

    stall = (day, lo, hi): the teacher writes nothing for the samples of `day` with index in [lo, hi) (they go out
    label-only); nan = (day, lo, hi): it writes NaN logits for those. Returns the joiner's metrics, the ids of the
    published samples (`ids`) and the joiner itself (`joiner`, to keep using)."""
    from recdistill.data.loader import BatchLoader
    from recdistill.data.source import build_source
    from recdistill.streams import open_stream
    from recdistill.streams.joiner import Joiner
    from recdistill.streams.records import day_end_ms, sample_records, signal_records

    src = build_source(cfg.data)
    tasks, view, nt, n = src.schema.task_names, cfg.sampling.teacher, src.schema.num_traffic, cfg.data.samples_per_day
    s_in, g_in, out = (open_stream(cfg.stream, name) for name in ("samples", "signals", "joined"))
    joiner = Joiner.from_config(cfg.stream, open_stream(cfg.stream, "samples"), open_stream(cfg.stream, "signals"),
                                out, num_tasks=len(tasks))
    ids, seq = [], 0
    for day in days:
        for step, b in enumerate(BatchLoader(src, [day], cfg.data.batch_size, view=view, prefetch=0)):
            s_in.append(sample_records(b, tasks, n, seq))
            idx = b.sample_id.numpy() & ((1 << 40) - 1)
            z = oracle_logits(b, tasks, view, nt)
            keep = torch.ones(len(b), dtype=torch.bool)
            if stall and stall[0] == day:
                keep = torch.from_numpy(~((idx >= stall[1]) & (idx < stall[2])))
            if nan and nan[0] == day:
                z[torch.from_numpy((idx >= nan[1]) & (idx < nan[2]))] = float("nan")
            if keep.any():
                g_in.append(signal_records(b.sample_id[keep].numpy(), z[keep].numpy(), step=step, version="oracle",
                                           rows_per_day=n, seq0=seq))
            ids.append(b.sample_id.numpy())
            seq += len(b)
            joiner.drain()
        joiner.drain()
        joiner.flush(day_end_ms(day))
    return {**joiner.metrics(), "ids": np.concatenate(ids), "joiner": joiner}
