"""The synthetic world: the default data, with a known ground truth (DESIGN §4 'Synthetic world').

Every sample is a pure function of (seed, sample_id), computed with counter hashes (no RNG state), so any chunk
of any day can be generated independently, in any order, on any rank, and the world does not change when more
days or samples are asked for. sample_id = day << 40 | index.

The generative process, and why each part is there:

* **Users and their timelines.** User u has one consistent event timeline: event j is a function of (seed, u, j).
  A sample of u at some moment of day d sees the window of u's last L events before that moment; the timeline
  grows day by day, so two samples of the same user share their older events, as in real logs. Users differ in
  how long their timelines are (log-normal: tens to hundreds of events for some, thousands for many, up to 20K).
* **Long-range interests (sequence length matters).** Each user has three latent long-term interest categories.
  Only a small share of history events (`interest_share`, 6%) come from them; the rest are noise spread over
  all categories, and actions barely differ between the two. Whether the candidate's category is one of the
  interests moves the click logit strongly, but telling the interests apart from the noise takes thousands of
  events: the last 64 hold about one interest event per interest, 2000 hold about forty.
* **Short-range context.** The share of the last 8 events in the candidate's category matters a little
  (session intent), so a model that sees only recent history is not useless.
* **Low-order effects.** Item quality, item tags (a multi-id feature: 1-3 tags per item, each with its own
  effect), traffic source, context slot and the dense features add to the logit; an additive model learns them.
* **High-order interaction (capacity matters).** A random effect per cell of user segment x item segment x
  context slot, with every one- and two-field part removed: additive models and pairwise crosses see none of
  it, models that cross all three fields do. The slot is a feature of its own (`context_slot`, 4 day parts of
  the 24 `context` ids): from `context` alone a model has to find the grouping too, 1,536 combinations instead of
  256, and learns the cell later (benchmarks/interaction_learnability.py). `interaction_heredity` h moves a share
  h of the cell's variance into its two-field parts (pairwise crosses of the three fields, still with no one-field
  part). The demo world uses h = 1 and strength 1.5: the pure three-way form is found by no teacher of any size in
  one pass at demo scale, the pairwise form is, by larger dense parts more on average (docs/LOG.md).
* **Drift (streaming matters).** Category and item popularity follow mean-reverting day-level random walks, and
  which of a user's interests is active (strongest) changes day by day; a model fit on an early day loses AUC
  later. Mean reversion keeps the world stationary: day 500 looks like day 5, only different.
* **Traffic sources** have different base rates (and get different positive keep-rates in the default views). The
  source is a feature too (`traffic_source`, as in real logs): a model that cannot see it has only its sampling
  correction to rank by traffic, and that runs against the bias (its keep-rate falls as the base rate falls).
* **Tasks.** ctr: click ~ Bernoulli(p_ctr). cvr: conversion per impression, click x Bernoulli(p_cvr|click), so
  p_true = p_ctr * p_cvr|click. watch_time: click x LogNormal(mu(x), 0.5), p_true = its expectation.

* **Knobs for other worlds** (data.world; benchmarks/robustness.py runs the pipeline on a suite of them,
  configs/worlds/): `history_median` (timeline lengths), `positive_rate` (the click logit's constant solved for a
  base rate), `traffic_mix` (share of each source), `item_effects` and `dense_effects` (strength of those parts),
  besides the sizes, `drift`, `long_range`, `interactions`, `interaction_heredity` and `interest_share`. At their
  defaults the world is the one described here, value for value.

The ground truth (p_true) uses the user's latent interests, not the visible history window, so the Bayes-optimal
AUC is a ceiling no model reaches: 0.83-0.84 for ctr with the defaults (base rate about 9%).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.config import DataConfig
from recdistill.data.batch import Batch, History, Roles, Schema, TaskSpec, empty_buffer
from recdistill.data.sampling import SamplingConfig, hash_uniform, keep_mask, maybe_kept, splitmix64

KNOWN_TASKS = {"ctr": "binary", "cvr": "binary", "watch_time": "continuous"}
SPARSE = ("user_id", "item_id", "item_cat", "item_tags", "user_segment", "item_segment", "context", "context_slot",
          "traffic_source")
HISTORY = ("item", "cat", "action", "ts")
NUM_SEGMENTS, NUM_CONTEXT, NUM_SLOTS, NUM_ACTIONS, NUM_INTERESTS, NUM_TAGS = 8, 24, 4, 4, 3, 256
SLOT_WIDTH = NUM_CONTEXT // NUM_SLOTS  # context ids per context slot: slot = context // SLOT_WIDTH
RECENT = 8  # events of session context in the ground truth
TS0, EVENT_GAP_S = 1_600_000_000, 600  # history timestamps: timeline position j happens at TS0 + j * gap
RHO, WALK_MEMORY = 0.8, 60  # popularity drift: day-to-day persistence, days of memory kept
FROM_INTERESTS = 0.3  # share of candidates drawn from the user's interests (the rest popularity-skewed)
_EVENT_BLOCK = 1 << 16  # events per pass: the working set stays in cache (faster than one pass over all events)
_U32, _U16, _U8 = np.uint64(0xFFFFFFFF), np.uint32(0xFFFF), np.uint32(0xFF)


def _u(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    return hash_uniform(ids, seed, salt)


def _normal(ids: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Standard normal per id (Box-Muller on two independent hashes)."""
    u1 = np.maximum(_u(ids, seed, salt), 1e-12)
    u2 = _u(ids, seed, salt + 7919)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _key(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """One uint64 key for a pair of non-negative ints (a < 2^31, b < 2^32)."""
    return (np.asarray(a).astype(np.uint64) << np.uint64(32)) | np.asarray(b).astype(np.uint64)


def _pure_interaction(t: np.ndarray) -> np.ndarray:
    """A table over k fields (one axis each) with every lower-order part removed: centring along each axis in turn
    zeroes every marginal over fewer than k fields (a pure k-way interaction)."""
    for axis in range(t.ndim):
        t = t - t.mean(axis=axis, keepdims=True)
    return t


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """DataSource over the synthetic world (see module docstring); configured by DataConfig (and its .world)."""

    sampling = None  # the population itself, unsampled
    #: Feature roles (recdistill/data/batch.py): the world's own names, which are the conventional ones.
    roles = Roles(user="user_id", item="item_id", category="item_cat", hist_item="item", hist_category="cat",
                  hist_action="action")

    def __init__(self, data_cfg: DataConfig) -> None:
        w = data_cfg.world
        bad = [t.name for t in data_cfg.tasks if t.name not in KNOWN_TASKS or KNOWN_TASKS[t.name] != t.kind]
        if bad:
            raise ValueError(f"data.tasks: the synthetic world has no task {bad} (it knows "
                             f"{', '.join(f'{k} ({v})' for k, v in KNOWN_TASKS.items())})")
        self.cfg, self.w, self.seed = data_cfg, w, data_cfg.seed
        self.tasks = [t.name for t in data_cfg.tasks]
        c, s = w.num_categories, self.seed
        self.schema = Schema(
            # cvr and watch_time are non-zero only on clicks: within ctr, whatever the config says
            tasks=tuple(TaskSpec(t.name, t.kind, "ctr" if t.name != "ctr" and "ctr" in self.tasks else None)
                        for t in data_cfg.tasks),
            dense=tuple(f"x{i}" for i in range(w.num_dense)),
            sparse={"user_id": w.num_users, "item_id": w.num_items, "item_cat": c, "item_tags": NUM_TAGS,
                    "user_segment": NUM_SEGMENTS, "item_segment": NUM_SEGMENTS, "context": NUM_CONTEXT,
                    "context_slot": NUM_SLOTS, "traffic_source": w.num_traffic},
            history={"item": w.num_items, "cat": c, "action": NUM_ACTIONS, "ts": 2**62},
            num_traffic=w.num_traffic, max_history=data_cfg.history_len)
        # Small tables, hashed from the seed alone (never from num_days: more days must not change the old ones).
        self.traffic_bias = np.linspace(0.4, -0.8, w.num_traffic) if w.num_traffic > 1 else np.zeros(1)
        share = np.linspace(2.0, 1.0, w.num_traffic) if w.traffic_mix is None else np.asarray(w.traffic_mix, float)
        self.traffic_cdf = np.cumsum(share / share.sum())
        self.context_bias = 0.3 * _normal(np.arange(NUM_CONTEXT), s, 50)
        self.tag_effect = 0.3 * _normal(np.arange(NUM_TAGS), s, 51)
        self.dense_w = 0.15 * _normal(np.arange(w.num_dense), s, 52)
        # A pure three-way interaction: neither additive models nor pairwise crosses (FM-style) learn any of it.
        cells = _pure_interaction(_normal(np.arange(NUM_SEGMENTS**2 * NUM_SLOTS), s, 53).reshape(
            NUM_SEGMENTS, NUM_SEGMENTS, NUM_SLOTS))
        self.cells = cells / cells.std()
        if w.interaction_heredity > 0:
            # Effect heredity (real interactions come with lower-order ones): a share of the cell's variance moves
            # into its three two-field parts, which pairwise crosses can learn and which lead gradient descent to
            # the fields the three-way part is made of. The cell keeps unit sd.
            n, k = NUM_SEGMENTS, NUM_SLOTS
            uv = _pure_interaction(_normal(np.arange(n * n), s, 54).reshape(n, n))[:, :, None]
            us = _pure_interaction(_normal(np.arange(n * k), s, 55).reshape(n, k))[:, None, :]
            vs = _pure_interaction(_normal(np.arange(n * k), s, 56).reshape(n, k))[None, :, :]
            two = uv + us + vs
            h = w.interaction_heredity
            self.cells = np.sqrt(1 - h) * self.cells + np.sqrt(h) * two / two.std()
        self.base = -3.5  # puts the CTR base rate near 9%
        self._event_salt = splitmix64(np.uint64((s * 0x9E3779B1 + 0xE7E7) & 0xFFFFFFFF))
        self._day_cache: dict[str, dict[int, np.ndarray]] = {}  # per-day tables (see _per_day)
        self._pop_lock = threading.Lock()  # the loader's background thread and the caller may both read
        if w.positive_rate is not None:
            self.base = self._calibrated_base(w.positive_rate)

    def __getstate__(self) -> dict:
        # Pickled for the loader's worker processes: without the lock (not picklable) and the per-day cache.
        return {k: v for k, v in self.__dict__.items() if k not in ("_day_cache", "_pop_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._day_cache, self._pop_lock = {}, threading.Lock()

    # ---- entities ------------------------------------------------------------------------------------------
    def item_cat(self, item: np.ndarray) -> np.ndarray:
        """Category of each item (items of category c are c, c + C, c + 2C, ...)."""
        return item % self.w.num_categories

    def item_tags(self, item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """1-3 tags per item: (lengths [n], tag ids concatenated in item order)."""
        lengths = 1 + (_u(item, self.seed, 20) * 3).astype(np.int64)
        row = np.repeat(np.arange(len(item)), lengths)
        k = np.arange(len(row)) - (np.cumsum(lengths) - lengths)[row]
        return lengths, (_u(_key(item[row], k), self.seed, 21) * NUM_TAGS).astype(np.int64)

    def interests(self, user: np.ndarray) -> np.ndarray:
        """[n, 3] latent long-term interest categories of each user."""
        k = np.arange(NUM_INTERESTS)
        return (_u(_key(user[:, None], k[None, :]), self.seed, 11) * self.w.num_categories).astype(np.int64)

    def timeline_pos(self, user: np.ndarray, day: np.ndarray, sid: np.ndarray) -> np.ndarray:
        """Number of events of the user before each sample: a log-normal start (median `history_median`, 1000 by
        default, from 20 to 20K) plus a per-user daily rate (20-100 events, scaled like the median); where within
        the day the sample falls comes from its sample_id."""
        median = self.w.history_median
        start = np.exp(np.log(median) + 1.5 * _normal(user, self.seed, 12))
        start = np.clip(start, 20, 20_000).astype(np.int64)
        rate = 20 + (_u(user, self.seed, 13) * 80).astype(np.int64)
        if median != 1000.0:
            rate = np.maximum((rate * (median / 1000.0)).astype(np.int64), 1)  # the timeline still grows every day
        return start + day * rate + (_u(sid, self.seed, 14) * rate).astype(np.int64)

    def events(self, user: np.ndarray, j: np.ndarray, interests: np.ndarray, row: np.ndarray) -> dict[str, np.ndarray]:
        """Event j[e] of the timeline of user[e], for each event e (interests[row[e]]: the [3] latent interests of
        that user): item, cat, action, ts (int64).

        Hot path (up to 20K events per sample): one 64-bit hash per event, cut into 16/16/16/8/8-bit fields for
        the independent draws, in 32-bit arithmetic where it fits.
        """
        w = self.w
        h = splitmix64(_key(user, j) ^ self._event_salt)
        lo, hi = (h & _U32).astype(np.uint32), (h >> np.uint64(32)).astype(np.uint32)
        from_interest = (lo & _U16) < np.uint32(int(w.interest_share * 65536))
        noise_cat = ((lo >> np.uint32(16)) * np.uint32(w.num_categories)) >> np.uint32(16)
        pick = ((hi >> np.uint32(16)) & _U8) * np.uint32(NUM_INTERESTS) >> np.uint32(8)
        cat = np.where(from_interest, interests.reshape(-1)[row * NUM_INTERESTS + pick], noise_cat).astype(np.int64)
        per_cat = max(w.num_items // w.num_categories, 1)
        slot = ((hi & _U16).astype(np.int64) * per_cat) >> 16
        item = cat + w.num_categories * slot  # < num_items whenever there are at least as many items as categories
        if w.num_items < w.num_categories:
            item = np.minimum(item, w.num_items - 1)
            cat = self.item_cat(item)
        # actions 0 view / 1 click / 2 like / 3 buy; interest events are only slightly more engaged, so the action
        # does not give away which events carry the long-term signal
        a = (hi >> np.uint32(24)) + np.where(from_interest, np.uint32(10), np.uint32(0))
        action = (a >= 158).astype(np.int64) + (a >= 222) + (a >= 248)
        ts = TS0 + j * EVENT_GAP_S + (user & 511)  # & 511: a per-user second offset, cheaper than % EVENT_GAP_S
        return {"item": item, "cat": cat, "action": action, "ts": ts}

    def history(self, user: np.ndarray, interests: np.ndarray, pos: np.ndarray, max_len: int) -> History:
        """Each row's window of its user's last min(pos, max_len) timeline events before position pos."""
        n = len(user)
        lengths = np.minimum(pos, max_len)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        buffers = {k: empty_buffer(total) for k in HISTORY}  # shared memory in a loader worker: sent without a copy
        out = {k: v.numpy() for k, v in buffers.items()}
        # blocks of whole rows with about _EVENT_BLOCK events each (a Python loop over blocks, not samples)
        cuts = np.unique(np.r_[np.searchsorted(offsets, np.arange(0, total, _EVENT_BLOCK), side="right") - 1, n])
        for r0, r1 in zip(cuts[:-1], cuts[1:], strict=True):
            e0, e1 = offsets[r0], offsets[r1]
            row = np.repeat(np.arange(r0, r1), lengths[r0:r1])
            j = (pos - lengths)[row] + (np.arange(e0, e1) - offsets[row])
            ev = self.events(user[row], j, interests, row)
            for k in HISTORY:
                out[k][e0:e1] = ev[k]
        return History(torch.from_numpy(offsets), buffers)

    # ---- drift ---------------------------------------------------------------------------------------------
    def _walk(self, ids: np.ndarray, day: int, salt: int, step_sd: float) -> np.ndarray:
        """Mean-reverting day-level random walk per id: x_d = RHO x_{d-1} + step_sd * eps_d, started from its
        stationary spread on day 0. Mean reversion keeps every day alike however many days there are (a plain
        walk would blow up); terms older than WALK_MEMORY days weigh < 1e-5 and are left out."""
        acc = np.zeros(len(ids))
        for d in range(max(0, day - WALK_MEMORY), day + 1):
            sd = step_sd / np.sqrt(1 - RHO**2) if d == 0 else step_sd
            acc = RHO * acc + sd * _normal(_key(ids, d), self.seed, salt)
        return acc

    def _per_day(self, kind: str, day: int, make: Callable[[], np.ndarray]) -> np.ndarray:
        """make() of `day`, kept for the last 4 days of each `kind` (the loader reads day by day; a table's walk over
        the days costs a read of a few hundred rows as much as the rows themselves)."""
        with self._pop_lock:
            cache = self._day_cache.setdefault(kind, {})
            if day not in cache:
                if len(cache) >= 4:
                    del cache[next(iter(cache))]
                cache[day] = make()
            return cache[day]

    def cat_popularity(self, day: int) -> np.ndarray:
        """[C] category popularity on `day`: a fixed part plus a drifting one."""
        c = np.arange(self.w.num_categories)
        return self._per_day("cat", day, lambda: 0.3 * _normal(c, self.seed, 31) + self._walk(c, day, 30,
                                                                                                 self.w.drift))

    def item_popularity(self, day: int) -> np.ndarray:
        """[num_items] drifting item popularity on `day`."""
        items = np.arange(self.w.num_items)
        return self._per_day("item", day,
                             lambda: self._walk(items, day, 41, 0.5 * self.w.drift).astype(np.float32))

    # ---- DataSource ----------------------------------------------------------------------------------------
    def days(self) -> list[int]:
        return list(range(self.cfg.num_days))

    def num_rows(self, day: int) -> int:
        return self.cfg.samples_per_day

    def read(self, day: int, start: int, stop: int, view: SamplingConfig | None = None) -> Batch:
        """Samples with index in [start, stop) of `day`. With `view`, only the rows the view keeps (equal to
        apply_view(read(day, start, stop), view, num_traffic), but dropped rows never get a history)."""
        if not (0 <= day < self.cfg.num_days) or not (0 <= start <= stop <= self.cfg.samples_per_day):
            raise ValueError(f"rows [{start}, {stop}) of day {day} are outside the world "
                             f"({self.cfg.num_days} days x {self.cfg.samples_per_day} samples)")
        idx = np.arange(start, stop, dtype=np.int64)
        if view is None:
            return self._batch(day, self._samples(day, idx), view)
        # Cheapest order: the ids decide the rows no label can keep; labels (and traffic) of the others decide the
        # rest; only the kept rows then get their other labels and a history (the bulk of the work at long histories).
        idx = idx[maybe_kept(self.sample_ids(day, idx), view, self.w.num_traffic)]
        return self._batch(day, self._samples(day, idx, view), view)

    def sparse_ids(self, day: int, start: int, stop: int) -> dict[str, np.ndarray]:
        """The single-valued sparse features of rows [start, stop) of `day`, one id per row, without labels or
        history (what the counting features read: recdistill/data/counts.py)."""
        return self._single_ids(self._features(day, np.arange(start, stop, dtype=np.int64)))

    @staticmethod
    def _single_ids(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The single-valued sparse features (every one of SPARSE but the tags) of generated rows `x`, by name."""
        return {"user_id": x["user"], "item_id": x["item"], "item_cat": x["cat"], "user_segment": x["useg"],
                "item_segment": x["iseg"], "context": x["context"], "context_slot": x["slot"],
                "traffic_source": x["traffic"]}  # also Batch.traffic (the sampling correction's index)

    def read_ids(self, sample_ids: np.ndarray, view: SamplingConfig | None = None) -> Batch:
        """The samples with these ids, in the order given (any days; ids may repeat). Every sample is a pure function
        of (seed, sample_id), so a consumer of a stream that carries only ids and labels (the streaming student)
        rebuilds the features here. `view` only tags the batch (Batch.sampling): no row is dropped."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        days, idx = sample_ids >> np.int64(40), sample_ids & np.int64((1 << 40) - 1)
        bad = ~self.known_ids(sample_ids)
        if bad.any():
            raise ValueError(f"sample_id {int(sample_ids[bad][0])} is outside the world "
                             f"({self.cfg.num_days} days x {self.cfg.samples_per_day} samples)")
        order = np.argsort(days, kind="stable")
        parts, bounds = [], np.flatnonzero(np.diff(days[order])) + 1
        for rows in np.split(order, bounds):
            if len(rows):
                parts.append(self._batch(int(days[rows[0]]), self._samples(int(days[rows[0]]), idx[rows]), view))
        if not parts:
            return self._batch(0, self._samples(0, idx), view)
        out = Batch.concat(parts)
        if len(parts) == 1:
            return out
        inverse = np.empty(len(order), np.int64)
        inverse[order] = np.arange(len(order))
        return out.select(torch.from_numpy(inverse))

    def known_ids(self, sample_ids: np.ndarray) -> np.ndarray:
        """Mask of the ids that name a sample of this world (a day it has, an index within the day): what a stream
        consumer checks before `read_ids`, so one foreign id is dead-lettered instead of failing its whole batch."""
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        days, idx = sample_ids >> np.int64(40), sample_ids & np.int64((1 << 40) - 1)
        return (days >= 0) & (days < self.cfg.num_days) & (idx < self.cfg.samples_per_day)

    @staticmethod
    def sample_ids(day: int, idx: np.ndarray) -> np.ndarray:
        """sample_id of rows `idx` of `day` (day << 40 | index)."""
        return (np.int64(day) << np.int64(40)) | idx

    # ---- generation ----------------------------------------------------------------------------------------
    def _samples(self, day: int, idx: np.ndarray, view: SamplingConfig | None = None) -> dict[str, np.ndarray]:
        """Every per-sample array of rows `idx` (int64 indices within the day): features, latent state, ground truth
        and labels. With `view`: of the rows it keeps only; a row it drops costs its features and the label the view
        decides by (the click logit needs nearly every feature), not the other labels and ground truths."""
        s, x = self.seed, self._features(day, idx)
        parts, latent = self._parts(day, x)
        p_ctr = _sigmoid(self._ctr_logit(parts))
        click = _u(x["sid"], s, 61) < p_ctr
        if view is not None:
            positive = click
            if view.task != "ctr":  # decided by conversions: their logit for every row
                positive = click & (_u(x["sid"], s, 62) < _sigmoid(self._cvr_wt_logits(latent)[0]))
            keep = keep_mask(x["sid"], positive, x["traffic"], view, self.w.num_traffic)
            x, latent = {k: v[keep] for k, v in x.items()}, {k: v[keep] for k, v in latent.items()}
            p_ctr, click = p_ctr[keep], click[keep]
        sid = x["sid"]
        logit_cvr, mu_wt = self._cvr_wt_logits(latent)
        p_cvr_click = _sigmoid(logit_cvr)
        conv = click & (_u(sid, s, 62) < p_cvr_click)
        wt_sigma = 0.5
        x["label_ctr"], x["p_ctr"] = click.astype(np.float32), p_ctr
        x["label_cvr"], x["p_cvr"] = conv.astype(np.float32), p_ctr * p_cvr_click
        x["label_watch_time"] = np.where(click, np.exp(mu_wt + wt_sigma * _normal(sid, s, 63)), 0.0)
        x["p_watch_time"] = p_ctr * np.exp(mu_wt + wt_sigma**2 / 2)
        return x

    def _features(self, day: int, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The features and latent state of rows `idx` of `day` (what the logits are computed from)."""
        w, s = self.w, self.seed
        sid = self.sample_ids(day, idx)
        n = len(idx)
        user = (_u(sid, s, 1) ** 1.3 * w.num_users).astype(np.int64)  # mildly skewed activity
        interests = self.interests(user)
        traffic = np.searchsorted(self.traffic_cdf, _u(sid, s, 2), side="right").clip(max=w.num_traffic - 1)
        # candidate: from the user's interests some of the time (retrieval works), else popularity-skewed
        per_cat = max(w.num_items // w.num_categories, 1)
        pop_item = (_u(sid, s, 3) ** 2.0 * w.num_items).astype(np.int64)
        int_cat = interests[np.arange(n), (_u(sid, s, 4) * NUM_INTERESTS).astype(np.int64)]
        int_item = int_cat + w.num_categories * (_u(sid, s, 5) * per_cat).astype(np.int64)
        item = np.minimum(np.where(_u(sid, s, 6) < FROM_INTERESTS, int_item, pop_item), w.num_items - 1)
        context = (_u(sid, s, 7) * NUM_CONTEXT).astype(np.int64)
        x = {"sid": sid, "user": user, "interests": interests, "traffic": traffic.astype(np.int64), "item": item,
             "cat": self.item_cat(item), "context": context,
             "slot": context // SLOT_WIDTH,  # the context slot (a day part): the cell's third field
             "useg": (_u(user, s, 8) * NUM_SEGMENTS).astype(np.int64),
             "iseg": (_u(item, s, 9) * NUM_SEGMENTS).astype(np.int64),
             "dense": np.stack([_normal(sid, s, 100 + k) for k in range(w.num_dense)], 1) if w.num_dense
             else np.zeros((n, 0)),
             "pos": self.timeline_pos(user, np.full(n, day), sid)}
        return x

    def _calibrated_base(self, rate: float, rows: int = 8192) -> float:
        """The click logit's constant that gives a mean ground-truth CTR of `rate` over the first `rows` samples of
        day 0 (bisection: the mean is increasing in the constant). Day 0 and the seed only, so the world does not
        change with num_days or samples_per_day."""
        parts = self._parts(0, self._features(0, np.arange(rows, dtype=np.int64)))[0]
        rest = sum(v for k, v in parts.items() if k != "base")
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(mid + rest).mean() < rate else (lo, mid)
        return (lo + hi) / 2

    def ctr_components(self, day: int, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The click logit's additive parts, by name (they sum, in this order, to the ground-truth click logit;
        `base` is the constant). What each part needs from a model is in the module docstring: `interest` needs
        long histories, `cell` and `dense_nonlinear` need crossing of fields, the rest an additive model learns.
        `x` is what `_samples` builds (`components` below takes a day range)."""
        return self._parts(day, x)[0]

    def components(self, day: int, start: int, stop: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(sample_id, ctr_components) of rows [start, stop) of `day`, unsampled."""
        x = self._samples(day, np.arange(start, stop, dtype=np.int64))
        return x["sid"], self.ctr_components(day, x)

    def _parts(self, day: int, x: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        w, s, n = self.w, self.seed, len(x["sid"])
        item, cat = x["item"], x["cat"]
        # the strength knobs multiply by 1.0 at their defaults, which leaves every value bit-identical
        quality = w.item_effects * 0.3 * _normal(item, s, 40)
        tag_len, tags = self.item_tags(item)
        tag_term = w.item_effects * np.bincount(np.repeat(np.arange(n), tag_len), self.tag_effect[tags], minlength=n)
        # long range: the candidate's category among the user's latent interests, the day's active one strongest
        active = (_u(_key(x["user"], day if w.drift > 0 else 0), s, 42) * NUM_INTERESTS).astype(np.int64)
        weight = np.where(np.arange(NUM_INTERESTS)[None, :] == active[:, None], 1.5, 0.8)
        interest = ((x["interests"] == cat[:, None]) * weight).max(1)
        # short range: share of the user's last 8 timeline events in the candidate's category
        k = np.arange(1, RECENT + 1)[None, :]
        pos = x["pos"][:, None]
        row = np.repeat(np.arange(n), RECENT)
        ev = self.events(x["user"][row], (pos - k).clip(min=0).reshape(-1), x["interests"], row)
        seen = (pos - k >= 0)
        recent = ((ev["cat"].reshape(n, RECENT) == cat[:, None]) & seen).sum(1) / np.maximum(seen.sum(1), 1)
        cell = self.cells[x["useg"], x["iseg"], x["slot"]]
        dense = x["dense"]
        zero = np.zeros(n)
        return {
            "base": np.full(n, self.base), "traffic": self.traffic_bias[x["traffic"]], "quality": quality,
            "tags": tag_term, "item_popularity": w.item_effects * self.item_popularity(day)[item],
            "cat_popularity": self.cat_popularity(day)[cat], "interest": w.long_range * 1.2 * interest,
            "recent": 0.8 * recent, "cell": w.interactions * 0.7 * cell, "context": self.context_bias[x["context"]],
            "dense_linear": w.dense_effects * (dense @ self.dense_w) if w.num_dense else zero,
            "dense_nonlinear": w.dense_effects * (0.3 * np.sin(2.0 * dense[:, 0]) * dense[:, 1]) if w.num_dense >= 2
            else zero,
        }, {"interest": interest, "quality": quality, "cell": cell}

    @staticmethod
    def _ctr_logit(parts: dict[str, np.ndarray]) -> np.ndarray:
        """The ground-truth click logit: the sum of its parts (ctr_components), in their order."""
        logit_ctr = parts["base"]
        for name, part in parts.items():
            if name != "base":
                logit_ctr = logit_ctr + part
        return logit_ctr

    def _cvr_wt_logits(self, latent: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth logit of conversion given click, and the log-mean of watch time."""
        quality, interest, cell = latent["quality"], latent["interest"], latent["cell"]
        logit_cvr = -1.5 + 0.8 * quality + 0.6 * self.w.long_range * interest + 0.5 * self.w.interactions * cell
        mu_wt = 3.0 + 0.5 * quality + 0.3 * interest
        return logit_cvr, mu_wt

    def _batch(self, day: int, x: dict[str, np.ndarray], view: SamplingConfig | None) -> Batch:
        """Assemble the Batch (history generated here, for the rows in x only)."""
        n, t = len(x["sid"]), torch.from_numpy
        tag_len, tags = self.item_tags(x["item"])
        feats = {**self._single_ids(x), "item_tags": tags}
        lengths = [tag_len if k == "item_tags" else np.ones(n, dtype=np.int64) for k in SPARSE]
        return Batch(
            sample_id=t(x["sid"]), day=torch.full((n,), day, dtype=torch.int32), traffic=t(x["traffic"]),
            labels={k: t(x["label_" + k].astype(np.float32)) for k in self.tasks},
            dense=t(x["dense"].astype(np.float32)),
            sparse=KeyedJaggedTensor(keys=list(SPARSE), values=t(np.concatenate([feats[k] for k in SPARSE])),
                                     lengths=t(np.concatenate(lengths)), stride=n),
            history=self.history(x["user"], x["interests"], x["pos"], self.cfg.history_len),
            sampling=view,
            p_true={k: t(x["p_" + k].astype(np.float32)) for k in self.tasks},
        )
