"""The synthetic world: the default data, with a known ground truth (DESIGN §4 'Synthetic world').

Every sample is a pure function of (seed, sample_id), computed with counter hashes (no RNG state), so any chunk
of any day can be generated independently, in any order, on any rank. sample_id = day << 40 | index.

The generative process, and why each part is there:

* **Users and their timelines.** User u has a consistent event timeline: event j is a function of (seed, u, j).
  A sample of u at some point of day d sees the window of u's last L events before its timeline position, which
  grows day by day; users differ in how long their timelines are (log-normal: some hundreds of events, many
  thousands, up to 20K). Two samples of the same user share their older events, as in real logs.
* **Long-range interests (sequence length matters).** Each user has three latent long-term interest categories.
  Only a small share of history events (`interest_share`, ~8%) come from them; the rest are noise from all
  categories. Whether the candidate's category is an interest moves the click logit strongly, but telling the
  interests apart from noise takes thousands of events: the last 64 carry ~2 interest events each.
* **Short-range context.** The most recent events' category also matters a little (session intent), so a model
  that sees only recent history is not useless.
* **Low-order effects.** Item quality, traffic source, context slot and a few dense features each add to the
  logit; an additive model over ids learns them.
* **High-order interactions (capacity matters).** A random effect per cell of (user segment x item segment x
  context slot): invisible to additive models, learnable by models that cross features.
* **Drift (streaming matters).** Category and item popularity follow random walks over days, and which of a
  user's interests is "active" (strongest) changes day by day; a model fit on an early day loses AUC later.
* **Traffic sources** have different base rates (and get different positive keep-rates in the default views).
* **Tasks.** ctr: click ~ Bernoulli(p_ctr). cvr: conversion per impression, click x Bernoulli(p_cvr|click), so
  p_true = p_ctr * p_cvr|click. watch_time: click x LogNormal(mu(x), 0.5), p_true = its expectation.
"""

from __future__ import annotations

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.batch import Batch, History, Schema, TaskSpec, offsets_from_lengths
from recdistill.data.sampling import hash_uniform, splitmix64

KNOWN_TASKS = {"ctr": "binary", "cvr": "binary", "watch_time": "continuous"}
SPARSE = ("user_id", "item_id", "item_cat", "user_segment", "item_segment", "context")
NUM_SEGMENTS, NUM_CONTEXT, NUM_ACTIONS, NUM_INTERESTS = 8, 24, 4, 3
_BIT32 = np.uint64(32)


