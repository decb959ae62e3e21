"""Can a dense model learn the synthetic world's high-order interaction in one pass at demo scale? (issue 4)

The teacher-scaling benchmark finds that no teacher, of any dense size, follows the world's `cell` component (a
random effect per user segment x item segment x context slot with every one- and two-field part removed, sd 0.70
logit: the largest single part of the click logit) — its capture coefficient is 0.00 for all of them. This script
separates capacity from learnability on exactly the demo's data (the teacher's view of days 0-6, r=0.5; scored on
day 7, unsampled; the world's real click labels), with small in-process models trained one pass, batch 128, Adam:

* inputs `cell_fields`: embeddings of the three fields the cell is made of, nothing else;
* inputs `id_fields`: those plus user id, item id, category and the full context id (what the teacher also has);
* models: TokenMixer-Large (the teacher's dense block) at two sizes and a plain ReLU MLP.

    python benchmarks/interaction_learnability.py            # ~5 min on 2 CPU cores
    python benchmarks/interaction_learnability.py --quick    # 2 days, one model per input set

For each run: the correlation of the model's logit with the true cell on the evaluation day and its AUC.
Result: results/interaction_learnability-<cpu>.json; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import cpu_name, write_result  # benchmarks/ is sys.path[0] when run as a script

from recdistill.config import load_config
from recdistill.data.sampling import keep_mask
from recdistill.data.world import NUM_CONTEXT, NUM_SEGMENTS, NUM_SLOTS, SyntheticWorld
from recdistill.distill.metrics import auc
from recdistill.models.tokenmixer import TokenMixerLarge

ROOT = Path(__file__).resolve().parents[1]
SLOT = NUM_CONTEXT // NUM_SLOTS
INPUTS = {"cell_fields": ["useg", "iseg", "slot"], "id_fields": ["useg", "iseg", "slot", "user", "item", "cat",
                                                                 "context"]}


def fields(w: SyntheticWorld, day: int, n: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """(field ids, click label, traffic, true cell value) of every row of `day`."""
    x = w._samples(day, 0, n)
    f = {"useg": x["useg"], "iseg": x["iseg"], "slot": x["context"] // SLOT, "user": x["user"], "item": x["item"],
         "cat": x["cat"], "context": x["context"]}
    return f, x["label_ctr"], x["traffic"], w.cells[x["useg"], x["iseg"], x["context"] // SLOT]


class Model(torch.nn.Module):
    """Embeddings of the chosen fields (TorchRec's default init, as the teacher's tables) -> a dense block -> logit."""

    def __init__(self, sizes: dict[str, int], kind: str, width: int, layers: int, emb: int = 16) -> None:
        super().__init__()
        self.names = list(sizes)
        self.emb = torch.nn.ModuleDict({k: torch.nn.Embedding(n, emb) for k, n in sizes.items()})
        for k, e in self.emb.items():
            torch.nn.init.uniform_(e.weight, -sizes[k] ** -0.5, sizes[k] ** -0.5)
        n_in = emb * len(sizes)
        if kind == "tokenmixer":
            self.body = TokenMixerLarge(n_in, tokens=8, dim=width, ffn_mult=2, layers=layers)
        else:
            mods = [torch.nn.Linear(n_in, width), torch.nn.ReLU()]
            for _ in range(layers - 1):
                mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.body = torch.nn.Sequential(*mods)
        self.kind = kind
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.body(torch.cat([self.emb[k](x[k]) for k in self.names], 1))
        return self.head(h.mean(1) if self.kind == "tokenmixer" else h).squeeze(-1)


def train(model: Model, data: dict[str, torch.Tensor], y: torch.Tensor, epochs: int, bs: int, lr: float) -> int:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model({k: v[idx] for k, v in data.items()}),
                                                                        y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # small models: a second thread buys little, and leaves a core to a neighbour
    cfg = load_config(args.config, ["data.num_days=3"] if args.quick else [])
    w = SyntheticWorld(cfg.data)
    n, train_days = cfg.data.samples_per_day, range(cfg.data.num_days - cfg.data.eval_days)
    view, nt = cfg.sampling.teacher, w.w.num_traffic
    parts = []
    for day in train_days:
        f, y, traffic, _ = fields(w, day, n)
        sid = (np.int64(day) << np.int64(40)) | np.arange(n, dtype=np.int64)
        keep = keep_mask(sid, y > 0, traffic, view, nt)  # the teacher's view, as BatchLoader applies it
        parts.append(({k: v[keep] for k, v in f.items()}, y[keep]))
    tr = {k: torch.from_numpy(np.concatenate([p_[0][k] for p_ in parts])) for k in parts[0][0]}
    ytr = torch.from_numpy(np.concatenate([p_[1] for p_ in parts]).astype(np.float32))
    fe, ye, _, cell_e = fields(w, cfg.data.num_days - 1, n)
    ev = {k: torch.from_numpy(v) for k, v in fe.items()}
    sizes = {"useg": NUM_SEGMENTS, "iseg": NUM_SEGMENTS, "slot": NUM_SLOTS, "user": w.w.num_users,
             "item": w.w.num_items, "cat": w.w.num_categories, "context": NUM_CONTEXT}
    runs = [("cell_fields", "tokenmixer", 64, 2, 1), ("cell_fields", "tokenmixer", 128, 3, 1),
            ("cell_fields", "mlp", 256, 2, 1), ("cell_fields", "tokenmixer", 64, 2, 4),
            ("id_fields", "tokenmixer", 64, 2, 1), ("id_fields", "tokenmixer", 128, 3, 1),
            ("id_fields", "mlp", 256, 2, 1), ("id_fields", "tokenmixer", 64, 2, 4)]
    if args.quick:
        runs = [("cell_fields", "tokenmixer", 32, 1, 1), ("id_fields", "tokenmixer", 32, 1, 1)]
    t_start, rows = time.perf_counter(), []
    for inputs, kind, width, layers, epochs in runs:
        torch.manual_seed(0)
        model = Model({k: sizes[k] for k in INPUTS[inputs]}, kind, width, layers)
        t0 = time.perf_counter()
        steps = train(model, {k: tr[k] for k in INPUTS[inputs]}, ytr, epochs, bs=128, lr=3e-3)
        with torch.no_grad():
            z = model({k: ev[k] for k in INPUTS[inputs]}).numpy()
        row = {"inputs": inputs, "model": kind, "width": width, "layers": layers, "epochs": epochs, "steps": steps,
               "dense_params": sum(q.numel() for q in model.body.parameters()),
               "corr_logit_cell": float(np.corrcoef(z, cell_e)[0, 1]),
               "auc_ctr": auc(torch.from_numpy(ye), torch.from_numpy(z)),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {inputs:11s} {kind:10s} {width}x{layers} epochs={epochs}: "
              f"corr(logit, cell) {row['corr_logit_cell']:.3f}, auc {row['auc_ctr']:.4f} ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    res = {"bench": "interaction_learnability", "quick": args.quick, "device": cpu_name(),
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": time.perf_counter() - t_start,
           "command": " ".join(["python", "benchmarks/interaction_learnability.py", *sys.argv[1:]]),
           "config": args.config, "train_rows": len(ytr), "eval_rows": len(ye), "batch_size": 128, "lr": 3e-3,
           "cell_sd_logit": float(0.7 * cfg.data.world.interactions * cell_e.std()), "runs": rows}
    path = write_result("interaction_learnability", res, args.quick, args.out)
    print(json_line(path, rows))


def json_line(path: Path, rows: list[dict]) -> str:
    import json

    return json.dumps({"result": str(path), "corr": {f"{r['inputs']}/{r['model']}{r['width']}x{r['layers']}"
                                                     f"/ep{r['epochs']}": round(r["corr_logit_cell"], 3)
                                                     for r in rows}})


if __name__ == "__main__":
    main()
