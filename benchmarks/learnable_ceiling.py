"""How high can any model trained on the teacher's rows get? The learnable ceiling of each synthetic world (issue 20).

    python benchmarks/learnable_ceiling.py                        # every synthetic world of configs/worlds/
    python benchmarks/learnable_ceiling.py --only pairwise,large_vocab
    python benchmarks/learnable_ceiling.py --quick --only pairwise   # tiny data: checks the script

The Bayes-optimal AUC of the suite's tables scores the world's own probabilities, which use latent state no model
sees (each user's latent interests and which one is active today, today's popularity walk). What a model can reach
from finite rows is lower, and the gap between the suite's models and the Bayes column says nothing about how much
of it is learnable. This script fits the model that knows the world's functional form exactly, a logistic
regression whose terms are the click logit's parts (recdistill/data/world.py) written in what a row shows:

* one weight per item, tag, category, context id and traffic source (item quality, tags, the popularities' means);
* per-day item and category terms under the AR(1) prior of the popularity walk (the walk's own persistence RHO),
  carried into the evaluation day as RHO times the last training day's;
* one weight per cell of user segment x item segment x context slot and per pair of those fields;
* the dense features linearly and their exact product sin(2 x0) x1;
* the probability that the candidate's category is one of the user's latent interests, as log-odds: from its count
  in the visible window under the world's own mixing shares (the Bayes rule, not a learnt function), from how often
  the user's other training rows (impressions) are of that category (a share of candidates comes from the
  interests: the same rule, with a fitted scale), and a learnt term per (user, category) for what the user's labels
  add; and the category's share of the last 8 events.

Fitted on the teacher's training rows (its view, its training days), L2 strengths chosen on the last training day
(fitted on the days before it), then refitted on every training day; scored on the evaluation day, unsampled, as
every model of the suite. No generic learner is told this form, so its AUC is what a model could reach at this data
size (a practical ceiling: a better fitting procedure or prior could do somewhat better, so it is an estimate from
below), and the distance from the best baseline to it is about what any teacher can gain over the baselines. CTR
only (the suite's teacher target is on CTR). The teacher and baseline columns come from the suite's result JSONs
(`--suite`). Result: JSON + PNG (benchmarks/results/learnable_ceiling-<cpu>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import RESULTS, cpu_name  # noqa: E402
from benchmarks.paper_tables import fmt, save, subplots  # noqa: E402
from benchmarks.robustness import DEMO, QUICK, WORLDS, world_names  # noqa: E402
from recdistill.config import load_config  # noqa: E402
from recdistill.data.source import build_source, phase_days, read_view  # noqa: E402
from recdistill.data.world import (  # noqa: E402
    FROM_INTERESTS,
    NUM_CONTEXT,
    NUM_INTERESTS,
    NUM_SEGMENTS,
    NUM_SLOTS,
    NUM_TAGS,
    RECENT,
    RHO,
    SyntheticWorld,
)
from recdistill.distill.debias import to_true  # noqa: E402
from recdistill.distill.metrics import auc, ne  # noqa: E402
from recdistill.models.match import MATCH_WINDOWS, target_match  # noqa: E402
from recdistill.report import markdown_table  # noqa: E402

#: L2 strengths tried (static terms x per-day drift terms), chosen on the last training day.
L2_GRID = ((3.0, 3.0), (3.0, 10.0), (10.0, 3.0), (10.0, 10.0), (30.0, 10.0), (30.0, 30.0))
#: The suite's results (teacher, baselines per world), newest last: a world's entry in a later file wins.
SUITE = ("robustness-amd-epyc.json",)
#: L-BFGS iterations per fit (a --quick run's numbers mean nothing; it checks the script in seconds).
MAX_ITER, QUICK_MAX_ITER = 500, 60
#: L2 of the per-(user, category) membership log-odds: weak, a log-odds moves by units.
USER_CAT_L2 = 1.0
MAX_TAGS = 3  # the world gives an item 1-3 tags
READ_ROWS = 8192
#: Worlds whose data is not the synthetic world's (no functional form to fit).
NOT_SYNTHETIC = ("movielens",)


def log(msg: str) -> None:
    print(f"[learnable_ceiling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def world_config(world: str, quick: bool, overrides: list[str]):  # noqa: ANN201 - a recdistill Config
    """The resolved config of one world of the suite, as benchmarks/robustness.py runs it. parquet_byo is the
    synthetic world written as Parquet under other names: its rows are the same, so the world itself is read."""
    sets = [*(QUICK if quick else []), *overrides]
    if world == "parquet_byo":
        sets = ["data.source=synthetic", "data.roles={}", *sets]
    # the form has its own impression term: no counting features among the dense ones it weighs linearly
    return load_config([DEMO, WORLDS / f"{world}.yaml"], [*sets, "data.counts=false"])


def window_rows(world: SyntheticWorld, day: int, view, history_len: int) -> dict[str, np.ndarray]:  # noqa: ANN001
    """What the ceiling model reads of the rows of `day` kept by `view` (None: all): sparse ids, the tags (up to
    3, with a mask), dense features, the label, and the target-match statistics of the last `history_len` events
    (the teacher's own `target_match`): the candidate category's count, the window's length, its share of the last
    RECENT events."""
    assert MATCH_WINDOWS[0] == RECENT  # the first match window is the world's recent part
    w = world.w
    cols: dict[str, list[np.ndarray]] = {}
    for start in range(0, world.num_rows(day), READ_ROWS):
        b = read_view(world, day, start, min(start + READ_ROWS, world.num_rows(day)), view)
        if not len(b):
            continue
        ids = {k: b.sparse[k].values().numpy() for k in ("user_id", "item_id", "item_cat", "user_segment",
                                                          "item_segment", "context", "context_slot", "traffic_source")}
        tag_len, tag_val = b.sparse["item_tags"].lengths().numpy(), b.sparse["item_tags"].values().numpy()
        tag_start = np.cumsum(tag_len) - tag_len
        tags = np.stack([tag_val[tag_start + np.minimum(i, tag_len - 1)] for i in range(MAX_TAGS)], 1)
        hist = b.history.last(history_len)
        # columns: share / log1p(count) over the last 8, 64 and all events, then log1p(length)
        m = target_match(b.sparse["item_cat"].values(), hist.fields["cat"], hist.offsets).numpy().astype(np.float64)
        dense = b.dense.numpy().astype(np.float64)
        got = {**ids, "tags": tags, "tag_mask": np.arange(MAX_TAGS)[None, :] < tag_len[:, None],
               "count": np.rint(np.expm1(m[:, 5])), "length": np.rint(np.expm1(m[:, 6])), "recent": m[:, 0],
               "dense": dense, "label": b.labels["ctr"].numpy().astype(np.float64),
               "p_true": b.p_true["ctr"].numpy().astype(np.float64), "day": np.full(len(b), day)}
        if w.num_dense >= 2:
            got["dense_product"] = np.sin(2.0 * dense[:, 0]) * dense[:, 1]
        for k, v in got.items():
            cols.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in cols.items()}


def interest_llr(rows: dict[str, np.ndarray], world: SyntheticWorld) -> np.ndarray:
    """Log likelihood ratio of "the candidate's category is one of the user's interests" from its count in the
    window: an interest category is drawn with p1 = interest_share / 3 + noise share per event, any other with p0."""
    w = world.w
    p0 = (1.0 - w.interest_share) / w.num_categories
    p1 = p0 + w.interest_share / NUM_INTERESTS
    c, n = rows["count"], rows["length"]
    return c * np.log(p1 / p0) + (n - c) * np.log((1.0 - p1) / (1.0 - p0))


def candidate_llr(world: SyntheticWorld, fit_rows: dict[str, np.ndarray], other: dict[str, np.ndarray]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Log likelihood ratio of the same membership from how often the user's candidates (impressions) in `fit_rows`
    are of this category: a share FROM_INTERESTS of candidates come from one of the 3 interests, the rest spread over
    the categories (uniformly, to first order). For `fit_rows` from the user's other rows (its own left out), for
    `other` from all of `fit_rows`."""
    w = world.w
    c = w.num_categories
    p0 = (1.0 - FROM_INTERESTS) / c
    p1 = p0 + FROM_INTERESTS / NUM_INTERESTS
    pair = np.bincount(fit_rows["user_id"] * c + fit_rows["item_cat"], minlength=w.num_users * c)
    per_user = np.bincount(fit_rows["user_id"], minlength=w.num_users)

    def llr(rows: dict[str, np.ndarray], own: int) -> np.ndarray:
        n = pair[rows["user_id"] * c + rows["item_cat"]] - own
        total = per_user[rows["user_id"]] - own
        return n * np.log(p1 / p0) + (total - n) * np.log((1.0 - p1) / (1.0 - p0))

    return llr(fit_rows, 1), llr(other, 0)


class WellSpecified(torch.nn.Module):
    """The world's click logit with every learnable part a parameter (see the module docstring)."""

    def __init__(self, world: SyntheticWorld, num_days: int) -> None:
        super().__init__()
        w = world.w
        self.num_days = num_days

        def zeros(n: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

        self.item, self.tag, self.cat = zeros(w.num_items), zeros(NUM_TAGS), zeros(w.num_categories)
        self.context, self.traffic = zeros(NUM_CONTEXT), zeros(w.num_traffic)
        self.item_day, self.cat_day = zeros(w.num_items * num_days), zeros(w.num_categories * num_days)
        s, k = NUM_SEGMENTS, NUM_SLOTS
        self.cell3, self.us_is, self.us_slot, self.is_slot = zeros(s * s * k), zeros(s * s), zeros(s * k), zeros(s * k)
        self.dense = zeros(w.num_dense)
        # per (user, category): what the user's own rows and labels add to the history's evidence of an interest
        self.user_cat = zeros(w.num_users * w.num_categories)
        self.num_categories = w.num_categories
        # [dense product, interest posterior, recent share, interest prior log-odds, constant, candidate evidence];
        # the interest's scale and the candidates' evidence start at the form's own 1, not 0: the sigmoid makes the
        # fit non-convex, and from 0 L-BFGS can settle in the mirrored basin (a negative scale on flipped evidence)
        self.scalars = zeros(6)
        with torch.no_grad():
            self.scalars[1] = self.scalars[5] = 1.0

    def static_params(self) -> list[torch.Tensor]:
        return [self.item, self.tag, self.cat, self.context, self.cell3, self.us_is, self.us_slot, self.is_slot]

    def forward(self, x: dict[str, torch.Tensor], drift_day: torch.Tensor, rho: float = 1.0) -> torch.Tensor:
        """Click logit of rows `x`, with the per-day terms of `drift_day` scaled by `rho` (1 on a training day's own
        rows; RHO ** k for a day k days after the last one fitted)."""
        item, cat, us, is_, slot = x["item_id"], x["item_cat"], x["user_segment"], x["item_segment"], x["context_slot"]
        s, k, nd = NUM_SEGMENTS, NUM_SLOTS, self.num_days
        z = self.scalars[4] + self.item[item] + self.cat[cat] + self.context[x["context"]]
        z = z + self.traffic[x["traffic_source"]] + (self.tag[x["tags"]] * x["tag_mask"]).sum(1)
        z = z + rho * (self.item_day[item * nd + drift_day] + self.cat_day[cat * nd + drift_day])
        z = z + self.cell3[(us * s + is_) * k + slot] + self.us_is[us * s + is_] + self.us_slot[us * k + slot]
        z = z + self.is_slot[is_ * k + slot] + x["dense"] @ self.dense
        if "dense_product" in x:
            z = z + self.scalars[0] * x["dense_product"]
        evidence = x["llr"] + self.scalars[3] + self.scalars[5] * x["cand_llr"]
        evidence = evidence + self.user_cat[x["user_id"] * self.num_categories + cat]
        return z + self.scalars[1] * torch.sigmoid(evidence) + self.scalars[2] * x["recent"]

    def penalty(self, l2: float, l2_day: float) -> torch.Tensor:
        """L2 on the static terms (USER_CAT_L2 on the per-(user, category) log-odds); on the per-day terms the AR(1)
        walk's Gaussian prior (stationary start, then innovations e_d - RHO e_(d-1)), up to the strength."""
        static = sum((p**2).sum() for p in self.static_params())
        walk = torch.zeros((), dtype=torch.float64)
        for table in (self.item_day, self.cat_day):
            e = table.view(-1, self.num_days)
            walk = walk + (1 - RHO**2) * (e[:, 0] ** 2).sum() + ((e[:, 1:] - RHO * e[:, :-1]) ** 2).sum()
        return l2 * static + USER_CAT_L2 * (self.user_cat**2).sum() + l2_day * walk


def as_tensors(rows: dict[str, np.ndarray], world: SyntheticWorld) -> dict[str, torch.Tensor]:
    x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rows.items()}
    x["llr"] = torch.from_numpy(interest_llr(rows, world))
    x["tag_mask"] = x["tag_mask"].to(torch.float64)
    return x


def fit(world: SyntheticWorld, rows: dict[str, np.ndarray], num_days: int, l2: float, l2_day: float,
        max_iter: int = MAX_ITER) -> WellSpecified:
    """Maximum penalised likelihood (full-batch L-BFGS) on `rows`."""
    x, model = as_tensors(rows, world), WellSpecified(world, num_days)
    n = len(rows["label"])
    opt = torch.optim.LBFGS(model.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_change=1e-12, tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = model(x, x["day"])
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, x["label"], reduction="sum")
                + model.penalty(l2, l2_day)) / n
        loss.backward()
        return loss

    opt.step(closure)
    return model


