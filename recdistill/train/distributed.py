"""Process groups and devices. Launched by torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK set),
or as a single process (a one-rank gloo group, so the same sharded code path runs everywhere)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world_size: int = 1  # ranks on this node: TorchRec places rank r's shards on device r % local_world_size


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the default process group: NCCL with one GPU per local rank where CUDA exists, else gloo."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = local_world_size(world)
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local}") if cuda and backend == "nccl" else torch.device("cpu")
    if cuda and backend == "nccl":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world)
        else:  # a lone process: an in-memory store, no network; DeepSpeed still reads these variables
            for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
                os.environ.setdefault(k, v)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local, device=device,
                    backend=backend, local_world_size=local_world)


def local_world_size(world: int) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else the deepspeed launcher's LOCAL_SIZE, else `world`
    (one node). Exported as LOCAL_WORLD_SIZE when it was missing, so TorchRec's own look-up (comm.get_local_size,
    which otherwise guesses 8 and falls back to the world size) agrees with the plan."""
    value = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    if value < 1 or world % value:
        raise ValueError(f"LOCAL_WORLD_SIZE={value} must divide WORLD_SIZE={world} (the same ranks on every node)")
    if world > 1:  # a lone process (often a test inside pytest) leaves the environment alone
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(value))
    return value


def destroy_distributed() -> None:
    """Tear down the default group (safe to call twice), and DeepSpeed's cached groups with it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (deepspeed.utils.groups) on first use and never drops
    them: a second trainer in the same process, after a new init_process_group, would get the destroyed group
    ("Group ... is not registered", seen with two in-process teacher runs in one pytest session)."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUPS", "_GROUP_RANKS")) and name.isupper():
            setattr(groups, name, {} if isinstance(value, dict) else None)
