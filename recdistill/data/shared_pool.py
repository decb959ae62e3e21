"""Shared-memory arenas that loader workers reuse from part to part (recdistill/data/loader.py).

A tensor a worker process hands to the training process must be in shared memory. Fresh shared memory per part is
slow: every 4 KiB page is faulted in and zeroed, and every tensor is sent as its own file descriptor over a socket;
at 1,024 history events a part's 25 MB of fresh pages cost about as much as making the events. So each worker keeps
up to `slots` arenas (one shared uint8 tensor each) and places all of a part's tensors in one of them: the source's
large buffers directly (:func:`recdistill.data.batch.empty_buffer`), the small ones by a copy at the end.

A slot's life: free (flag 0) -> the worker takes it for one part (flag 1) and sends the part -> the training process
maps the arena and, once no tensor of its own refers to that mapping any more (a storage weak reference expires),
sets the flag back to 0. The flags are a small shared tensor the workers are given when they start. A slot is therefore
reused only after the training process has let go of every batch cut from it; with no free slot (a consumer that
keeps many batches) the worker uses fresh shared memory, as without arenas. Batches must not be sent on to another
process while held: that process's mapping would not be seen here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

_ALIGN = 64  # bytes: every placed tensor starts on a cache line (and any dtype's alignment)
_HEADROOM = 1.25  # an arena is sized to the largest part seen so far times this (parts differ in history length)


def new_flags(workers: int, slots: int) -> torch.Tensor:
    """The [workers, slots] busy flags, in shared memory, handed to the workers as they start."""
    return torch.zeros(workers, slots, dtype=torch.int32).share_memory_()


def _fresh(n: int, dtype: torch.dtype) -> torch.Tensor:
    """[n] uninitialised, in new shared memory. Made there directly: `empty(n).share_memory_()` would fault in and
    copy n private pages too, and its shared pages all at once rather than as they are written."""
    if n == 0:
        return torch.empty(0, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(n * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, (n,), (1,))


class WorkerArenas:
    """One worker's arenas; `flags` is its row of :func:`new_flags`. Per part: :meth:`begin`; the source allocates
    through :meth:`alloc`; :meth:`place` copies the part's other tensors in; :meth:`finish` gives its lease."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags.numpy()
        self.arenas: list[torch.Tensor | None] = [None] * len(self.flags)
        self.largest = 0  # bytes the largest part so far needed
        self.slot: int | None = None
        self.used = 0

    def begin(self) -> None:
        """Take a free slot for the next part (none free: fresh shared memory for this part)."""
        free = np.flatnonzero(self.flags == 0)
        self.slot, self.used = (int(free[0]) if len(free) else None), 0
        if self.slot is None:
            return
        self.flags[self.slot] = 1
        arena = self.arenas[self.slot]
        if self.largest and (arena is None or arena.numel() < self.largest):
            self.arenas[self.slot] = None  # dropped first: the old and the new arena are never both held here
            self.arenas[self.slot] = _fresh(int(self.largest * _HEADROOM) + _ALIGN, torch.uint8)

    def alloc(self, n: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """An uninitialised [n] tensor in this part's arena, or fresh shared memory where it has no room."""
        out = self._take(n, dtype)
        return _fresh(n, dtype) if out is None else out

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """`t`, or an equal tensor in this part's arena (a copy) when it is elsewhere and the arena has room."""
        if self._in_arena(t) or t.is_shared():  # shared already: made by alloc (and counted) where it had no room
            return t
        out = self._take(t.numel(), t.dtype)
        return t if out is None else out.view(t.shape).copy_(t)  # no room: the DataLoader shares t as it would

    def _take(self, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        """[n] of `dtype` from the arena (None: no arena or no room); counted either way, to size the arenas."""
        at = -(-self.used // _ALIGN) * _ALIGN
        self.used = at + n * dtype.itemsize
        arena = self.arenas[self.slot] if self.slot is not None else None
        if arena is None or self.used > arena.numel() or n == 0:
            return None
        return arena[at:self.used].view(dtype)

    def _in_arena(self, t: torch.Tensor) -> bool:
        arena = self.arenas[self.slot] if self.slot is not None else None
        return arena is not None and t.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()

    def finish(self) -> tuple[int, torch.Tensor] | None:
        """(slot, arena) of the part just made, or None when it used no arena; the arena is sent with the part."""
        self.largest = max(self.largest, self.used)
        slot, self.slot = self.slot, None
        if slot is None or self.arenas[slot] is None or self.used == 0:
            if slot is not None:
                self.flags[slot] = 0
            return None
        return slot, self.arenas[slot]


class Releaser:
    """Training-process side: watches the arenas of received parts and frees their slots once released."""

    def __init__(self, flags: torch.Tensor) -> None:
        self.flags = flags.numpy()
        self.held: list[tuple[StorageWeakRef, int, int]] = []

    def received(self, worker: int, slot: int, arena: torch.Tensor) -> None:
        """A part of `worker` in `slot` arrived (`arena`: its tensor there, to be dropped by the caller)."""
        self.held.append((StorageWeakRef(arena.untyped_storage()), worker, slot))

    def sweep(self) -> None:
        """Free the slots whose arena no tensor here refers to any more."""
        still = []
        for ref, w, s in self.held:
            if ref.expired():
                self.flags[w, s] = 0
            else:
                still.append((ref, w, s))
        self.held = still
