import math

import pytest

from tidal.config import ScheduleConfig
from tidal.optim import SCHEDULES, Registry, lr_at

TOTAL = 100


def f(name, step, **kw):
    cfg = ScheduleConfig(name=name, **{"warmup_steps": 10, "min_lr_ratio": 0.1, **kw})
    return lr_at(step, TOTAL, 1.0, cfg)


def test_registry_has_all_schedules_and_refuses_duplicates():
    assert {"constant", "cosine", "wsd", "linear", "inverse_sqrt", "polynomial", "one_cycle"} <= set(SCHEDULES)
    with pytest.raises(KeyError, match="already registered"):
        SCHEDULES.register("cosine")(lambda *a: 1.0)
    with pytest.raises(KeyError, match="unknown schedule 'nope'; allowed: constant"):
        SCHEDULES.get_or_raise("nope")
    assert isinstance(SCHEDULES, Registry)


@pytest.mark.parametrize("name", ["constant", "cosine", "wsd", "linear", "inverse_sqrt", "polynomial"])
def test_linear_warmup(name):
    assert f(name, 0) == pytest.approx(0.1)
    assert f(name, 4) == pytest.approx(0.5)
    assert f(name, 9) == pytest.approx(1.0)


def test_constant():
    assert f("constant", 10) == 1.0 and f("constant", 99) == 1.0


def test_cosine_values():
    assert f("cosine", 10) == pytest.approx(1.0)
    mid = 10 + (99 - 10) / 2  # halfway through the decay: halfway between peak and floor
    assert lr_at(int(mid), TOTAL, 1.0, ScheduleConfig("cosine", 10, 0.1)) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))
    assert f("cosine", 99) == pytest.approx(0.1)


def test_linear_values():
    assert f("linear", 10) == pytest.approx(1.0)
    assert f("linear", 99) == pytest.approx(0.1)
    assert f("linear", 10 + 89 // 2) == pytest.approx(1 - 0.9 * (44 / 89))


def test_wsd_plateau_then_cooldown():
    # decay_fraction 0.2 of 100 steps: plateau until step 80, then linear to the floor
    assert f("wsd", 10, decay_fraction=0.2) == 1.0
    assert f("wsd", 79, decay_fraction=0.2) == 1.0
    assert f("wsd", 80, decay_fraction=0.2) == pytest.approx(1.0)
    assert f("wsd", 99, decay_fraction=0.2) == pytest.approx(0.1)
    assert 0.1 < f("wsd", 90, decay_fraction=0.2) < 1.0


def test_inverse_sqrt():
    assert f("inverse_sqrt", 39) == pytest.approx(math.sqrt(10 / 40))
    assert f("inverse_sqrt", 99) == pytest.approx(math.sqrt(10 / 100))


def test_polynomial():
    assert f("polynomial", 10, power=2.0) == pytest.approx(1.0)
    p = (54 - 10) / 89
    assert f("polynomial", 54, power=2.0) == pytest.approx(0.1 + 0.9 * (1 - p) ** 2)
    assert f("polynomial", 99, power=2.0) == pytest.approx(0.1)


def test_one_cycle():
    assert f("one_cycle", 0) == pytest.approx(0.1)
    assert f("one_cycle", 5) == pytest.approx(0.55)
    assert f("one_cycle", 10) == pytest.approx(1.0)
    assert f("one_cycle", 99) == pytest.approx(0.0, abs=1e-12)


def test_peak_lr_scales():
    assert lr_at(50, TOTAL, 3e-4, ScheduleConfig("cosine", 10, 0.1)) == pytest.approx(
        3e-4 * lr_at(50, TOTAL, 1.0, ScheduleConfig("cosine", 10, 0.1)))


def test_warmup_fraction_replaces_warmup_steps():
    from tidal.config import ScheduleConfig
    from tidal.optim import lr_at

    frac = ScheduleConfig(name="cosine", warmup_steps=3, warmup_fraction=0.1)
    steps = ScheduleConfig(name="cosine", warmup_steps=10)
    assert [lr_at(s, 100, 1.0, frac) for s in range(100)] == [lr_at(s, 100, 1.0, steps) for s in range(100)]
    assert lr_at(4, 100, 1.0, frac) == 0.5  # still warming up at step 4 of 10
