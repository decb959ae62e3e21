"""Parallelize the teacher: TorchRec DMP shards the embedding collections, DeepSpeed ZeRO wraps the dense part.

Order: (1) attach the sparse optimizer to the embedding parameters (TorchRec fuses it into the backward of the
sharded tables), (2) shard `model.embed` with DistributedModelParallel under an explicit plan — DMP must not wrap
the dense part in DDP, DeepSpeed owns it —, (3) `deepspeed.initialize` on `model.dense` only.
The explicit types (table_wise, column_wise, row_wise) go through an explicit per-table plan, which gives row-wise
on CPU/gloo too; column-wise needs the embedding width divisible by the world size. `auto` asks TorchRec's
EmbeddingShardingPlanner (table sizes against the memory of each rank), with per-table pins on top.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

Sharding = Literal["table_wise", "column_wise", "row_wise", "auto"]
SPARSE_MODULES = ("embed.sparse.ebc", "embed.history.ec")


class DenseLeftAlone(DataParallelWrapper):
    """DMP's data-parallel wrapper that wraps nothing: DeepSpeed handles the dense parameters."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        return None


class Unsharded(torch.nn.Module):
    """The teacher with plain PyTorch tables on one rank (embedding_backend=torch: a GPU host without TorchRec's
    CUDA kernels), wrapped as DMP wraps it: `module` is the model, calling it runs the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, batch):  # noqa: ANN001, ANN201 - Batch -> logits per task
        return self.module(batch)


def _tables(module: torch.nn.Module) -> list[tuple[str, int, list[str]]]:
    configs = module.embedding_bag_configs() if hasattr(module, "embedding_bag_configs") else \
        module.embedding_configs()
    return [(c.name, c.embedding_dim, list(c.feature_names)) for c in configs]


def _explicit(sharding: str, name: str, dim: int, world_size: int, rank: int):  # noqa: ANN202 - a plan generator
    if sharding == "table_wise":
        return table_wise(rank=rank)
    if sharding == "column_wise":
        if dim % world_size:
            raise ValueError(f"column_wise sharding of table {name}: embedding dim {dim} is not divisible "
                             f"by world size {world_size} (set teacher.emb_dim)")
        return column_wise(ranks=list(range(world_size)))
    if sharding == "row_wise":
        return row_wise()
    raise ValueError(f"unknown sharding {sharding!r}; allowed: table_wise, column_wise, row_wise, auto")


def sharding_plan(model: torch.nn.Module, sharding: Sharding, world_size: int, device_type: str,
                  local_size: int | None = None, pins: dict[str, str] | None = None,
                  mem_gib: float | None = None, pg: dist.ProcessGroup | None = None) -> ShardingPlan:
    """A plan for every table of the teacher's embedding collections (the model may be on the meta device).

    sharding: one explicit type for every table (table-wise goes round-robin over the ranks), or `auto`
    (planned_shardings). pins: {table or feature name: type}, applied on top of either. `local_size`: ranks per
    node (default: world_size, one node). TorchRec places rank r's shards on `<device_type>:(r % local_size)`, so
    across nodes it must be the ranks per node: with world_size, rank 9 of 2 nodes x 8 GPUs would ask for cuda:9.
    mem_gib / pg: for `auto` (see planned_shardings)."""
    local_size = local_size or world_size
    pins = dict(pins or {})
    planned = planned_shardings(model, world_size, device_type, local_size, pins, mem_gib, pg) \
        if sharding == "auto" else {}
    plans, i = {}, 0
    for path in SPARSE_MODULES:
        module = model.get_submodule(path)
        per_table = {}
        for name, dim, features in _tables(module):
            pin = next((pins.pop(k) for k in [name, *features] if k in pins), None)
            if pin is None and sharding == "auto":
                per_table[name] = planned[path][name]
                continue
            per_table[name] = _explicit(pin or sharding, name, dim, world_size, i % world_size)
            i += 1  # round-robin: the next table-wise table goes to the next rank
        plans[path] = construct_module_sharding_plan(module, per_param_sharding=per_table, local_size=local_size,
                                                     world_size=world_size, device_type=device_type)
    if pins:
        raise ValueError(f"teacher.sharding_pins names no table or feature: {sorted(pins)}")
    return ShardingPlan(plans)


def planned_shardings(model: torch.nn.Module, world_size: int, device_type: str, local_size: int,
                      pins: dict[str, str], mem_gib: float | None = None,
                      pg: dist.ProcessGroup | None = None) -> dict[str, dict]:
    """TorchRec's EmbeddingShardingPlanner over a Topology of `world_size` ranks with `mem_gib` of memory each
    (HBM on CUDA, DDR on CPU; default: the device's own memory on CUDA, TorchRec's default on CPU); returns
    {module path: {table: plan generator}} for sharding_plan. With a process group, rank 0 plans and broadcasts
    (every rank must shard the same way).

    Allowed types: the planner may also pick data_parallel for small tables, but DMP's fused optimizer does not
    update those (DESIGN §5) and DenseLeftAlone leaves them unsynchronised, so it is never offered. On CPU the
    planner's row-wise (and table-row-wise) plans are GPU-only (DESIGN §5): it gets table-wise and column-wise;
    row-wise on CPU stays available as an explicit type or a pin (applied by sharding_plan)."""
    types = ["table_wise", "column_wise"] + (["row_wise", "table_row_wise"] if device_type == "cuda" else [])
    constraints = {}
    for path in SPARSE_MODULES:
        for name, _, features in _tables(model.get_submodule(path)):
            pin = next((pins[k] for k in [name, *features] if k in pins), None)
            constraints[name] = ParameterConstraints(sharding_types=[pin] if pin in types else types)
    mem = int(mem_gib * 1024**3) if mem_gib else None
    if mem is None and device_type == "cuda" and torch.cuda.is_available():
        mem = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    caps = {"hbm_cap": mem} if device_type == "cuda" else {"ddr_cap": mem}
    topology = Topology(world_size=world_size, compute_device=device_type, local_world_size=local_size,
                        **{k: v for k, v in caps.items() if v})
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    sharders = [EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()]
    plan = planner.collective_plan(model, sharders, pg) if pg is not None else planner.plan(model, sharders)
    out: dict[str, dict] = {}
    for path in SPARSE_MODULES:
        for name, ps in plan.plan[path].items():
            out.setdefault(path, {})[name] = _as_generator(ps, world_size, local_size)
    return out


def _as_generator(ps: ParameterSharding, world_size: int, local_size: int):  # noqa: ANN202 - a plan generator
    """The planner's choice for one table as one of TorchRec's plan generators, so that pins and explicit types
    build the same way (construct_module_sharding_plan) and placement follows `local_size`."""
    from torchrec.distributed.sharding_plan import table_row_wise

    ranks = list(ps.ranks or range(world_size))
    if ps.sharding_type == "table_wise":
        return table_wise(rank=ranks[0], compute_kernel=ps.compute_kernel)
    if ps.sharding_type == "column_wise":
        sizes = [s.shard_sizes[1] for s in ps.sharding_spec.shards]
        return column_wise(ranks=ranks, size_per_rank=sizes, compute_kernel=ps.compute_kernel)
    if ps.sharding_type == "row_wise":
        return row_wise(compute_kernel=ps.compute_kernel)
    if ps.sharding_type == "table_row_wise":
        return table_row_wise(host_index=ranks[0] // local_size)
    raise ValueError(f"the planner chose {ps.sharding_type} for a table; not supported here")


def describe_plan(model: torch.nn.Module, plan: ShardingPlan) -> list[dict]:
    """One row per table: name, rows, dim, sharding type, and (rank, (rows, cols)) per shard."""
    out = []
    for path in SPARSE_MODULES:
        module = model.get_submodule(path)
        configs = module.embedding_bag_configs() if hasattr(module, "embedding_bag_configs") else \
            module.embedding_configs()
        for c in configs:
            ps = plan.plan[path][c.name]
            shards = [(s.placement.rank(), tuple(s.shard_sizes)) for s in ps.sharding_spec.shards]
            out.append({"table": c.name, "rows": c.num_embeddings, "dim": c.embedding_dim,
                        "type": ps.sharding_type, "shards": shards})
    return out


def build_teacher(schema, cfg, roles, ds_config: dict) -> torch.nn.Module:  # noqa: ANN001 - Schema, TeacherConfig, Roles
    """The TeacherModel without a full copy of it on any rank: the TorchRec tables on the meta device (DMP then
    allocates and initialises only this rank's shards), the dense part under `deepspeed.zero.Init` for ZeRO-3 (each
    module's parameters are partitioned as soon as the module is built: a rank holds its 1/N, plus one module whole
    while it is built). ZeRO-1/2 keep every dense parameter on every rank anyway, so there it is built as before.
    The model code stays single-device: its two parts are rebuilt here, the meta-device model gives the layout."""
    import deepspeed

    from recdistill.models.teacher import TeacherDense, TeacherEmbeddings, TeacherModel

    with torch.device("meta"):
        model = TeacherModel(schema, cfg, roles)
    if cfg.embedding_backend == "torch":  # plain tables, trained whole on one rank: built for real
        model.embed = TeacherEmbeddings(schema, cfg, model.roles)
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero3):
        model.dense = TeacherDense(schema, cfg, model.roles)
    return model


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
                        sparse_kwargs: dict | None = None, local_size: int | None = None,
                        pins: dict[str, str] | None = None, mem_gib: float | None = None):  # noqa: ANN201
    """Shard `model.embed` with DMP and wrap `model.dense` with DeepSpeed; returns (dmp, engine).

    dense_optimizer: a callable params -> torch optimizer (DeepSpeed runs it under ZeRO; `ds_config` must allow
    an untested optimizer). sparse_optimizer / sparse_kwargs: fused into the sharded tables' backward.
    local_size: ranks per node (DistInfo.local_world_size; default: all ranks on one node), for shard placement.
    pins / mem_gib: per-table sharding types and, for sharding=auto, the planner's memory per rank (sharding_plan).
    """
    import deepspeed

    apply_optimizer_in_backward(sparse_optimizer, model.embed.parameters(), sparse_kwargs or {"lr": 0.01})
    world = dist.get_world_size()
    if not hasattr(model.embed.sparse, "ebc"):  # embedding_backend=torch: plain tables, nothing for DMP to shard
        if world > 1:
            raise ValueError("teacher.embedding_backend=torch trains on one rank only: its tables are neither "
                             "sharded nor synchronised across ranks (use torchrec for several)")
        model.embed.to(device)
        engine, _, _, _ = deepspeed.initialize(model=model.dense, optimizer=dense_optimizer(model.dense.parameters()),
                                               config=ds_config)
        return Unsharded(model), engine
    plan = sharding_plan(model, sharding, world, device.type, local_size, pins, mem_gib, dist.GroupMember.WORLD)
    # Meta-device tables (build_teacher) are initialised shard by shard on their ranks; under the one seed that all
    # ranks share, every row-wise shard would start with the same values, so each rank draws from its own stream.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(torch.initial_seed() + 1 + dist.get_rank())
        dmp = DistributedModelParallel(
            model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device, plan=plan,
            sharders=[EmbeddingBagCollectionSharder(), EmbeddingCollectionSharder()],
            data_parallel_wrapper=DenseLeftAlone())
    dense = dmp.module.dense
    engine, _, _, _ = deepspeed.initialize(model=dense, optimizer=dense_optimizer(dense.parameters()),
                                           config=ds_config)
    return dmp, engine
