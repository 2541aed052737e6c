"""RL rewards in one process: the built-in rules, user functions by import path, the
weighted sum, the spec check, and failing parts (dropped or stopping the run)."""
import math

import numpy as np
import pytest

from tidal.config.schema_rl import RLRewardConfig
from tidal.rlhf.rewards import RULES, RewardError, RewardScorer, check_reward_config, load_function

HERE = "tests.unit.test_rl_rewards"
NOT_CALLABLE = 3


# user reward functions, referred to by import path -----------------------------------


def has_yes(prompts, completions, metadata):
    return [1.0 if "yes" in c else 0.0 for c in completions]


def id_count(prompts, completions, metadata, completion_ids=None):
    return [float(len(ids)) for ids in completion_ids]


def meta_score(prompts, completions, metadata, **kwargs):
    assert list(kwargs) == ["completion_ids"] and len(kwargs["completion_ids"]) == len(completions)
    return [float(m.get("score", 0)) for m in metadata]


def explodes_on_boom(prompts, completions, metadata):
    out = []
    for c in completions:
        if "boom" in c:
            raise RuntimeError(f"cannot score {c!r}")
        out.append(2.0)
    return out


def one_too_many(prompts, completions, metadata):
    return [1.0] * (len(completions) + 1)


def nan_on_odd(prompts, completions, metadata):
    return [float("nan") if "odd" in c else 1.0 for c in completions]


# helpers -------------------------------------------------------------------------------


def cfg(**kw):
    kw.setdefault("model", None)
    return RLRewardConfig(**kw)


def rule(name, completions, metadata=None, ids=None, **kw):
    n = len(completions)
    return RULES[name](["p"] * n, completions, metadata or [{}] * n, ids or [[0]] * n, cfg(**kw))


def score(c, completions, metadata=None, ids=None, pool=None, sequences=None):
    n = len(completions)
    return RewardScorer(c, pool).score(["p"] * n, completions, ids or [[1, 2]] * n,
                                       metadata or [{}] * n, sequences)


class FakePool:
    """A reward model stand-in: the score of a sequence is the sum of its ids."""

    def __init__(self, fail_on=None, error=ValueError):
        self.fail_on, self.error, self.calls = fail_on, error, 0

    def score(self, sequences):
        self.calls += 1
        if self.fail_on is not None and any(self.fail_on in s for s in sequences):
            raise self.error("bad token")
        return np.array([float(sum(s)) for s in sequences])


# rules -----------------------------------------------------------------------------------


def test_exact_match_uses_math_equivalence_and_plain_strings():
    completions = ["0.5", "The answer is \\boxed{2}.", "  Paris \n", "3", "1/2", "paris", "2", "anything"]
    answers = ["1/2", 2, "Paris", "4", "\\frac{1}{2}", "Paris", None, "x"]
    meta = [{"answer": a} for a in answers[:6]] + [{"answer": None}, {"other": "x"}]
    assert rule("exact_match", completions, meta) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # the field is configurable
    assert rule("exact_match", ["42"], [{"target": "42"}], answer_field="target") == [1.0]


def test_prefix_match_rewards_each_correct_leading_character():
    completions = ["  123xx", "12345678", "", "9", "12345", "1"]
    meta = [{"answer": "12345"}] * 5 + [{}]
    assert rule("prefix_match", completions, meta) == pytest.approx([0.6, 1.0, 0.0, 0.0, 1.0, 0.0])


def test_format_and_length_rules():
    got = rule("format", ["<a>1</a>", "1", "x <a>2</a> y"], format_pattern=r"<a>\d+</a>")
    assert got == [1.0, 0.0, 1.0]
    assert rule("format", [" ", "a"]) == [0.0, 1.0]  # default: any non-space
    ids = [[0] * 16, [0] * 8, [0] * 24, []]
    assert rule("length", ["x"] * 4, ids=ids, length_target=16) == [0.0, -0.5, -0.5, -1.0]