def score(model: WellSpecified, world: SyntheticWorld, rows: dict[str, np.ndarray], last_day: int, view) -> np.ndarray:  # noqa: ANN001
    """True-space click probabilities of `rows` (a later day than `last_day`): the drift terms carried forward by
    RHO per day, the logit mapped out of the fitted rows' sampled view (debias.to_true)."""
    x = as_tensors(rows, world)
    ahead = int(rows["day"][0]) - last_day
    with torch.no_grad():
        z = model(x, torch.full_like(x["day"], last_day), rho=RHO**ahead)
        return torch.sigmoid(to_true(z, view, x["traffic_source"], world.w.num_traffic)).numpy()


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def ceiling(world_name: str, quick: bool, overrides: list[str]) -> dict:
    """Fit and score the well-specified model on one world; returns its AUC and NE with what they came from."""
    t0 = time.time()
    cfg = world_config(world_name, quick, overrides)
    world = build_source(cfg.data)
    if not isinstance(world, SyntheticWorld):
        raise ValueError(f"{world_name}: data.source {cfg.data.source!r} has no known functional form")
    view, history_len = cfg.sampling.teacher, cfg.teacher.history_len
    train_days, eval_days, _ = phase_days(world.days(), cfg.data.eval_days, cfg.stream.days)  # the teacher's days
    eval_day = eval_days[0]
    if len(train_days) < 2:
        raise ValueError(f"{world_name}: the L2 choice needs 2 training days, the config has {train_days}")
    train = [window_rows(world, d, view, history_len) for d in train_days]
    evals = window_rows(world, eval_day, None, history_len)
    read_s = time.time() - t0
    num_days = len(train_days)
    held, max_iter = {}, QUICK_MAX_ITER if quick else MAX_ITER
    fit_rows, held_rows = concat(train[:-1]), dict(train[-1])
    fit_rows["cand_llr"], held_rows["cand_llr"] = candidate_llr(world, fit_rows, held_rows)
    for l2, l2_day in L2_GRID:
        m = fit(world, fit_rows, num_days, l2, l2_day, max_iter)
        p = score(m, world, held_rows, train_days[-2], view)
        held[l2, l2_day] = auc(torch.from_numpy(held_rows["label"]), torch.from_numpy(p))
        log(f"{world_name}: l2 {l2:g} / drift {l2_day:g}: held-out day {train_days[-1]} AUC {held[l2, l2_day]:.4f}")
    l2, l2_day = max(held, key=held.get)
    fit_rows = concat(train)
    fit_rows["cand_llr"], evals["cand_llr"] = candidate_llr(world, fit_rows, evals)
    model = fit(world, fit_rows, num_days, l2, l2_day, max_iter)
    p = score(model, world, evals, train_days[-1], view)
    y = torch.from_numpy(evals["label"])
    out = {
        "auc": auc(y, torch.from_numpy(p)), "ne": ne(y, torch.from_numpy(p)),
        "bayes_auc": auc(y, torch.from_numpy(evals["p_true"])),
        "l2": l2, "l2_drift": l2_day, "held_out_auc": {f"{a:g}/{b:g}": v for (a, b), v in held.items()},
        "train_rows": int(sum(len(t["label"]) for t in train)),
        "eval_rows": len(evals["label"]), "eval_day": eval_day,
        "fitted": {"dense_product": model.scalars[0].item(), "interest": model.scalars[1].item(),
                   "recent": model.scalars[2].item(), "candidate_evidence": model.scalars[5].item()},
        "read_s": read_s, "wall_s": time.time() - t0,
    }
    log(f"{world_name}: ceiling AUC {out['auc']:.4f} (Bayes {out['bayes_auc']:.4f}), {out['wall_s']:.0f} s")
    return out


