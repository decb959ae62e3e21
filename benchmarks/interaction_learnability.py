"""Can a dense model learn the synthetic world's high-order interaction in one pass at demo scale, and at which
learning rate? (issue 4)

The teacher-scaling benchmark found that no teacher, at one dense learning rate for every size, follows the world's
`cell` component (a random effect per user segment x item segment x context slot with every one- and two-field
part removed, sd 0.70 logit: the largest single part of the click logit), and that the larger teacher was no
better. This script separates capacity, learnability and optimisation on exactly the demo's data (the teacher's
view of days 0-6, r=0.5; scored on day 7, unsampled; the world's real click labels), with small in-process models
trained one pass, batch 128, the teacher's optimisers (Adam on the dense block, Adagrad lr 0.05 on the tables):

* inputs `cell_fields`: embeddings of the three fields the cell is made of, nothing else;
* inputs `id_fields`: those plus user id, item id, category and the full context id (what the teacher also has);
* models: TokenMixer-Large (the teacher's dense block) at three sizes and a plain ReLU MLP; `crowded`: the same
  TokenMixer with 672 zero inputs after the features, as wide as LONGER's outputs in the demo teacher, so the
  features fill ~1.2 of its 8 tokens as they do there; `grouped`: that input with the features in 6 tokens of
  their own (teacher.feature_tokens);
* the dense learning rate swept per size (3e-3, the demo teacher's, down to 1e-4).

    python benchmarks/interaction_learnability.py            # ~10 min on 2 CPU cores
    python benchmarks/interaction_learnability.py --quick    # 3 days, two runs

For each run: the correlation of the model's logit with the true cell on the evaluation day and its AUC, and per
size the best learning rate (chosen on the evaluation day itself: this is a diagnostic, not a held-out score).
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
from recdistill.data.world import SyntheticWorld
from recdistill.distill.metrics import auc
from recdistill.models.teacher import TeacherDense
from recdistill.models.tokenmixer import TokenMixerLarge

ROOT = Path(__file__).resolve().parents[1]
TABLE_LR = 0.05  # teacher.sparse_lr (the fused row-wise Adagrad on the teacher's tables)
INPUTS = {"cell_fields": ["useg", "iseg", "slot"], "id_fields": ["useg", "iseg", "slot", "user", "item", "cat",
                                                                 "context"],
          # what the teacher had before the world emitted the slot: the cell's third field only through `context`
          "id_fields_no_slot": ["useg", "iseg", "user", "item", "cat", "context"]}


# the harness's short field names -> the world's sample arrays and the schema's feature names (for cardinalities)
FIELDS = {"useg": "user_segment", "iseg": "item_segment", "slot": "context_slot", "user": "user_id",
          "item": "item_id", "cat": "item_cat", "context": "context"}


def fields(w: SyntheticWorld, day: int, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(field ids, every per-sample array of the world: labels, traffic, sample ids, ...) of the rows of `day`."""
    x = w._samples(day, np.arange(n, dtype=np.int64))
    return {k: x[k] for k in FIELDS}, x


class Model(torch.nn.Module):
    """Embeddings of the chosen fields (TorchRec's default init, as the teacher's tables) -> a dense block -> logit."""

    def __init__(self, sizes: dict[str, int], kind: str, width: int, layers: int, emb: int = 16,
                 crowd: int = 0) -> None:
        super().__init__()
        self.names = list(sizes)
        self.emb = torch.nn.ModuleDict({k: torch.nn.Embedding(n, emb) for k, n in sizes.items()})
        for k, e in self.emb.items():
            torch.nn.init.uniform_(e.weight, -sizes[k] ** -0.5, sizes[k] ** -0.5)
        n_in = emb * len(sizes)
        # crowded / grouped: `crowd` zero inputs appended, as wide as LONGER's outputs in the teacher's mixer input
        # (they carry nothing here, so all that changes is where the features sit): chunked evenly, the features
        # land in ~1.2 of the 8 tokens (as in the teacher); grouped, they keep 6 tokens of their own.
        self.crowd = crowd if kind in ("crowded", "grouped") else 0
        if kind != "mlp":
            self.body = TokenMixerLarge(n_in + self.crowd, tokens=8, dim=width, ffn_mult=2, layers=layers,
                                        groups=[(n_in, 6), (self.crowd, 2)] if kind == "grouped" else None)
        else:
            mods = [torch.nn.Linear(n_in, width), torch.nn.ReLU()]
            for _ in range(layers - 1):
                mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
            self.body = torch.nn.Sequential(*mods)
        self.kind = kind
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        e = torch.cat([self.emb[k](x[k]) for k in self.names], 1)
        h = self.body(torch.cat([e, e.new_zeros(e.shape[0], self.crowd)], 1) if self.crowd else e)
        return self.head(h if self.kind == "mlp" else h.mean(1)).squeeze(-1)


