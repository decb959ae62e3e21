"""Teacher checkpoints: DeepSpeed for the dense part, torch.distributed.checkpoint for the sharded tables.

Layout (one directory per checkpoint, zero-padded step so names sort; STYLE 'Checkpoints')::

    {checkpoint_dir}/step=000000123/dense/...        engine.save_checkpoint (ZeRO partitions, per rank)
    {checkpoint_dir}/step=000000123/sparse/...       DCP: the DMP-sharded tables *and* the fused in-backward
                                                     optimizer state (RowWiseAdagrad momentum), as ShardedTensors
    {checkpoint_dir}/step=000000123/rank{r}.json     per rank: data position (real batches consumed,
                                                     loader exhausted), valid samples trained, RNG state
    {checkpoint_dir}/step=000000123/meta.json        written last, atomically, by rank 0 after a barrier: a
                                                     directory without it is incomplete and never loaded
    {checkpoint_dir}/latest                          'step=000000123', replaced (atomically) after meta.json

The trainer checkpoints right after a signal window is committed and flushed (SignalWriter docstring). The data
position is per rank, not "steps done": ranks step together, but a rank that has run out forwards filler batches
while others still train, so each rank records the real batches it took from its (deterministic) loader and
whether it is exhausted; a resumed rank skips exactly that many batches, and the writer's first window is the
uncommitted one, rewritten from its start. Resume is refused when the config digest or
the world size differ (the signal store's teacher version is the digest; each rank's data position depends on the
world size).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

META, LATEST, DENSE, SPARSE = "meta.json", "latest", "dense", "sparse"
PREFIX = "step="
SPARSE_PREFIX = "embed."  # DMP state-dict keys of the sharded part; the dense keys belong to DeepSpeed
# Complete checkpoints kept (older ones are deleted once a newer one is complete): the newest, plus one in case
# the newest turns out unreadable. No config field for it yet (TeacherConfig is not this module's to change).
KEEP = 2


def step_name(step: int) -> str:
    """Directory name of the checkpoint after `step` steps: 'step=000000123'."""
    return f"{PREFIX}{step:09d}"


def _atomic_write_text(path: Path, text: str) -> None:
    """Temp file + rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories (with meta.json) under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and (d / META).is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint. The `latest` pointer is for people and tools; scanning for meta.json is
    what decides, so a crash between meta.json and the pointer update loses nothing."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _sparse_state(dmp: torch.nn.Module) -> dict[str, Any]:
    """What DCP saves / loads in place: the sharded tables and the fused optimizer's state (both ShardedTensors,
    each rank holding its shards)."""
    model = {k: v for k, v in dmp.state_dict().items() if k.startswith(SPARSE_PREFIX)}
    return {"model": model, "optim": dmp.fused_optimizer.state_dict()}


def _rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def _set_rng_state(state: dict[str, str]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def save_checkpoint(root: str | Path, *, step: int, dmp: torch.nn.Module, engine: Any, group: dist.ProcessGroup,
                    meta: dict[str, Any], rank_state: dict[str, Any], keep: int = KEEP) -> Path:
    """Collective (every rank calls it at the same step): save dense, sparse, per-rank state, then meta.json and
    the `latest` pointer, then delete all but the newest `keep` complete checkpoints. `meta` (rank 0's is
    written): run-level facts (step, last committed window, digest); `rank_state`: this rank's own (data position,
    samples trained); the RNG state is added here."""
    rank = dist.get_rank()
    d = Path(root) / step_name(step)
    if rank == 0 and d.exists() and not (d / META).is_file():
        shutil.rmtree(d)  # an interrupted earlier attempt at the same step: start clean
    dist.barrier(group=group)
    t0 = time.perf_counter()
    # DeepSpeed writes its own 'latest' tag file unless told not to; ours is the only pointer.
    engine.save_checkpoint(str(d), tag=DENSE, save_latest=False)
    dcp.save(_sparse_state(dmp), checkpoint_id=str(d / SPARSE))
    _atomic_write_text(d / f"rank{rank}.json", json.dumps({**rank_state, "rng": _rng_state()}))
    dist.barrier(group=group)  # every rank's files are on disk before meta.json vouches for them
    if rank == 0:
        full = {**meta, "step": step, "world_size": dist.get_world_size(), "time": time.time(),
                "save_s": time.perf_counter() - t0}
        _atomic_write_text(d / META, json.dumps(full, indent=1))
        _atomic_write_text(Path(root) / LATEST, d.name + "\n")
        prune(root, keep=keep)
    dist.barrier(group=group)
    return d


def prune(root: str | Path, keep: int = KEEP) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest complete
    one (left by a crash while saving); returns what was deleted. Rank 0 only, after `latest` moved on."""
    if keep < 1:
        raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
    complete = complete_checkpoints(root)
    if not complete:
        return []
    newest = int(complete[-1].name[len(PREFIX):])
    doomed = complete[:-keep] + [d for d in Path(root).iterdir() if d.is_dir() and d.name.startswith(PREFIX)
                                 and not (d / META).is_file() and int(d.name[len(PREFIX):]) < newest]
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed


def load_checkpoint(path: str | Path, *, dmp: torch.nn.Module, engine: Any, digest: str) -> tuple[dict, dict]:
    """Collective: load a complete checkpoint into `dmp` (tables + fused optimizer) and `engine` (dense weights,
    optimizer); restores this rank's RNG. Returns (meta, this rank's state). Refuses another config digest or
    world size with a message naming both."""
    d = Path(path)
    meta = json.loads((d / META).read_text())
    world = dist.get_world_size()
    if meta.get("digest") != digest:
        raise RuntimeError(f"checkpoint {d}: written by config digest {meta.get('digest')}, this run's is {digest}; "
                           "resume with the same config (or set teacher.resume=false / another checkpoint_dir)")
    if meta.get("world_size") != world:
        raise RuntimeError(f"checkpoint {d}: written by {meta.get('world_size')} ranks, this run has {world} "
                           "(each rank's data position depends on the world size)")
    load_path, _ = engine.load_checkpoint(str(d), tag=DENSE, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"checkpoint {d}: DeepSpeed found no dense checkpoint under {d / DENSE}")
    state = _sparse_state(dmp)
    dcp.load(state, checkpoint_id=str(d / SPARSE))  # fills the current state's shards in place
    # load_state_dict as well: the state-dict tensors need not alias the fused kernels' storage.
    dmp.load_state_dict(state["model"], strict=False)
    dmp.fused_optimizer.load_state_dict(state["optim"])
    rank_state = json.loads((d / f"rank{dist.get_rank()}.json").read_text())
    _set_rng_state(rank_state.pop("rng"))
    return meta, rank_state
