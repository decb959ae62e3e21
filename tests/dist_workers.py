"""Per-rank functions of multi-process tests. A module of its own (not a test file) so that spawned ranks can
import it by name: the parent puts tests/ on PYTHONPATH before spawning."""

import os
import socket
import time
import traceback
from pathlib import Path

import torch
from helpers import SCHEMA, make_batch

from recdistill.config import TeacherConfig
from recdistill.distill.losses import task_loss
from recdistill.models.teacher import TeacherModel

WORLD = 2
CFG = dict(history_len=20, merge_k=3, recent_k=4, d_model=16, num_tokens=4, longer_dim=8, emb_dim=4,
           embedding_backend="torchrec")
KINDS = {"ctr": "binary", "watch_time": "continuous"}
LR_DENSE, LR_SPARSE = 0.05, 0.1


def sparse_optimizer(name: str):  # noqa: ANN201 - (optimizer class, kwargs)
    """The tables' optimizer: plain SGD (its step is proportional to the gradient, so it also checks TorchRec's
    gradient division by the world size) or the trainer's RowWiseAdagrad (eps explicit: fbgemm's fused kernel and
    torchrec's optimizer class default to different ones)."""
    from torchrec.optim import RowWiseAdagrad

    if name == "sgd":
        return torch.optim.SGD, {"lr": LR_SPARSE}
    return RowWiseAdagrad, {"lr": LR_SPARSE, "eps": 1e-8}


def reference(global_batch, init, sparse: str = "sgd"):
    """The single-process step on the whole batch: SGD on the dense part, `sparse` (sparse_optimizer) on the tables,
    torchrec's unfused RowWiseAdagrad where the sharded run has fbgemm's fused one."""
    torch.manual_seed(0)
    model = TeacherModel(SCHEMA, TeacherConfig(**CFG))
    model.load_state_dict(init)
    before = model(global_batch)
    cls, kwargs = sparse_optimizer(sparse)
    opts = [torch.optim.SGD(model.dense.parameters(), lr=LR_DENSE), cls(model.embed.parameters(), **kwargs)]
    task_loss(before, global_batch.labels, KINDS).backward()
    for opt in opts:
        opt.step()
    with torch.no_grad():
        after = model(global_batch)
    return before, after, model


def rank_main(rank: int, port: int, init: dict, cases: list[tuple[str, dict]], out: dict) -> None:
    """One rank of a run of sharded steps: one gloo group, then each case of `cases` (name, step_case kwargs) in
    turn on a model of its own, its result in out[(name, rank)]. One group serves every case: the ranks' start-up
    (interpreter, torch, TorchRec, DeepSpeed imports) is paid once, not once per case. A case that raises records
    its traceback and ends the rank: the other rank may be inside a collective of that case, so later cases would
    not line up; they are left without a result."""
    name = None
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        from recdistill.train.distributed import destroy_distributed, init_distributed

        info = init_distributed("gloo")
        for name, kwargs in cases:
            out[(name, rank)] = step_case(rank, info, init, **kwargs)
        destroy_distributed()
    except Exception:  # noqa: BLE001 - reported to the parent with the traceback
        out[(name, rank)] = {"error": traceback.format_exc()}
        raise