def train(model: Model, data: dict[str, torch.Tensor], y: torch.Tensor, epochs: int, bs: int, lr: float) -> int:
    """`epochs` passes; Adam(lr) on the dense block and head, Adagrad(TABLE_LR) on the tables (as the teacher)."""
    opts = [torch.optim.Adagrad(model.emb.parameters(), lr=TABLE_LR),
            torch.optim.Adam([*model.body.parameters(), *model.head.parameters()], lr=lr)]
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), bs):
            idx = perm[i:i + bs]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model({k: v[idx] for k, v in data.items()}),
                                                                        y[idx])
            for opt in opts:
                opt.zero_grad()
            loss.backward()
            for opt in opts:
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
    # The question here is the pure three-way cell at its original strength (the world's defaults); the demo world
    # now has a stronger, pairwise form.
    pure = ["data.world.interaction_heredity=0.0", "data.world.interactions=1.0"]
    cfg = load_config(args.config, pure + (["data.num_days=3"] if args.quick else []))
    w = SyntheticWorld(cfg.data)
    n, train_days = cfg.data.samples_per_day, range(cfg.data.num_days - cfg.data.eval_days)
    view, nt = cfg.sampling.teacher, w.w.num_traffic
    parts = []
    for day in train_days:
        f, x = fields(w, day, n)
        keep = keep_mask(x["sid"], x["label_ctr"] > 0, x["traffic"], view, nt)  # the teacher's view, as BatchLoader
        parts.append(({k: v[keep] for k, v in f.items()}, x["label_ctr"][keep]))
    tr = {k: torch.from_numpy(np.concatenate([p_[0][k] for p_ in parts])) for k in parts[0][0]}
    ytr = torch.from_numpy(np.concatenate([p_[1] for p_ in parts]).astype(np.float32))
    eval_day = cfg.data.num_days - 1
    fe, xe = fields(w, eval_day, n)
    ye, cell_e = xe["label_ctr"], w.ctr_components(eval_day, xe)["cell"]  # the cell's part of the true click logit
    ev = {k: torch.from_numpy(v) for k, v in fe.items()}
    sizes = {k: w.schema.sparse[name] for k, name in FIELDS.items()}
    # the zero block of `crowded` / `grouped`: as wide as LONGER's outputs in this config's teacher mixer input
    crowd = TeacherDense(w.schema, cfg.teacher).n_seq
    lrs = (3e-3, 1e-3, 3e-4, 1e-4)  # 3e-3: the demo teacher's dense lr
    runs = [("cell_fields", "tokenmixer", 64, 2, 1, 3e-3), ("cell_fields", "mlp", 256, 2, 1, 3e-3),
            *[("id_fields", "tokenmixer", w_, n_, 1, lr) for w_, n_ in ((32, 1), (64, 2), (128, 3)) for lr in lrs],
            *[("id_fields_no_slot", "tokenmixer", w_, n_, 1, lr) for w_, n_, lr in ((32, 1, 1e-3), (64, 2, 1e-3),
                                                                                   (64, 2, 3e-4), (128, 3, 3e-4))],
            *[("id_fields", layout, w_, n_, 1, 1e-3) for layout in ("crowded", "grouped") for w_, n_ in ((32, 1),
                                                                                                       (64, 2))]]
    if args.quick:
        runs = [("cell_fields", "tokenmixer", 32, 1, 1, 3e-3), ("id_fields", "tokenmixer", 32, 1, 1, 1e-3),
                ("id_fields", "grouped", 32, 1, 1, 1e-3)]
    t_start, rows = time.perf_counter(), []
    for inputs, kind, width, layers, epochs, lr in runs:
        torch.manual_seed(0)
        model = Model({k: sizes[k] for k in INPUTS[inputs]}, kind, width, layers, crowd=crowd)
        t0 = time.perf_counter()
        steps = train(model, {k: tr[k] for k in INPUTS[inputs]}, ytr, epochs, bs=128, lr=lr)
        with torch.no_grad():
            z = model({k: ev[k] for k in INPUTS[inputs]}).numpy()
        row = {"inputs": inputs, "model": kind, "width": width, "layers": layers, "epochs": epochs, "lr": lr,
               "steps": steps,
               "dense_params": sum(q.numel() for q in model.body.parameters()),
               "corr_logit_cell": float(np.corrcoef(z, cell_e)[0, 1]),
               "auc_ctr": auc(torch.from_numpy(ye), torch.from_numpy(z)),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(f"[{time.strftime('%H:%M:%S')}] {inputs:11s} {kind:10s} {width}x{layers} epochs={epochs} lr={lr:g}: "
              f"corr(logit, cell) {row['corr_logit_cell']:.3f}, auc {row['auc_ctr']:.4f} ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
    res = {"bench": "interaction_learnability", "quick": args.quick, "device": cpu_name(),
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
           "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": time.perf_counter() - t_start,
           "command": " ".join(["python", "benchmarks/interaction_learnability.py", *sys.argv[1:]]),
           "config": args.config, "train_rows": len(ytr), "eval_rows": len(ye), "batch_size": 128, "table_lr": TABLE_LR,
           "cell_sd_logit": float(cell_e.std()), "crowd_inputs": crowd, "runs": rows,
           "best_lr": best_lr(rows)}
    path = write_result("interaction_learnability", res, args.quick, args.out)
    print(json_line(path, rows))


def best_lr(rows: list[dict]) -> dict[str, dict]:
    """Per id_fields TokenMixer size: the lr of the highest AUC, that AUC and cell correlation, and the AUC at 3e-3."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["inputs"] != "id_fields" or r["model"] != "tokenmixer":
            continue
        key = f"{r['width']}x{r['layers']}"
        cur = out.setdefault(key, {"dense_params": r["dense_params"], "auc_at_3e-3": None, "lr": None, "auc": -1.0})
        if r["lr"] == 3e-3:
            cur["auc_at_3e-3"] = r["auc_ctr"]
        if r["auc_ctr"] > cur["auc"]:
            cur.update(lr=r["lr"], auc=r["auc_ctr"], corr_logit_cell=r["corr_logit_cell"])
    return out


def json_line(path: Path, rows: list[dict]) -> str:
    import json

    return json.dumps({"result": str(path), "best_lr": best_lr(rows),
                       "corr": {f"{r['inputs']}/{r['model']}{r['width']}x{r['layers']}/lr{r['lr']:g}":
                                round(r["corr_logit_cell"], 3) for r in rows}})


if __name__ == "__main__":
    main()