def suite_results(files: list[Path]) -> dict[str, dict]:
    """world -> its CTR AUCs in the suite (teacher, baselines, students) from the robustness result JSONs."""
    got: dict[str, dict] = {}
    for f in files:
        for name, entry in json.loads(f.read_text()).get("worlds", {}).items():
            ctr = ((entry.get("result") or {}).get("tasks") or {}).get("ctr")
            if ctr:
                got[name] = {"auc": ctr["auc"], "bayes_auc": ctr.get("bayes_auc"), "from": f.name}
    return got


def compare(world: str, ceil: dict, suite: dict | None) -> dict:
    """The ceiling beside the suite's models: headroom over the best baseline, and whether the issue's target
    (teacher >= best baseline + 0.01) is reachable below the ceiling at all."""
    row = {"world": world, "ceiling": ceil["auc"], "bayes": ceil["bayes_auc"]}
    if suite is None:
        return row
    a = suite["auc"]
    best = max(a.get("baseline_lr", float("-inf")), a.get("baseline_gbdt", float("-inf")))
    row |= {"teacher": a.get("teacher"), "best_baseline": best, "headroom": ceil["auc"] - best,
            "teacher_share_of_headroom": (a["teacher"] - best) / (ceil["auc"] - best)
            if a.get("teacher") is not None and ceil["auc"] > best else None,
            "target_reachable": ceil["auc"] >= best + 0.01,
            "suite_bayes_matches": suite.get("bayes_auc") is not None
            and abs(suite["bayes_auc"] - ceil["bayes_auc"]) < 1e-4}
    return row


