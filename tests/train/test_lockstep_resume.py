"""LockstepBatches' data position: a feed restored from `state()` continues exactly where the saved one stood and
reads only the work items from there on (no replay); a state without a position (an older checkpoint) replays."""

import pytest
import torch.distributed as dist
from helpers import assert_same_batch

from recdistill.config import load_config
from recdistill.data.loader import BatchLoader
from recdistill.data.sampling import SamplingConfig
from recdistill.data.world import SyntheticWorld
from recdistill.train.lockstep import LockstepBatches

VIEW = SamplingConfig(name="teacher", r=0.5, q=1.0)


@pytest.fixture
def group():
    """A one-rank gloo group (LockstepBatches agrees with the other ranks at every step)."""
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if mine:
        dist.destroy_process_group()


def feed(world: SyntheticWorld, group, workers: int = 0) -> LockstepBatches:
    loader = BatchLoader(world, [0, 1], 48, view=VIEW, chunk_rows=100, workers=workers)
    return LockstepBatches(loader, 48, group, fallback=lambda: world.read(0, 0, 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_seek_continues_without_replay(group, monkeypatch, workers):
    cfg = load_config(None, ["data.history_len=16", "data.samples_per_day=700", "data.num_days=3"]).data
    world, again = SyntheticWorld(cfg), SyntheticWorld(cfg)  # the resumed feed's own: its reads are counted
    ref = list(feed(world, group))
    assert len(ref) > 10 and any(valid < 48 for _, valid in ref)  # a padded last batch of a day
    reads = []
    if workers == 0:  # (worker processes read in their own copy of the world, pickled to them)
        real = again.read
        monkeypatch.setattr(again, "read", lambda *a, **k: reads.append(a) or real(*a, **k))
    for k in (0, 3, 8, len(ref)):
        first = feed(world, group)
        for _ in range(k):
            first.next()
        state = first.state()
        assert state["batches"] == k and ("position" in state and "last" in state)
        resumed = feed(again, group, workers)
        reads.clear()
        resumed.seek(state)
        rest = list(resumed)
        if workers == 0:
            assert len(reads) == len(list(resumed._loader.items(first.position)))  # only the items from there on
        assert [v for _, v in rest] == [v for _, v in ref[k:]] and resumed.taken == len(ref)
        for i, ((a, _), (b, _)) in enumerate(zip(rest, ref[k:], strict=True)):
            assert_same_batch(a, b, f"resumed at {k}, step {k + i}")
    old = feed(world, group)  # a checkpoint from before positions: replay the first 5 batches
    old.skip(5, False)
    assert [v for _, v in old] == [v for _, v in ref[5:]]
    with pytest.raises(ValueError, match="state with a 'position'"):
        feed(world, group).seek({"batches": 5, "exhausted": False})