def step_case(rank: int, info, init: dict, sharding: str, stage: int, bf16: bool = False,  # noqa: ANN001
              more_steps: int = 0, sparse: str = "sgd", meta: bool = False) -> dict:
    """One sharded step on this rank: logits before and after one step on its half of the global batch, and the
    dense parameters after it. bf16: DeepSpeed's bf16 mode (as teacher.precision=bf16 sets it). more_steps: then
    that many more steps on the same batch, their losses in ['losses']. meta: the trainer's construction
    (build_teacher: tables on meta, dense under zero.Init for ZeRO-3), `init` loaded into its partitions; the
    elements this rank holds right after construction and after sharding in ['numel']."""
    import deepspeed

    from recdistill.train.parallelize import parallelize_teacher

    torch.manual_seed(0)
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "bf16": {"enabled": bf16}}
    numel = {}
    if meta:
        model = built_and_loaded(ds, init, numel)
    else:
        model = TeacherModel(SCHEMA, TeacherConfig(**CFG))
        model.load_state_dict(init)
    cls, kwargs = sparse_optimizer(sparse)
    dmp, engine = parallelize_teacher(model, sharding=sharding, device=info.device, ds_config=ds,
                                      dense_optimizer=lambda p: torch.optim.SGD(p, lr=LR_DENSE),
                                      sparse_optimizer=cls, sparse_kwargs=kwargs)
    dmp.load_state_dict({k: v for k, v in init.items() if k.startswith("embed.")}, strict=False)
    full = make_batch(n=16, seed=5)
    local = full.select(torch.arange(rank * 8, rank * 8 + 8))
    logits = dmp(local)
    engine.backward(task_loss(logits, local.labels, KINDS))
    engine.step()
    with torch.no_grad():
        after = dmp(local)
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage == 3):
        dense = {n: p.detach().clone() for n, p in params.items()}
    losses = []
    for _ in range(more_steps):
        loss = task_loss(dmp(local), local.labels, KINDS)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    numel["embed_sharded"] = sum(
        sum(sh.tensor.numel() for sh in v.local_shards()) if hasattr(v, "local_shards") else v.numel()
        for k, v in dmp.state_dict().items() if k.startswith("embed."))
    return {"before": {k: v.detach() for k, v in logits.items()}, "after": after, "dense": dense,
            "losses": losses, "numel": numel}


def built_and_loaded(ds: dict, init: dict, numel: dict):  # noqa: ANN201 - TeacherModel
    """build_teacher's model with `init`'s dense values written into its partitions (rank 0's copy, then
    re-partitioned); records the elements held here after construction: dense (partitions under ZeRO-3; the full
    count in numel['dense_full']) and embedding (meta tables hold none)."""
    import deepspeed

    from recdistill.train.parallelize import build_teacher

    model = build_teacher(SCHEMA, TeacherConfig(**CFG), None, ds)
    params = dict(model.dense.named_parameters())
    local = lambda p: p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()  # noqa: E731
    numel.update(dense=sum(local(p) for p in params.values()),
                 dense_full=sum(getattr(p, "ds_numel", p.numel()) for p in params.values()),
                 embed=sum(p.numel() for p in model.embed.parameters() if not p.is_meta))
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=ds["zero_optimization"][
            "stage"] == 3), torch.no_grad():
        for name, p in params.items():
            p.copy_(init[f"dense.{name}"])
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_steps(cases: dict[str, dict], init: dict) -> dict[str, dict]:
    """Run every case of `cases` ({name: step_case kwargs}) on WORLD spawned gloo ranks, one after another in one
    process group. Returns {name: {rank: result}}; a case that did not finish on every rank instead maps to
    {"error": what each rank reported, with the ranks' exit codes} for its test to fail with."""
    import torch.multiprocessing as mp

    tests = str(Path(__file__).resolve().parent)  # spawned ranks import this module by name
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    # the Manager's server from the spawn context too: a forked one can inherit a lock some thread of this process
    # (pytest's, DeepSpeed's, an earlier test's) held at the fork and hang on it forever
    ctx, port = mp.get_context("spawn"), free_port()
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=rank_main, args=(r, port, init, list(cases.items()), out)) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 180 + 60 * len(cases)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        for p in procs:  # a rank still running past the deadline is hung (a collective the other left): end it
            if p.is_alive():
                p.kill()
                p.join()
        got = dict(out)
    codes = [p.exitcode for p in procs]
    results = {}
    for name in cases:
        ranks = [got.get((name, r)) for r in range(WORLD)]
        if all(v is not None and "error" not in v for v in ranks):
            results[name] = dict(enumerate(ranks))
        else:
            errors = [v["error"] if v else "no result (an earlier case failed, or the rank died)" for v in ranks]
            results[name] = {"error": f"rank exit codes {codes}: {errors}"}
    return results

