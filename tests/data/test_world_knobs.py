"""The world knobs of the robustness suite (data.world.history_median, positive_rate, traffic_mix, item_effects,
dense_effects): at their defaults the world is bit-identical to the one before they existed; set, each moves what
its field says."""

import hashlib

import numpy as np
import pytest

from recdistill.config import ConfigError, load_config
from recdistill.data.world import SyntheticWorld

DEMO_WORLD = ["data.world.interaction_heredity=1.0", "data.world.interactions=1.5", "data.world.num_users=2000",
              "data.world.num_items=2000"]


def world(*sets: str, history_len: int = 256) -> SyntheticWorld:
    return SyntheticWorld(load_config(None, [f"data.history_len={history_len}", *sets]).data)


def fingerprint(w: SyntheticWorld) -> str:
    """Hash of every task's ground truth and labels, the traffic, dense features and full histories of 200 rows."""
    b = w.read(3, 1000, 1200)
    h = hashlib.sha256()
    for k in ("ctr", "cvr", "watch_time"):
        h.update(b.p_true[k].numpy().tobytes())
        h.update(b.labels[k].numpy().tobytes())
    for t in (b.history.fields["item"], b.history.offsets, b.traffic, b.dense):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(("sets", "digest", "p_ctr"), [
    ([], "a7397860e7553962", [0.21959877014160156, 0.29587844014167786, 0.11053604632616043]),
    (DEMO_WORLD, "9f3fe70680c77865", [0.09798412024974823, 0.04232539236545563, 0.0450507290661335]),
])
def test_default_and_demo_worlds_unchanged_by_the_knobs(sets, digest, p_ctr):
    """Fingerprints taken on the commit before the knobs existed (5dc61b4): the default world and the demo's."""
    w = world(*sets, history_len=2048)
    assert fingerprint(w) == digest
    assert w.read(3, 1000, 1003).p_true["ctr"].tolist() == p_ctr
    # and set explicitly to their defaults
    same = world(*sets, "data.world.history_median=1000", "data.world.item_effects=1", "data.world.dense_effects=1",
                 "data.world.traffic_mix=null", "data.world.positive_rate=null", history_len=2048)
    assert fingerprint(same) == digest


def test_knobs_at_their_defaults_keep_the_teacher_version():
    demo = load_config(None, DEMO_WORLD)
    assert load_config(None, [*DEMO_WORLD, "data.world.item_effects=1.0"]).teacher_digest() == demo.teacher_digest()
    for knob in ("history_median=30", "positive_rate=0.02", "traffic_mix=[1,1,1]", "item_effects=2",
                 "dense_effects=0"):
        assert load_config(None, [*DEMO_WORLD, f"data.world.{knob}"]).teacher_digest() != demo.teacher_digest(), knob


@pytest.mark.parametrize("rate", [0.02, 0.3])
def test_positive_rate_sets_the_click_base_rate(rate):
    w = world(f"data.world.positive_rate={rate}", history_len=8)
    b = w.read(0, 0, 8192)  # the calibration rows: their mean ground truth is the rate
    assert float(b.p_true["ctr"].double().mean()) == pytest.approx(rate, rel=1e-6)
    later = w.read(4, 0, 8000).labels["ctr"].double().mean()  # another day's labels: drift moves it a little
    assert float(later) == pytest.approx(rate, rel=0.25)
    default = float(world(history_len=8).read(4, 0, 8000).labels["ctr"].double().mean())
    assert abs(default - rate) > 0.05


def test_history_median_scales_timeline_lengths():
    def mean_len(*sets: str) -> float:
        b = world(*sets, history_len=20_000).read(3, 0, 600)
        return float(np.diff(b.history.offsets.numpy()).mean())

    default, short, long = mean_len(), mean_len("data.world.history_median=30"), mean_len(
        "data.world.history_median=3000")
    assert short < 0.1 * default and long > 2 * default, (short, default, long)
    # the timelines still grow day by day, however short
    w = world("data.world.history_median=5")
    user, sid = np.arange(50), np.arange(50)
    assert (w.timeline_pos(user, np.full(50, 4), sid) > w.timeline_pos(user, np.full(50, 1), sid)).all()


def test_traffic_mix_sets_the_share_of_each_source():
    b = world("data.world.traffic_mix=[0.1,0.3,0.6]", history_len=8).read(2, 0, 20000)
    share = np.bincount(b.traffic.numpy(), minlength=3) / 20000
    assert np.allclose(share, [0.1, 0.3, 0.6], atol=0.015), share
    with pytest.raises(ConfigError, match="traffic_mix"):
        load_config(None, ["data.world.traffic_mix=[0.5,0.5]"])  # 3 sources, 2 weights


def test_item_and_dense_effects_scale_their_logit_parts():
    def parts(*sets: str) -> dict[str, np.ndarray]:
        return world(*sets, history_len=8).components(2, 0, 3000)[1]

    base, strong, flat = parts(), parts("data.world.item_effects=2.5"), parts("data.world.dense_effects=0")
    for k in ("quality", "tags", "item_popularity"):
        assert np.allclose(strong[k], 2.5 * base[k]) and base[k].std() > 0.05, k
    for k in ("dense_linear", "dense_nonlinear"):
        assert base[k].std() > 0.05 and not flat[k].any(), k
    for k in ("traffic", "interest", "cell", "cat_popularity", "context"):  # the rest is left as it was
        assert np.array_equal(strong[k], base[k]) and np.array_equal(flat[k], base[k]), k
