"""LR schedules: the shapes, their ends, and save/restore as data."""

import math

import pytest

from kiln.config import ScheduleConfig
from kiln.schedule import LRSchedule


def build(name, total=100, warmup=10, **kw):
    return LRSchedule.build(ScheduleConfig(name=name, **kw), 1.0, total, warmup)


def test_warmup_is_linear_and_never_zero():
    s = build("cosine")
    assert s.lr(1) == pytest.approx(0.1)
    assert s.lr(5) == pytest.approx(0.5)
    assert s.lr(10) == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_decay_ends_at_final_fraction(name):
    s = build(name, final_lr_fraction=0.1)
    assert s.lr(100) == pytest.approx(0.1)
    lrs = [s.lr(t) for t in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(lrs, lrs[1:])), "decay must be monotone"


def test_cosine_midpoint():
    s = build("cosine", total=110, warmup=10, final_lr_fraction=0.0)
    assert s.lr(60) == pytest.approx(0.5)
    assert s.lr(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_wsd_holds_then_decays_in_the_last_fraction():
    s = build("wsd", total=110, warmup=10, decay_fraction=0.2, final_lr_fraction=0.0)
    assert s.lr(90) == 1.0
    assert s.lr(100) == pytest.approx(0.5)
    assert s.lr(110) == 0.0


def test_constant_stays_at_peak():
    s = build("constant")
    assert s.lr(11) == s.lr(100) == s.lr(1000) == 1.0


def test_schedule_round_trips_through_state_dict():
    s = build("cosine")
    t = LRSchedule([])
    t.load_state_dict(s.state_dict())
    assert [t.lr(i) for i in range(1, 120)] == [s.lr(i) for i in range(1, 120)]


def test_scaling_the_rest_of_a_schedule_keeps_the_past_and_scales_the_future_exactly():
    cfg = ScheduleConfig(name="cosine", final_lr_fraction=0.1)
    s = LRSchedule.build(cfg, 1e-2, 100, 10)
    for at in (5, 40):  # inside the warmup and part-way along the cosine
        scaled = s.scaled_after(at, 0.25)
        assert all(scaled.lr(k) == s.lr(k) for k in range(1, at + 1))
        assert all(scaled.lr(k) == pytest.approx(0.25 * s.lr(k), rel=1e-12)
                   for k in range(at + 1, 121))
        again = LRSchedule.from_state(scaled.state_dict())  # saved and read back
        assert all(again.lr(k) == scaled.lr(k) for k in range(1, 121))