def _u(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    return hash_uniform(ids, seed, salt)


def _normal(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Standard normal per id (Box-Muller on two independent hashes)."""
    u1 = np.maximum(_u(ids, seed, salt), 1e-12)
    u2 = _u(ids, seed, salt + 7919)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _key(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """One uint64 key for a pair of non-negative ints (a < 2^31, b < 2^32)."""
    return (np.asarray(a).astype(np.uint64) << _BIT32) | np.asarray(b).astype(np.uint64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """DataSource over the synthetic world (see module docstring); configured by DataConfig / WorldConfig."""

    sampling = None  # the population itself, unsampled

    def __init__(self, data_cfg) -> None:  # noqa: ANN001 - DataConfig
        w = data_cfg.world
        bad = [t.name for t in data_cfg.tasks if t.name not in KNOWN_TASKS or KNOWN_TASKS[t.name] != t.kind]
        if bad:
            raise ValueError(f"data.tasks: the synthetic world has no task {bad} (it knows "
                             f"{', '.join(f'{k} ({v})' for k, v in KNOWN_TASKS.items())})")
        self.cfg, self.w, self.seed = data_cfg, w, data_cfg.seed
        self.tasks = [t.name for t in data_cfg.tasks]
        c = w.num_categories
        self.schema = Schema(
            tasks=tuple(TaskSpec(t.name, t.kind) for t in data_cfg.tasks),
            dense=tuple(f"x{i}" for i in range(w.num_dense)),
            sparse={"user_id": w.num_users, "item_id": w.num_items, "item_cat": c, "user_segment": NUM_SEGMENTS,
                    "item_segment": NUM_SEGMENTS, "context": NUM_CONTEXT},
            history={"item": w.num_items, "cat": c, "action": NUM_ACTIONS, "ts": 2**62},
            num_traffic=w.num_traffic, max_history=data_cfg.history_len)
        # Small tables (per category / traffic / interaction cell) are drawn once from the seed.
        rng = np.random.default_rng([self.seed, 0xC0FFEE])
        days = data_cfg.num_days
        self.cat_pop = np.cumsum(rng.normal(0, w.drift, (days, c)), axis=0) + rng.normal(0, 0.3, c)
        self.traffic_bias = np.linspace(0.4, -0.8, w.num_traffic) if w.num_traffic > 1 else np.zeros(1)
        self.traffic_p = np.cumsum(np.linspace(2.0, 1.0, w.num_traffic) / np.linspace(2.0, 1.0, w.num_traffic).sum())
        self.cells = rng.normal(0, 1.0, (NUM_SEGMENTS, NUM_SEGMENTS, NUM_CONTEXT // 6))
        self.context_bias = rng.normal(0, 0.3, NUM_CONTEXT)
        self.dense_w = rng.normal(0, 0.25, w.num_dense)
        self.base = -3.8  # puts the CTR base rate near 9-10%
        self._event_salt = int(splitmix64(np.uint64((self.seed * 0x9E37 + 0xE7E7) & 0xFFFFFFFF)))

    # ---- entities ------------------------------------------------------------------------------------------
    def item_cat(self, item: np.ndarray) -> np.ndarray:
        return item % self.w.num_categories

    def interests(self, user: np.ndarray) -> np.ndarray:
        """[B, 3] latent long-term interest categories of each user."""
        k = np.arange(NUM_INTERESTS)
        return (_u(_key(user[:, None], k[None, :]), self.seed, 11) * self.w.num_categories).astype(np.int64)

    def timeline_pos(self, user: np.ndarray, day: np.ndarray, sid: np.ndarray) -> np.ndarray:
        """Events of the user before this sample: a log-normal start (many thousands for many users) plus a
        per-user daily rate; the position within the day comes from the sample."""
        start = np.exp(np.log(1500.0) + 1.2 * _normal(user.astype(np.uint64), self.seed, 12))
        start = np.clip(start, 20, 19_000).astype(np.int64)
        rate = 20 + (_u(user.astype(np.uint64), self.seed, 13) * 80).astype(np.int64)
        return start + day * rate + (_u(sid, self.seed, 14) * rate).astype(np.int64)

    def events(self, user: np.ndarray, j: np.ndarray, interests: np.ndarray, row: np.ndarray) -> dict[str, np.ndarray]:
        """History event j of user user[e] for each event e (row[e]: its sample, whose interests are
        interests[row[e]]): item, cat, action, ts.

        Hot path (up to 20K events per sample): one 64-bit hash per event, cut into 16/16/16/8/8-bit fields for
        the independent draws, instead of one hash per draw.
        """
        h = splitmix64(_key(user, j) ^ np.uint64(self._event_salt))
        m16, m8 = np.uint64(0xFFFF), np.uint64(0xFF)
        from_interest = (h & m16).astype(np.int64) < int(self.w.interest_share * 65536)
        noise_cat = ((h >> np.uint64(16)) & m16).astype(np.int64) * self.w.num_categories >> 16
        slot = ((h >> np.uint64(32)) & m16).astype(np.int64)
        pick = ((h >> np.uint64(48)) & m8).astype(np.int64) * NUM_INTERESTS >> 8
        act = (h >> np.uint64(56)).astype(np.int64)
        cat = np.where(from_interest, interests.ravel()[row * NUM_INTERESTS + pick], noise_cat)
        per_cat = max(self.w.num_items // self.w.num_categories, 1)
        item = np.minimum(cat + self.w.num_categories * (slot * per_cat >> 16), self.w.num_items - 1)
        # interest events are mostly engaged actions (1-3), noise events mostly views (0-1)
        action = np.where(from_interest, 1 + act * 3 // 256, act * 2 // 256)
        ts = 1_600_000_000 + j * 600 + (user % 600)
        return {"item": item, "cat": self.item_cat(item), "action": action, "ts": ts}

    # ---- DataSource ----------------------------------------------------------------------------------------
    def days(self) -> list[int]:
        return list(range(self.cfg.num_days))

    def num_rows(self, day: int) -> int:
        return self.cfg.samples_per_day

    def read(self, day: int, start: int, stop: int) -> Batch:
        """Samples with index in [start, stop) of `day`."""
        if not (0 <= day < self.cfg.num_days) or not (0 <= start <= stop <= self.cfg.samples_per_day):
            raise ValueError(f"rows [{start}, {stop}) of day {day} are outside the world "
                             f"({self.cfg.num_days} days x {self.cfg.samples_per_day} samples)")
        w, s = self.w, self.seed
        idx = np.arange(start, stop, dtype=np.int64)
        sid = (np.int64(day) << np.int64(40)) | idx
        usid = sid.astype(np.uint64)
        n = len(idx)
        days = np.full(n, day, dtype=np.int64)
        user = (_u(usid, s, 1) ** 1.3 * w.num_users).astype(np.int64)  # mildly skewed activity
        interests = self.interests(user)
        traffic = np.searchsorted(self.traffic_p, _u(usid, s, 2), side="right").clip(max=w.num_traffic - 1)
        # candidate: from the user's interests some of the time (retrieval works), else popularity-skewed
        per_cat = max(w.num_items // w.num_categories, 1)
        pop_item = (_u(usid, s, 3) ** 2.0 * w.num_items).astype(np.int64)
        int_cat = interests[np.arange(n), (_u(usid, s, 4) * NUM_INTERESTS).astype(np.int64)]
        int_item = int_cat + w.num_categories * (_u(usid, s, 5) * per_cat).astype(np.int64)
        item = np.minimum(np.where(_u(usid, s, 6) < 0.3, int_item, pop_item), w.num_items - 1)
        cat = self.item_cat(item)
        context = (_u(usid, s, 7) * NUM_CONTEXT).astype(np.int64)
        useg = (_u(user.astype(np.uint64), s, 8) * NUM_SEGMENTS).astype(np.int64)
        iseg = (_u(item.astype(np.uint64), s, 9) * NUM_SEGMENTS).astype(np.int64)
        dense = np.stack([_normal(usid, s, 100 + k) for k in range(w.num_dense)], 1) if w.num_dense else \
            np.zeros((n, 0))

        # history window: the user's last L events before this sample
        pos = self.timeline_pos(user, days, usid)
        lengths = np.minimum(pos, self.cfg.history_len)
        row = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        j = (pos - lengths)[row] + (np.arange(lengths.sum()) - starts[row])
        ev = self.events(user[row], j, interests, row)

        logit_ctr, logit_cvr, mu_wt = self._logits(day, item, cat, interests, traffic, context, useg, iseg, dense,
                                                   ev["cat"], lengths, user)
        p_ctr = _sigmoid(logit_ctr)
        p_cvr_click = _sigmoid(logit_cvr)
        click = _u(usid, s, 31) < p_ctr
        conv = click & (_u(usid, s, 32) < p_cvr_click)
        wt_sigma = 0.5
        wt = np.where(click, np.exp(mu_wt + wt_sigma * _normal(usid, s, 33)), 0.0)
        truth = {"ctr": p_ctr, "cvr": p_ctr * p_cvr_click, "watch_time": p_ctr * np.exp(mu_wt + wt_sigma**2 / 2)}
        labels = {"ctr": click.astype(np.float32), "cvr": conv.astype(np.float32), "watch_time": wt}

        feats = {"user_id": user, "item_id": item, "item_cat": cat, "user_segment": useg, "item_segment": iseg,
                 "context": context}
        t = torch.from_numpy
        return Batch(
            sample_id=t(sid), day=torch.full((n,), day, dtype=torch.int32), traffic=t(traffic.astype(np.int64)),
            labels={k: t(labels[k].astype(np.float32)) for k in self.tasks},
            dense=t(dense.astype(np.float32)),
            sparse=KeyedJaggedTensor(keys=list(SPARSE), values=t(np.concatenate([feats[k] for k in SPARSE])),
                                     lengths=torch.ones(n * len(SPARSE), dtype=torch.int64), stride=n),
            history=History(offsets_from_lengths(t(lengths)), {k: t(v.astype(np.int64)) for k, v in ev.items()}),
            p_true={k: t(truth[k].astype(np.float32)) for k in self.tasks},
        )

    def _logits(self, day, item, cat, interests, traffic, context, useg, iseg, dense, hist_cat, lengths, user):  # noqa: ANN001
        """Ground-truth logits of click and conversion|click, and the log-mean of watch time."""
        w, s = self.w, self.seed
        uitem = item.astype(np.uint64)
        quality = 0.5 * _normal(uitem, s, 40)
        # item popularity random walk over days (cumulative sum of daily steps), plus the category's walk
        steps = np.stack([_normal(_key(item, d), s, 41) for d in range(day + 1)], 1)
        item_pop = 0.5 * w.drift * steps.sum(1)
        # the user's interests, one of them "active" on this day (drift of interests)
        active = (_u(_key(user, day), s, 42) * NUM_INTERESTS).astype(np.int64)
        match = interests == cat[:, None]
        weight = np.where(np.arange(NUM_INTERESTS)[None, :] == active[:, None], 1.6, 0.9)
        interest = (match * weight).max(1)
        # short-range: share of the last 8 events in the candidate's category
        last = np.minimum(lengths, 8)
        ends = np.cumsum(lengths)
        recent = np.zeros(len(item))
        for k in range(8):  # 8 vectorised passes, not a loop over samples
            ok = k < last
            recent[ok] += hist_cat[ends[ok] - 1 - k] == cat[ok]
        recent /= np.maximum(last, 1)
        cell = self.cells[useg, iseg, context // 6]
        dense_term = dense @ self.dense_w if w.num_dense else 0.0
        nonlinear = 0.4 * np.sin(2.0 * dense[:, 0]) * dense[:, 1] if w.num_dense >= 2 else 0.0
        logit_ctr = (self.base + self.traffic_bias[traffic] + quality + item_pop + self.cat_pop[day, cat]
                     + w.long_range * 1.6 * interest + 0.8 * recent + w.interactions * 1.0 * cell
                     + self.context_bias[context] + dense_term + nonlinear)
        logit_cvr = -1.5 + 0.8 * quality + 0.6 * w.long_range * interest + 0.5 * w.interactions * cell
        mu_wt = 3.0 + 0.5 * quality + 0.3 * interest
        return logit_ctr, logit_cvr, mu_wt
