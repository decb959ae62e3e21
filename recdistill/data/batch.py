"""The Batch moved as one unit between data, teacher, student and signals (DESIGN §4 'Batch'), and the Schema
that describes the features of a data source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.config import SamplingConfig


@dataclass(frozen=True)
class TaskSpec:
    """A prediction task: name and kind (binary: BCE on 0/1 labels; continuous: regression)."""

    name: str
    kind: Literal["binary", "continuous"] = "binary"
    #: The binary task whose positives hold every non-zero label of this one (a conversion needs a click), or
    #: None. Down-sampling by that task's label then changes this task's rate by a factor that depends on the row
    #: (recdistill/distill/debias.py), not by the constant shift of the sampling task itself.
    within: str | None = None


@dataclass(frozen=True)
class Schema:
    """Feature layout of a data source; models size their embedding tables from it.

    sparse / history map a feature name to its cardinality (ids are in [0, cardinality)). History field names
    have no `hist_` prefix; `item` is always present.
    """

    tasks: tuple[TaskSpec, ...]
    dense: tuple[str, ...]
    sparse: dict[str, int]
    history: dict[str, int]
    num_traffic: int
    max_history: int

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def primary_task(self) -> str:
        """The first binary task (the one sampling decisions use)."""
        return next(t.name for t in self.tasks if t.kind == "binary")


@dataclass(frozen=True)
class Roles:
    """Which features play which part in the models (DESIGN §4 'Feature roles'), resolved for one data source.

    user / item / category name sparse features (Schema.sparse keys), hist_item / hist_category / hist_action
    history fields (Schema.history keys, no `hist_` prefix). None: the data has no such feature and the models do
    without what needs it. Built from config and source defaults by recdistill/data/roles.py; models take it as
    it is, so they know nothing of config.
    """

    user: str | None = None
    item: str | None = None
    category: str | None = None
    hist_item: str | None = None
    hist_category: str | None = None
    hist_action: str | None = None

    #: Roles naming a sparse feature; the others name history fields.
    SPARSE = ("user", "item", "category")
    HISTORY = ("hist_item", "hist_category", "hist_action")

    def present_in(self, schema: Schema) -> Roles:
        """These roles with every name `schema` does not have set to None."""
        return Roles(**{k: v if v in (schema.sparse if k in Roles.SPARSE else schema.history) else None
                        for k, v in self.as_dict().items()})

    def check(self, schema: Schema) -> None:
        """ValueError naming the role and what the data has, for a role naming a feature `schema` does not have."""
        for k, v in self.as_dict().items():
            names = schema.sparse if k in Roles.SPARSE else schema.history
            if v is not None and v not in names:
                kind = "sparse feature" if k in Roles.SPARSE else "history field"
                raise ValueError(f"role {k}={v!r}: the data has no {kind} {v!r} (it has {sorted(names)})")

    def as_dict(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in (*Roles.SPARSE, *Roles.HISTORY)}

    @property
    def history_fields(self) -> tuple[str, ...]:
        """The history fields the models embed, in the fixed order item, category, action (those present)."""
        return tuple(f for f in (self.hist_item, self.hist_category, self.hist_action) if f is not None)


#: The conventional names (DESIGN §4 Parquet layout): what a source without declared roles is read with.
CONVENTIONAL_ROLES = Roles(user="user_id", item="item_id", category="item_cat", hist_item="item", hist_category="cat",
                           hist_action="action")


_ALLOCATOR: Callable[[int, torch.dtype], torch.Tensor] | None = None  # set in loader worker processes only


def set_buffer_allocator(alloc: Callable[[int, torch.dtype], torch.Tensor] | None) -> None:
    """Make :func:`empty_buffer` allocate through `alloc` (this process only; None: plain memory). A loader worker
    sets its shared-memory arenas (recdistill/data/shared_pool.py): a tensor made there reaches the training process
    as is, where any other is first copied (at long histories that copy cost as much as making the events)."""
    global _ALLOCATOR
    _ALLOCATOR = alloc


def empty_buffer(n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """An uninitialised [n] tensor for a source to fill (through `.numpy()`), in shared memory in a loader worker."""
    return torch.empty(n, dtype=dtype) if _ALLOCATOR is None else _ALLOCATOR(n, dtype)


def offsets_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """[B] lengths -> [B+1] int64 offsets."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths.to(torch.int64), 0, out=out[1:])
    return out