def plot(rows: list[dict]):  # noqa: ANN201 - a matplotlib Figure
    fig, ax = subplots(figsize=(9, 4.2))
    y = np.arange(len(rows))
    marks = (("best_baseline", "best baseline", "s", "tab:gray"), ("teacher", "teacher", "o", "tab:blue"),
             ("ceiling", "well-specified model (learnable ceiling)", "D", "tab:green"),
             ("bayes", "Bayes (latent state)", "|", "black"))
    for key, label, m, c in marks:
        xs = [r.get(key) for r in rows]
        ax.scatter([v for v in xs if v is not None], [yy for yy, v in zip(y, xs, strict=True) if v is not None],
                   marker=m, color=c, label=label, zorder=3)
    tgt = [(r["best_baseline"] + 0.01, yy) for r, yy in zip(rows, y, strict=True) if r.get("best_baseline")]
    if tgt:
        ax.scatter(*zip(*tgt, strict=True), marker=">", color="tab:red", label="target: best baseline + 0.01",
                   zorder=2)
    ax.set_yticks(y, [r["world"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("next-day CTR AUC (held-out day, unsampled)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("What the teacher's rows allow: the learnable ceiling per world")
    return fig


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated worlds (default: every synthetic world)")
    p.add_argument("--quick", action="store_true", help="the suite's tiny sizes: checks the script, not a result")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every world")
    p.add_argument("--suite", action="append", default=None, metavar="JSON",
                   help=f"robustness result JSONs to compare with (default: {', '.join(SUITE)} in benchmarks/results)")
    p.add_argument("--out", default=None, help="result JSON (default benchmarks/results/learnable_ceiling-<cpu>.json)")
    p.add_argument("--reuse", default=None, metavar="JSON", help="take each world's fitted ceiling from this earlier "
                   "result instead of fitting again (minutes instead of 44): compares it with a newer suite run")
    args = p.parse_args(argv)
    known = [w for w in world_names() if w not in NOT_SYNTHETIC]
    worlds = args.only.split(",") if args.only else known
    unknown = [w for w in worlds if w not in known]
    if unknown:
        p.error(f"--only: {unknown} is not a synthetic world of {WORLDS} (these are: {', '.join(known)})")
    if args.suite:
        files = [Path(f) for f in args.suite]
    else:  # a quick run's ceilings are of other sizes than the suite's runs
        files = [] if args.quick else [RESULTS / f for f in SUITE if (RESULTS / f).exists()]
    suite = suite_results(files)
    reused = json.loads(Path(args.reuse).read_text())["worlds"] if args.reuse else {}
    missing = [w for w in worlds if w not in reused] if args.reuse else []
    if missing:
        p.error(f"--reuse {args.reuse}: no fitted ceiling of {missing} in it (it has {', '.join(reused)})")
    per_world, rows = {}, []
    for name in worlds:
        per_world[name] = reused[name] if args.reuse else ceiling(name, args.quick, args.set)
        rows.append(compare(name, per_world[name], suite.get(name)))
    table = markdown_table([{"world": r["world"], "Bayes": fmt(r["bayes"]),
                             "best baseline": fmt(r.get("best_baseline")), "teacher": fmt(r.get("teacher")),
                             "learnable ceiling": fmt(r["ceiling"]),
                             "headroom over baseline": fmt(r.get("headroom"), "+.4f"),
                             "teacher's share of it": fmt(r.get("teacher_share_of_headroom"), ".0%"),
                             "+0.01 reachable": {True: "yes", False: "no", None: "-"}[r.get("target_reachable")]}
                            for r in rows])
    print(table)
    res = {"bench": "learnable_ceiling", "quick": args.quick, "machine": cpu_name(), "date": time.strftime("%Y-%m-%d"),
           "command": "python benchmarks/learnable_ceiling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "torch": torch.__version__, "numpy": np.__version__, "l2_grid": L2_GRID,
           "suite_files": [f.name for f in files], "reused_ceilings": args.reuse, "worlds": per_world, "table": rows,
           "markdown": table}
    return save("learnable_ceiling", res, args.quick, args.out, plot(rows))


if __name__ == "__main__":
    main()
