"""Student checkpoints: one device, plain PyTorch, written whole or not at all.

Layout (step numbers zero-padded, as the teacher's: recdistill/train/checkpoint.py):

    {checkpoint_dir}/step=000000123/model.pt     the StudentModel's state_dict
    {checkpoint_dir}/step=000000123/optim.pt     the Adam state
    {checkpoint_dir}/step=000000123/state.json   phase, data position (epoch + loader Position) or stream consumer
                                                 state, steps, samples, signal counts, auto-beta averages, RNG
    {checkpoint_dir}/step=000000123/dedup.npz    the streaming student's DuplicateFilter window (streaming only)
    {checkpoint_dir}/step=000000123/meta.json    step, digest, time
    {checkpoint_dir}/latest                      'step=000000123', for people and tools

Atomicity: every file is written into `{checkpoint_dir}/.tmp-<uuid>/` and the directory is then renamed to its
step name, so a `step=` directory is complete by construction; a crash leaves at most a `.tmp-` directory, which
is ignored and swept by the next save. A `step=` directory without meta.json (made by hand, or by a file system
without atomic directory renames) is ignored as well. Resume is refused when the student digest differs (another
data order or model would make the saved position or weights meaningless); the streaming phase starts from a
batch-phase checkpoint through `init_from`, which takes the weights and optimizer only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recdistill.config import Config
from recdistill.train.checkpoint import LATEST, META, PREFIX, complete_checkpoints, latest_checkpoint, step_name

MODEL, OPTIM, STATE, DEDUP = "model.pt", "optim.pt", "state.json", "dedup.npz"
TMP_PREFIX = ".tmp-"
# Student fields that change neither what is learned nor the data order: a run may change them and resume.
_NOT_IN_DIGEST = {"checkpoint_dir", "checkpoint_every", "checkpoint_keep", "resume", "log_every", "export", "device",
                  "epochs", "signals_uri"}


def student_digest(cfg: Config) -> str:
    """Hash of what a student checkpoint's weights and position depend on: data, the student's view, the student
    section (less paths, logging and the number of epochs: a longer run continues a shorter one)."""
    tree = {"data": cfg.data.model_dump(mode="json"), "sampling": cfg.sampling.student.model_dump(mode="json"),
            "student": cfg.student.model_dump(mode="json", exclude=_NOT_IN_DIGEST)}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def _rng_state() -> str:
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def _set_rng_state(s: str) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8))


def save(root: str | Path, *, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
         digest: str, dedup: dict[str, np.ndarray] | None = None, files: dict[str, bytes] | None = None,
         keep: int = 2) -> Path:
    """Write the checkpoint after `step` steps (tmp dir, then rename), point `latest` at it, keep the newest `keep`
    complete ones, sweep leftover tmp dirs. `state` must be JSON-able; the RNG state is added here; `files`: more
    files by name (the streaming student's polled-but-untrained rows)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / MODEL)
    torch.save(opt.state_dict(), tmp / OPTIM)
    (tmp / STATE).write_text(json.dumps({**state, "rng": _rng_state()}))
    if dedup is not None:
        np.savez(tmp / DEDUP, **dedup)
    for name, data in (files or {}).items():
        (tmp / name).write_bytes(data)
    (tmp / META).write_text(json.dumps({"step": step, "digest": digest, "time": time.time()}, indent=1))
    for f in tmp.iterdir():  # the data is on disk before the rename makes the directory visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # an incomplete directory of the same step (no atomic rename there), or a re-save
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / f"{LATEST}.{uuid.uuid4().hex}"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = complete_checkpoints(root)
    for d in complete[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    newest_step = step_of(complete[-1])
    for d in root.iterdir():
        if not d.is_dir():
            continue
        # a crash mid-save (one writer per directory), or an incomplete step dir older than the newest complete one
        if d.name.startswith(TMP_PREFIX) or (d.name.startswith(PREFIX) and not (d / META).is_file()
                                             and step_of(d) < newest_step):
            shutil.rmtree(d, ignore_errors=True)


def newest(root: str | Path | None) -> Path | None:
    """The newest complete checkpoint under `root` (None if none, or no root)."""
    return latest_checkpoint(root) if root else None


def load(path: str | Path, *, model: torch.nn.Module, opt: torch.optim.Optimizer | None, digest: str | None
         ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Load weights (and the optimizer unless None) in place; restore the RNG. Returns (state, dedup arrays or None).
    `digest` None skips the check (a streaming student starting from a batch checkpoint)."""
    d = Path(path)
    meta = json.loads((d / META).read_text())
    if digest is not None and meta.get("digest") != digest:
        raise RuntimeError(f"student checkpoint {d}: written by student digest {meta.get('digest')}, this run's is "
                           f"{digest}; resume with the same data and student settings (or set student.resume=false "
                           "or another student.checkpoint_dir)")
    model.load_state_dict(torch.load(d / MODEL, map_location="cpu", weights_only=True))
    if opt is not None:
        opt.load_state_dict(torch.load(d / OPTIM, map_location="cpu", weights_only=True))
    state = json.loads((d / STATE).read_text())
    _set_rng_state(state.pop("rng"))
    dedup = None
    if (d / DEDUP).is_file():
        with np.load(d / DEDUP) as z:
            dedup = {k: z[k] for k in z.files}
    return state, dedup


def step_of(path: Path) -> int:
    """The step a checkpoint directory holds."""
    return int(path.name[len(PREFIX):])
