"""Parallelize the teacher: TorchRec DMP shards the embedding collections, DeepSpeed ZeRO wraps the dense part.

Order: (1) attach the sparse optimizer to the embedding parameters (TorchRec fuses it into the backward of the
sharded tables), (2) shard `model.embed` with DistributedModelParallel under an explicit plan — DMP must not wrap
the dense part in DDP, DeepSpeed owns it —, (3) `deepspeed.initialize` on `model.dense` only.
On CPU/gloo the planner has no row-wise for us (DESIGN §5), so every sharding type goes through an explicit
per-table plan; column-wise needs the embedding width divisible by the world size.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

Sharding = Literal["table_wise", "column_wise", "row_wise"]
SPARSE_MODULES = ("embed.sparse.ebc", "embed.history.ec")


class DenseLeftAlone(DataParallelWrapper):
    """DMP's data-parallel wrapper that wraps nothing: DeepSpeed handles the dense parameters."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


def _tables(module: torch.nn.Module) -> list[tuple[str, int]]:
    configs = module.embedding_bag_configs() if hasattr(module, "embedding_bag_configs") else \
        module.embedding_configs()
    return [(c.name, c.embedding_dim) for c in configs]


def sharding_plan(model: torch.nn.Module, sharding: Sharding, world_size: int, device_type: str,
                  local_size: int | None = None) -> ShardingPlan:
    """An explicit plan for every table of the teacher's embedding collections. `local_size`: ranks per node
    (default: world_size, one node). TorchRec places rank r's shards on `<device_type>:(r % local_size)`, so
    across nodes it must be the ranks per node: with world_size, rank 9 of 2 nodes x 8 GPUs would ask for
    cuda:9."""
    local_size = local_size or world_size
    plans, i = {}, 0
    for path in SPARSE_MODULES:
        module = model.get_submodule(path)
        per_table = {}
        for name, dim in _tables(module):
            if sharding == "table_wise":
                per_table[name] = table_wise(rank=i % world_size)  # round-robin tables over ranks
                i += 1
            elif sharding == "column_wise":
                if dim % world_size:
                    raise ValueError(f"column_wise sharding of table {name}: embedding dim {dim} is not divisible "
                                     f"by world size {world_size} (set teacher.emb_dim)")
                per_table[name] = column_wise(ranks=list(range(world_size)))
            elif sharding == "row_wise":
                per_table[name] = row_wise()
            else:
                raise ValueError(f"unknown sharding {sharding!r}; allowed: table_wise, column_wise, row_wise")
        plans[path] = construct_module_sharding_plan(module, per_param_sharding=per_table, local_size=local_size,
                                                     world_size=world_size, device_type=device_type)
    return ShardingPlan(plans)


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether the DeepSpeed config moves the optimizer off the accelerator (ZeRO-Offload to CPU or NVMe)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def dense_adam(ds_config: dict, lr: float):  # noqa: ANN201 - params -> optimizer
    """The dense part's Adam for `ds_config`: torch's Adam, or DeepSpeed's vectorised host Adam when the optimizer
    is offloaded (DeepSpeed refuses a client torch optimizer under ZeRO-Offload: its step would run at plain
    torch speed on the host). adamw_mode=False: the same update as torch.optim.Adam (no weight decay here either
    way). DeepSpeedCPUAdam is JIT-built with g++ on first use (cached in TORCH_EXTENSIONS_DIR)."""
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return lambda params: DeepSpeedCPUAdam(params, lr=lr, adamw_mode=False)
    return lambda params: torch.optim.Adam(params, lr=lr)


def parallelize_teacher(model: torch.nn.Module, *, sharding: Sharding, device: torch.device, ds_config: dict,
                        dense_optimizer, sparse_optimizer=torch.optim.Adagrad,  # noqa: ANN001
                        sparse_kwargs: dict | None = None, local_size: int | None = None):  # noqa: ANN201
    """Shard `model.embed` with DMP and wrap `model.dense` with DeepSpeed; returns (dmp, engine).

    dense_optimizer: a callable params -> torch optimizer (DeepSpeed runs it under ZeRO; `ds_config` must allow
    an untested optimizer). sparse_optimizer / sparse_kwargs: fused into the sharded tables' backward.
    local_size: ranks per node (DistInfo.local_world_size; default: all ranks on one node), for shard placement.
    """
    import deepspeed

    apply_optimizer_in_backward(sparse_optimizer, model.embed.parameters(), sparse_kwargs or {"lr": 0.01})
    world = dist.get_world_size()
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device,
        plan=sharding_plan(model, sharding, world, device.type, local_size),
        sharders=[EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()],
        data_parallel_wrapper=DenseLeftAlone())
    dense = dmp.module.dense
    engine, _, _, _ = deepspeed.initialize(model=dense, optimizer=dense_optimizer(dense.parameters()),
                                           config=ds_config)
    return dmp, engine