# the weighted sum ------------------------------------------------------------------------


def test_parts_are_weighted_and_summed():
    c = cfg(model="auto", model_weight=0.5, rules=["format", "length"], rule_weights=[2.0, 1.0],
            functions=[f"{HERE}:has_yes", f"{HERE}:id_count"], function_weights=[-1.0, 0.25],
            format_pattern="^y", length_target=2)
    completions, ids = ["yes", "no", "y"], [[5, 6], [7], [8, 9, 10, 11]]
    seqs = [[1, 2, 5, 6], [1, 7], [3, 8, 9, 10, 11]]
    r = score(c, completions, ids=ids, pool=FakePool(), sequences=seqs)
    assert list(r.parts) == ["model", "format", "length", f"{HERE}:has_yes", f"{HERE}:id_count"]
    np.testing.assert_array_equal(r.parts["model"], [14, 8, 41])
    np.testing.assert_array_equal(r.parts["format"], [1, 0, 1])
    np.testing.assert_array_equal(r.parts["length"], [0, -0.5, -1])
    np.testing.assert_array_equal(r.parts[f"{HERE}:has_yes"], [1, 0, 0])
    np.testing.assert_array_equal(r.parts[f"{HERE}:id_count"], [2, 1, 4])
    want = [0.5 * 14 + 2 - 1 + 0.5, 0.5 * 8 - 0.5 + 0.25, 0.5 * 41 + 2 - 1 + 1.0]
    np.testing.assert_allclose(r.total, want)
    assert r.total.dtype == np.float64 and not r.dropped.any() and r.errors == {}
    m = r.metrics()
    assert m["reward"] == pytest.approx(np.mean(want)) and m["reward/dropped"] == 0
    assert m["reward/format"] == pytest.approx(2 / 3)


def test_user_functions_get_completion_ids_only_when_they_ask():
    c = cfg(functions=[f"{HERE}:meta_score", f"{HERE}:has_yes"])
    r = score(c, ["yes", "no"], metadata=[{"score": 3}, None])
    np.testing.assert_array_equal(r.total, [4.0, 0.0])
    assert load_function(f"{HERE}:has_yes") is has_yes
    assert load_function("os.path:join") is __import__("os").path.join
    for spec, err in [("nocolon", ValueError), ("tests.unit.nope:fn", ModuleNotFoundError),
                      (f"{HERE}:missing", AttributeError), (f"{HERE}:NOT_CALLABLE", TypeError)]:
        with pytest.raises(err):
            load_function(spec)


def test_the_model_part_needs_a_pool_and_sequences():
    with pytest.raises(ValueError, match="pool"):
        RewardScorer(cfg(model="auto"))
    with pytest.raises(ValueError, match="sequences"):
        score(cfg(model="auto"), ["a"], pool=FakePool())
    with pytest.raises(ValueError, match="metadata"):
        RewardScorer(cfg(rules=["format"])).score(["p"], ["a"], [[1]], [])


# the spec check --------------------------------------------------------------------------


