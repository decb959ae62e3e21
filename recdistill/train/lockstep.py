"""Ranks that forward together: equal-size batches on every rank at every step, while any rank has data.

DMP's forward runs collectives (all-to-all; for row-wise tables an all-gather that on gloo needs equal local batch
sizes), so every rank must forward the same number of batches of the same size, in training and in evaluation
alike. Each rank's loader yields batches of up to `size` rows (a day's last one may be short) and ranks can hold
different numbers of them. :class:`LockstepBatches` turns that into one agreed sequence:

- a short batch is padded to `size` rows by repeating its rows (:func:`pad_rows`, the real rows first);
- every step the ranks agree, over a small gloo group, whether any of them still has a batch (:func:`any_rank`);
- while one has, a rank that has run out forwards a filler: a copy of its last real batch (or, when its chunk of
  the data held no rows at all, the `fallback` batch) with 0 valid rows.

The consumer trains / evaluates only the first `valid` rows of each batch: padded and filler rows are invalid (no
loss, no signal, no metric).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from recdistill.data.batch import Batch
from recdistill.data.loader import BatchLoader, Position, Positioned


def pad_rows(batch: Batch, size: int) -> Batch:
    """`batch` with its rows repeated up to `size` rows, the real ones first (so `[:len(batch)]` are the real)."""
    return batch if len(batch) == size else batch.select(torch.arange(size, device=batch.sample_id.device) % len(batch))


def any_rank(flag: bool, group: dist.ProcessGroup) -> bool:
    """Collective over `group`: whether `flag` is true on any rank (a one-element MAX all-reduce on the host)."""
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


class LockstepBatches:
    """`(batch of exactly size rows, valid rows first in it)` per step until no rank of `group` has data.

    Collective: every rank calls :meth:`next` (or iterates) at every step. `taken` counts the real batches taken
    from `batches`; `exhausted` says this rank's batches have run out (it forwards fillers from then on). Over a
    :class:`BatchLoader` it also tracks the data position (`position`: where the next batch starts; `last`: where
    the last one taken started), and :meth:`state` / :meth:`seek` save and restore it without regenerating any
    consumed batch. The iterator over `batches` is opened at the first call, so a resumed run can seek first.
    """

    def __init__(self, batches: BatchLoader | Iterable[Batch], size: int, group: dist.ProcessGroup,
                 fallback: Callable[[], Batch]) -> None:
        self.size, self.group = size, group
        self._batches, self._it = batches, None
        self._loader = batches if isinstance(batches, BatchLoader) else None
        self._fallback = fallback
        self.taken = 0
        self.exhausted = False
        self.position: Position | None = None  # None: the beginning
        self.last: Position | None = None
        self._filler: Batch | None = None

    def _iter(self) -> Iterator[Batch]:
        if self._it is None:
            self._it = self._track(self._loader.stream(self.position)) if self._loader else iter(self._batches)
        return self._it

    def _track(self, stream: Iterator[Positioned]) -> Iterator[Batch]:
        for p in stream:
            self.last, self.position = p.start, p.end
            yield p.batch

    def state(self) -> dict:
        """This rank's data position, JSON-able (what a checkpoint stores): real batches taken, exhausted, and over
        a BatchLoader the position of the next batch and of the last one taken."""
        pos = {"batches": self.taken, "exhausted": self.exhausted}
        if self._loader is not None:
            pos.update(position=self.position and self.position.state(), last=self.last and self.last.state())
        return pos

    def seek(self, state: dict) -> None:
        """Resume at a data position saved by :meth:`state`, in O(1): the stream restarts at `position`, and only an
        exhausted rank's filler (its last real batch, forwarded as before the restart) is read again, from `last`,
        when it is needed."""
        if self._loader is None or state.get("position", "absent") == "absent":
            raise ValueError("seek: needs a BatchLoader and a state with a 'position' (else skip(), which replays)")
        self.position = None if state["position"] is None else Position.from_state(state["position"])
        self.last = None if state["last"] is None else Position.from_state(state["last"])
        self.taken, self.exhausted = int(state["batches"]), bool(state["exhausted"])
        self._it, self._filler = None, None

    def skip(self, taken: int, exhausted: bool) -> None:
        """Resume at a data position by replay: take `taken` real batches without forwarding them (the loader is
        deterministic), the last of them becoming the filler an exhausted rank forwards, as before the restart.
        For checkpoints that hold no position; costs as much data work as the batches it skips."""
        it = self._iter()
        for _ in range(taken):
            self._filler = next(it, None)
            if self._filler is None:
                raise RuntimeError(f"resume: the data has fewer than {taken} batches for rank {dist.get_rank()}")
        self.taken, self.exhausted = taken, exhausted

    def _filler_batch(self) -> Batch:
        """The batch an exhausted rank forwards: its last real batch (re-read from its start position after a
        seek), or the fallback when its chunks held no rows at all."""
        if self._filler is None and self._loader is not None and self.last is not None:
            self._filler = next(self._loader.stream(self.last, workers=0, prefetch=0)).batch
        if self._filler is None:
            self._filler = self._fallback()
        return self._filler

    def next(self) -> tuple[Batch, int] | None:
        """The next padded batch and its number of valid rows, or None once no rank has data (on every rank)."""
        batch = None if self.exhausted else next(self._iter(), None)
        self.exhausted = batch is None
        if not any_rank(batch is not None, self.group):
            return None
        if batch is None:
            return pad_rows(self._filler_batch(), self.size), 0
        self.taken += 1
        self._filler = batch
        return pad_rows(batch, self.size), len(batch)

    def __iter__(self) -> Iterator[tuple[Batch, int]]:
        while (nxt := self.next()) is not None:
            yield nxt