def first_ids(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B] int64 first id of each row of a jagged feature (`values`, per-row `lengths`), -1 where a row has none."""
    starts = offsets_from_lengths(lengths)[:-1]
    out = torch.full((len(lengths),), -1, dtype=torch.int64)
    has = lengths > 0
    out[has] = values[starts[has]].to(torch.int64)
    return out


def jagged_index(offsets: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the values array of the rows `idx` of a jagged tensor, and the new offsets.

    Vectorised: position = new-row start in the old array + rank within the row.
    """
    lengths = (offsets[1:] - offsets[:-1])[idx]
    new_offsets = offsets_from_lengths(lengths)
    total = int(new_offsets[-1])
    row = torch.repeat_interleave(torch.arange(idx.numel(), device=offsets.device), lengths, output_size=total)
    pos = offsets[idx][row] + (torch.arange(total, device=offsets.device) - new_offsets[row])
    return pos, new_offsets


@dataclass
class History:
    """Jagged per-event history: `offsets` [B+1] int64 and one int64 values tensor [N] per field, oldest first."""

    offsets: torch.Tensor
    fields: dict[str, torch.Tensor]

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> History:
        return History(self.offsets.to(device, non_blocking=non_blocking),
                       {k: v.to(device, non_blocking=non_blocking) for k, v in self.fields.items()})

    def pin_memory(self) -> History:
        return History(self.offsets.pin_memory(), {k: v.pin_memory() for k, v in self.fields.items()})

    def select(self, idx: torch.Tensor) -> History:
        pos, off = jagged_index(self.offsets, idx)
        return History(off, {k: v[pos] for k, v in self.fields.items()})

    def slice(self, start: int, stop: int) -> History:
        """Rows [start, stop): views of the values (offsets arithmetic, nothing gathered or copied but offsets)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return History(self.offsets[start : stop + 1] - lo, {k: v[lo:hi] for k, v in self.fields.items()})

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.offsets.record_stream(stream)
        for v in self.fields.values():
            v.record_stream(stream)

    def last(self, n: int) -> History:
        """Keep only the n most recent events of each row."""
        lengths = self.lengths.clamp(max=n)
        off = offsets_from_lengths(lengths)
        total = int(off[-1])
        row = torch.repeat_interleave(torch.arange(lengths.numel()), lengths, output_size=total)
        pos = self.offsets[1:][row] - lengths[row] + (torch.arange(total) - off[row])
        return History(off, {k: v[pos] for k, v in self.fields.items()})


def _kjt_select(kjt: KeyedJaggedTensor, idx: torch.Tensor) -> KeyedJaggedTensor:
    """Rows `idx` of a KJT (key-major layout: lengths are [key0 rows, key1 rows, ...])."""
    keys = kjt.keys()
    b = kjt.stride()
    offsets = kjt.offsets()
    all_idx = torch.cat([idx + k * b for k in range(len(keys))]) if keys else idx[:0]
    pos, new_off = jagged_index(offsets, all_idx)
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(keys=keys, values=kjt.values()[pos], lengths=new_off.diff(),
                             weights=None if weights is None else weights[pos], stride=idx.numel())


def _kjt_slice(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    """Rows [start, stop) of a KJT: one value range per key (key-major layout), no per-row work."""
    keys, b = kjt.keys(), kjt.stride()
    if not keys:
        return kjt
    bounds = kjt.offsets().view(-1)[[k * b + r for k in range(len(keys)) for r in (start, stop)]].tolist()
    spans = list(zip(bounds[::2], bounds[1::2], strict=True))
    weights = kjt.weights_or_none()
    return KeyedJaggedTensor(keys=keys, values=torch.cat([kjt.values()[lo:hi] for lo, hi in spans]),
                             lengths=kjt.lengths().view(len(keys), b)[:, start:stop].reshape(-1),
                             weights=None if weights is None else torch.cat([weights[lo:hi] for lo, hi in spans]),
                             stride=stop - start)


@dataclass
class Batch:
    """One batch of samples (DESIGN §4). Row i of every field is the same sample.

    labels / p_true map task name -> [B] float32; `p_true` (ground-truth probability, synthetic data only) may be
    None. `sampling` is the view that produced these rows (None = unsampled).
    """

    sample_id: torch.Tensor  # [B] int64, globally unique
    day: torch.Tensor  # [B] int32
    traffic: torch.Tensor  # [B] int64, traffic source id
    labels: dict[str, torch.Tensor]
    dense: torch.Tensor  # [B, Fd] float32
    sparse: KeyedJaggedTensor  # categorical features, keys = Schema.sparse
    history: History
    sampling: SamplingConfig | None = None
    p_true: dict[str, torch.Tensor] | None = field(default=None)

    def __len__(self) -> int:
        return int(self.sample_id.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        nb = non_blocking
        return replace(
            self,
            sample_id=self.sample_id.to(device, non_blocking=nb),
            day=self.day.to(device, non_blocking=nb),
            traffic=self.traffic.to(device, non_blocking=nb),
            labels={k: v.to(device, non_blocking=nb) for k, v in self.labels.items()},
            dense=self.dense.to(device, non_blocking=nb),
            sparse=self.sparse.to(torch.device(device), non_blocking=nb),
            history=self.history.to(device, non_blocking=nb),
            p_true=None if self.p_true is None else {k: v.to(device, non_blocking=nb) for k, v in self.p_true.items()},
        )

    def pin_memory(self) -> Batch:
        return replace(
            self,
            sample_id=self.sample_id.pin_memory(),
            day=self.day.pin_memory(),
            traffic=self.traffic.pin_memory(),
            labels={k: v.pin_memory() for k, v in self.labels.items()},
            dense=self.dense.pin_memory(),
            sparse=self.sparse.pin_memory(),
            history=self.history.pin_memory(),
            p_true=None if self.p_true is None else {k: v.pin_memory() for k, v in self.p_true.items()},
        )

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A Batch with `fn` applied to every tensor (the sparse values, lengths and weights one by one)."""
        kjt, w = self.sparse, self.sparse.weights_or_none()
        return replace(
            self, sample_id=fn(self.sample_id), day=fn(self.day), traffic=fn(self.traffic),
            labels={k: fn(v) for k, v in self.labels.items()}, dense=fn(self.dense),
            sparse=KeyedJaggedTensor(keys=kjt.keys(), values=fn(kjt.values()), lengths=fn(kjt.lengths()),
                                     weights=None if w is None else fn(w), stride=kjt.stride()),
            history=History(fn(self.history.offsets), {k: fn(v) for k, v in self.history.fields.items()}),
            p_true=None if self.p_true is None else {k: fn(v) for k, v in self.p_true.items()})

    def select(self, idx: torch.Tensor) -> Batch:
        """Rows `idx` (int64 indices or a bool mask) as a new Batch."""
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64)
        return replace(
            self,
            sample_id=self.sample_id[idx],
            day=self.day[idx],
            traffic=self.traffic[idx],
            labels={k: v[idx] for k, v in self.labels.items()},
            dense=self.dense[idx],
            sparse=_kjt_select(self.sparse, idx),
            history=self.history.select(idx),
            p_true=None if self.p_true is None else {k: v[idx] for k, v in self.p_true.items()},
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a new Batch: views of this batch's tensors, except the sparse values (one copy per
        key) and the offsets; cheaper than `select` of the same rows, and equal to it."""
        s = slice(start, stop)
        return replace(
            self, sample_id=self.sample_id[s], day=self.day[s], traffic=self.traffic[s],
            labels={k: v[s] for k, v in self.labels.items()}, dense=self.dense[s],
            sparse=_kjt_slice(self.sparse, start, stop), history=self.history.slice(start, stop),
            p_true=None if self.p_true is None else {k: v[s] for k, v in self.p_true.items()})

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Mark every tensor as used on `stream` (CUDA): the caching allocator keeps their memory until the work
        queued there is done, when the batch was copied on another stream (the loader's device prefetch)."""
        for t in (self.sample_id, self.day, self.traffic, self.dense, *self.labels.values(),
                  *(self.p_true or {}).values()):
            t.record_stream(stream)
        self.sparse.record_stream(stream)
        self.history.record_stream(stream)

    @staticmethod
    def concat(batches: list[Batch]) -> Batch:
        """Concatenate batches with the same keys (and the same sampling view) row-wise."""
        if not batches:
            raise ValueError("Batch.concat of an empty list")
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        keys = first.sparse.keys()
        per_key_vals, per_key_len = [], []
        for k in keys:
            for b in batches:
                jt = b.sparse[k]
                per_key_vals.append(jt.values())
                per_key_len.append(jt.lengths())

        sparse = KeyedJaggedTensor(keys=keys, values=torch.cat(per_key_vals) if per_key_vals else torch.empty(0),
                                   lengths=torch.cat(per_key_len) if per_key_len else torch.empty(0, dtype=torch.int64),
                                   stride=sum(len(b) for b in batches))
        hist_len = torch.cat([b.history.lengths for b in batches])
        history = History(offsets_from_lengths(hist_len),
                          {k: torch.cat([b.history.fields[k] for b in batches]) for k in first.history.fields})
        return Batch(
            sample_id=torch.cat([b.sample_id for b in batches]),
            day=torch.cat([b.day for b in batches]),
            traffic=torch.cat([b.traffic for b in batches]),
            labels={k: torch.cat([b.labels[k] for b in batches]) for k in first.labels},
            dense=torch.cat([b.dense for b in batches]),
            sparse=sparse,
            history=history,
            sampling=first.sampling,
            p_true=None if first.p_true is None else {k: torch.cat([b.p_true[k] for b in batches])
                                                      for k in first.p_true},
        )