def test_check_reward_config_names_each_bad_key(tmp_path):
    assert check_reward_config(cfg(rules=["format"], functions=[f"{HERE}:has_yes"])) == []
    assert check_reward_config(cfg(model=str(tmp_path))) == []
    assert check_reward_config(RLRewardConfig()) == []  # model "auto"

    def one(**kw):
        p = check_reward_config(cfg(**kw))
        assert len(p) == 1, p
        return p[0]

    assert one().startswith("reward: no parts")
    assert one(rules=["format", "foo"]) == ("reward.rules[1]: unknown rule 'foo'; allowed: "
                                            "exact_match, format, length, prefix_match")
    assert one(rules=["format", "format"]).startswith("reward.rules[1]: 'format' is listed twice")
    msg = one(functions=[f"{HERE}:has_yes", "tests.unit.nope:fn"])
    assert msg.startswith("reward.functions[1]: cannot import 'tests.unit.nope:fn': ModuleNotFoundError"), msg
    assert one(functions=[f"{HERE}:missing"]).startswith(f"reward.functions[0]: cannot import '{HERE}:missing'")
    assert one(functions=["bad"]).startswith("reward.functions[0]: cannot import 'bad': ValueError")
    assert one(rules=["format"], rule_weights=[1.0, 2.0]).startswith(
        "reward.rule_weights: 2 weight(s) for 1 rule(s)")
    assert one(functions=[f"{HERE}:has_yes"], function_weights=[1.0, 2.0]).startswith(
        "reward.function_weights: 2 weight(s) for 1 function(s)")
    assert one(rules=["format"], rule_weights=[math.nan]).startswith("reward.rule_weights[0]")
    assert one(rules=["format"], format_pattern="(").startswith(
        "reward.format_pattern: '(' is not a valid regular expression")
    assert one(rules=["length"], length_target=0).startswith("reward.length_target")
    assert one(model="auto", model_actors=0).startswith("reward.model_actors")
    assert one(rules=["format"], on_error="ignore").startswith("reward.on_error")


# failing parts ---------------------------------------------------------------------------


def test_a_raising_function_drops_only_its_samples():
    c = cfg(rules=["format"], functions=[f"{HERE}:explodes_on_boom"])
    r = score(c, ["ok", "boom", "fine", "boom!"])
    np.testing.assert_array_equal(r.dropped, [False, True, False, True])
    assert r.errors == {f"{HERE}:explodes_on_boom": 2}
    np.testing.assert_array_equal(r.total, [3.0, 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(r.parts["format"], [1, 1, 1, 1])  # other parts still scored
    assert r.metrics()["reward"] == 3.0 and r.metrics()["reward/dropped"] == 2

    with pytest.raises(RewardError, match=r"explodes_on_boom.*RuntimeError: cannot score 'boom'"):
        score(cfg(functions=[f"{HERE}:explodes_on_boom"], on_error="stop"), ["ok", "boom"])


def test_wrong_counts_and_non_finite_values_are_failures():
    r = score(cfg(rules=["format"], functions=[f"{HERE}:one_too_many"]), ["a", "b", "c"])
    assert r.dropped.all() and r.errors == {f"{HERE}:one_too_many": 3}
    np.testing.assert_array_equal(r.total, [0, 0, 0])
    with pytest.raises(RewardError, match="one_too_many.*returned 4 values for 3 samples"):
        score(cfg(functions=[f"{HERE}:one_too_many"], on_error="stop"), ["a", "b", "c"])

    r = score(cfg(functions=[f"{HERE}:nan_on_odd"]), ["even", "odd", "even"])
    np.testing.assert_array_equal(r.dropped, [False, True, False])
    np.testing.assert_array_equal(r.total, [1.0, 0.0, 1.0])
    assert np.isfinite(r.parts[f"{HERE}:nan_on_odd"]).all()
    with pytest.raises(RewardError, match="nan_on_odd.*sample 1"):
        score(cfg(functions=[f"{HERE}:nan_on_odd"], on_error="stop"), ["even", "odd"])


def test_model_failures_on_samples_are_isolated_but_a_dead_model_stops():
    c = cfg(model="auto", rules=["format"])
    pool = FakePool(fail_on=99)
    r = score(c, ["a", "b", "c"], pool=pool, sequences=[[1], [2, 99], [3]])
    np.testing.assert_array_equal(r.dropped, [False, True, False])
    np.testing.assert_array_equal(r.total, [2.0, 0.0, 4.0])
    assert r.errors == {"model": 1} and pool.calls == 4
    with pytest.raises(RewardError, match="no answer"):
        score(c, ["a"], pool=FakePool(fail_on=1, error=lambda m: RewardError("no answer")), sequences=[[1]])
