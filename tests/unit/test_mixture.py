import numpy as np
import pytest

from tidal.data.mixture import plan, summary


def _data():
    rng = np.random.default_rng(0)
    sources = np.array(["web"] * 300 + ["books"] * 100 + ["code"] * 50, dtype=object)
    lengths = rng.integers(50, 150, size=len(sources))
    is_val = np.zeros(len(sources), dtype=bool)
    is_val[::20] = True
    return sources, lengths, is_val


def test_downsample_reaches_shares_without_repeats():
    sources, lengths, is_val = _data()
    weights = {"web": 0.7, "books": 0.2, "code": 0.1}
    counts = plan(sources, lengths, is_val, weights, "downsample", seed=1)
    assert counts.max() == 1 and (counts[is_val] == 1).all()
    s = summary(sources, lengths, is_val, counts, weights)
    for name, w in weights.items():
        assert s[name]["effective_share"] == pytest.approx(w, abs=0.02), (name, s)
    assert s["web"]["tokens_used"] == s["web"]["tokens_available"]  # the limiting source is whole
    assert (plan(sources, lengths, is_val, weights, "downsample", seed=1) == counts).all()
    assert not (plan(sources, lengths, is_val, weights, "downsample", seed=2) == counts).all()


def test_upsample_repeats_small_sources_and_drops_nothing():
    sources, lengths, is_val = _data()
    weights = {"web": 1, "books": 1, "code": 1}
    counts = plan(sources, lengths, is_val, weights, "upsample", seed=0)
    assert (counts[~is_val] >= 1).all() and counts[sources == "code"].max() >= 5
    s = summary(sources, lengths, is_val, counts, weights)
    for name in weights:
        assert s[name]["effective_share"] == pytest.approx(1 / 3, abs=0.02)


def test_a_source_left_empty_is_an_error():
    sources, lengths, is_val = _data()
    with pytest.raises(ValueError, match="missing have no training tokens"):
        plan(sources, lengths, is_val, {"web": 1, "missing": 1}, "downsample", seed=0)
