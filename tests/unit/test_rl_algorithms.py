"""Golden tests for tidal.rlhf.algorithms: every advantage estimator against a Python-loop
reference (several group sizes, equal and mixed groups), the clipped policy loss's value and
gradient against a per-token reference with hand-derived gradients (both clip bounds, dual
clip, every aggregation, IS weights, padding), the KL estimators and their gradients, the
aggregation contract (hand examples, micro-batch invariance), truncated IS and the logp gap."""
import math
import statistics

import pytest
import torch

from tidal.rlhf.algorithms import (ADVANTAGES, aggregate, compute_advantages, equal_groups, kl_penalty,
                                   logp_gap, policy_loss, truncated_is)

D = torch.float64
EPS = 1e-6


# ---------------------------------------------------------------------------- advantages

def ref_advantages(name, rewards, G, eps=EPS):
    """Direct per-sample loops over plain floats (statistics.stdev is the unbiased std)."""
    r = [float(x) for x in rewards]
    groups = [r[i:i + G] for i in range(0, len(r), G)]
    out = []
    for g in groups:
        equal = max(g) == min(g)
        m = statistics.fmean(g)
        for j, x in enumerate(g):
            if equal:
                out.append(0.0)
            elif name == "grpo":
                out.append((x - m) / (statistics.stdev(g) + eps))
            elif name in ("dr_grpo", "reinforce_pp_baseline"):
                out.append(x - m)
            elif name == "rloo":
                out.append(x - sum(y for k, y in enumerate(g) if k != j) / (G - 1))
    if name == "reinforce_pp_baseline":
        m, s = statistics.fmean(out), statistics.stdev(out)
        eq = [max(g) == min(g) for g in groups for _ in g]
        out = [0.0 if e else (a - m) / (s + eps) for a, e in zip(out, eq)]
    return torch.tensor(out, dtype=D)


def mixed_rewards(P, G, seed):
    """Continuous groups, binary groups and constant groups in one batch."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(P):
        kind = i % 3
        if kind == 0:
            rows.append(torch.randn(G, generator=gen, dtype=D))
        elif kind == 1:
            rows.append(torch.randint(0, 2, (G,), generator=gen).to(D))
        else:
            rows.append(torch.full((G,), 0.1, dtype=D) * (i % 5))
    return torch.cat(rows)


def test_registry_holds_the_four_estimators():
    assert set(ADVANTAGES) == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
@pytest.mark.parametrize("G", [2, 3, 4, 8])
def test_estimators_match_loop_reference(name, G):
    rewards = mixed_rewards(P=7, G=G, seed=G)
    got = compute_advantages(name, rewards, G)
    assert got.shape == rewards.shape
    torch.testing.assert_close(got, ref_advantages(name, rewards, G), rtol=1e-10, atol=1e-12)


def test_estimators_differ_where_they_should():
    # catches an estimator registered under the wrong name
    r = torch.tensor([0.0, 1.0, 1.0, 3.0], dtype=D)
    outs = {n: compute_advantages(n, r, 4) for n in ADVANTAGES}
    torch.testing.assert_close(outs["dr_grpo"], torch.tensor([-1.25, -0.25, -0.25, 1.75], dtype=D))
    torch.testing.assert_close(outs["rloo"], outs["dr_grpo"] * 4 / 3)  # G/(G-1) * (r - mean)
    torch.testing.assert_close(outs["grpo"], outs["dr_grpo"] / (r.std() + EPS))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_equal_groups_give_exactly_zero(name):
    # 0.1 * 3 / 3 != 0.1 in float64, and the float32 mean of seven 0.1 is off too: a naive
    # r - mean is ~1e-17 there, and GRPO's division by a ~1e-17 std would blow it up
    for rewards, G in [(torch.full((3,), 0.1, dtype=D), 3), (torch.full((7,), 0.1), 7)]:
        assert (rewards - rewards.mean()).abs().max() > 0  # the trap is real
        batch = torch.cat([rewards, torch.arange(G, dtype=rewards.dtype) ** 2])  # no sample at its mean
        adv = compute_advantages(name, batch, G)
        assert adv.dtype == rewards.dtype
        assert torch.equal(adv[:G], torch.zeros(G, dtype=rewards.dtype))
        assert (adv[G:] != 0).all()


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"])
def test_all_equal_batch_is_zero_not_nan(name):
    for rewards in (torch.zeros(8), torch.ones(8), torch.full((8,), 0.1, dtype=D)):
        adv = compute_advantages(name, rewards, 4)
        assert torch.equal(adv, torch.zeros_like(rewards))


def test_integer_rewards_are_accepted():
    adv = compute_advantages("dr_grpo", torch.tensor([0, 1, 1, 1]), 2)
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5, 0.0, 0.0], dtype=D))


@pytest.mark.parametrize("n, G", [(8, 1), (8, 0), (5, 2), (9, 4)])
def test_bad_group_layout_refused(n, G):
    with pytest.raises(ValueError, match="rollout.n"):
        compute_advantages("grpo", torch.zeros(n), G)
    with pytest.raises(ValueError, match="rollout.n"):
        equal_groups(torch.zeros(n), G)


def test_unknown_estimator_lists_the_allowed_ones():
    with pytest.raises(KeyError, match="dr_grpo.*grpo.*reinforce_pp_baseline.*rloo"):
        compute_advantages("gae", torch.zeros(4), 2)


def test_equal_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.1, 0.1 + 1e-12], dtype=D)
    assert equal_groups(r, 2).tolist() == [True, True, False, False, True, True, False, False]
    assert equal_groups(r, 4).tolist() == [False] * 4 + [False] * 4
    assert equal_groups(torch.full((6,), 0.1), 3).all()


# ---------------------------------------------------------------------------- KL

def test_kl_values():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=D)
    ref = torch.tensor([-1.5, -2.0, -0.1], dtype=D)
    d = [0.5, 0.0, -0.4]
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor(d, dtype=D))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([x * x / 2 for x in d], dtype=D))
    k3 = [math.exp(-x) - 1 + x for x in d]
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor(k3, dtype=D))
    assert (kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()


def test_kl_gradients():
    gen = torch.Generator().manual_seed(0)
    logp0 = torch.randn(4, 5, generator=gen, dtype=D)
    ref = torch.randn(4, 5, generator=gen, dtype=D)
    expected = {"k1": torch.ones_like(logp0), "k2": logp0 - ref, "k3": 1 - torch.exp(ref - logp0)}
    for kind, grad in expected.items():
        logp = logp0.clone().requires_grad_()
        kl_penalty(logp, ref, kind).sum().backward()
        torch.testing.assert_close(logp.grad, grad, msg=kind)


def test_k3_is_finite_for_extreme_ratios():
    logp = torch.tensor([0.0, -200.0], requires_grad=True)
    ref = torch.tensor([-200.0, 0.0])
    out = kl_penalty(logp, ref, "k3")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logp.grad).all()


def test_unknown_kl_kind():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")


# ---------------------------------------------------------------------------- aggregate

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], dtype=D)
MASK = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])


@pytest.mark.parametrize("agg, expected", [("token_mean", (7.0, 3.0)),
                                           ("seq_mean_token_mean", (1.5 + 4.0, 2.0)),
                                           ("seq_mean_token_sum_norm", ((3.0 + 4.0) / 4, 2.0))])
def test_aggregate_hand_examples(agg, expected):
    s, w = aggregate(VALUES, MASK, agg, max_len=4)
    assert s.dim() == 0 and w.dim() == 0 and w.is_floating_point()
    assert (s.item(), w.item()) == expected


def test_aggregate_ignores_garbage_at_padding():
    v = VALUES.clone()
    v[~MASK] = float("nan")
    v[2, 0] = float("inf")
    for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        s, w = aggregate(v, MASK, agg, max_len=4)
        assert s.item() == aggregate(VALUES, MASK, agg, max_len=4)[0].item()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregate_is_invariant_to_the_micro_batch_split(agg):
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(6, 5, generator=gen, dtype=D)
    m = torch.rand(6, 5, generator=gen) > 0.4
    m[3] = False  # a sequence with no counted token
    s, w = aggregate(v, m, agg, max_len=5)
    parts = [aggregate(v[i:j], m[i:j], agg, max_len=5) for i, j in [(0, 1), (1, 4), (4, 6)]]
    torch.testing.assert_close(sum(p[0] for p in parts) / sum(p[1] for p in parts), s / w)


def test_aggregate_counts_in_float32_for_bf16():
    s, w = aggregate(torch.ones(1, 1000, dtype=torch.bfloat16), torch.ones(1, 1000, dtype=torch.bool), "token_mean")
    assert w.dtype == torch.float32 and w.item() == 1000 and s.item() == 1000


def test_aggregate_refusals():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate(VALUES, MASK, "seq_sum")
    with pytest.raises(ValueError, match="max_len"):
        aggregate(VALUES, MASK, "seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------- policy loss

def ref_token(lp, old, a, cl, ch, dual, w):
    """One token: (loss, d loss / d logp, clipped branch active, dual bound active), by hand."""
    r = math.exp(lp - old)
    pg1, d1 = -a * r, -a * r
    rc = min(max(r, 1 - cl), 1 + ch)
    pg2, d2 = -a * rc, (-a * r if 1 - cl < r < 1 + ch else 0.0)
    loss, d = (pg1, d1) if pg1 >= pg2 else (pg2, d2)
    dual_on = dual is not None and a < 0 and -a * dual < loss
    if dual_on:
        loss, d = -a * dual, 0.0
    return loss * w, d * w, pg2 > pg1, dual_on


def ref_policy_loss(logp, old, adv, mask, cl, ch, dual, agg, max_len, isw):
    """Loop over sequences and tokens; returns loss_sum, weight, grad [N, L], stats."""
    N, L = logp.shape
    total, weight, grad = 0.0, 0.0, torch.zeros(N, L, dtype=D)
    clip_n, dual_n, ratio_sum, count = 0, 0, 0.0, 0
    for i in range(N):
        toks = [t for t in range(L) if mask[i, t]]
        if not toks:
            continue
        scale = {"token_mean": 1.0, "seq_mean_token_mean": 1.0 / len(toks),
                 "seq_mean_token_sum_norm": 1.0 / max_len}[agg]
        weight += len(toks) if agg == "token_mean" else 1
        for t in toks:
            w = 1.0 if isw is None else float(isw[i, t])
            loss, d, c, du = ref_token(float(logp[i, t]), float(old[i, t]), float(adv[i, t]), cl, ch, dual, w)
            total += loss * scale
            grad[i, t] = d * scale
            clip_n, dual_n, count = clip_n + c, dual_n + du, count + 1
            ratio_sum += math.exp(float(logp[i, t]) - float(old[i, t]))
    return total, weight, grad, {"clip_frac": (clip_n, count), "dual_clip_frac": (dual_n, count),
                                 "ratio": (ratio_sum, count)}


def pg_inputs(seed=0, N=8, L=8):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(N, L, generator=gen, dtype=D) * 3
    logp = old + 0.8 * torch.randn(N, L, generator=gen, dtype=D)  # ratios well outside [0.8, 1.28]
    adv = torch.randn(N, 1, generator=gen, dtype=D).expand(N, L).clone()
    adv[:, -1] = torch.randn(N, generator=gen, dtype=D)  # per-token advantages too
    mask = torch.rand(N, L, generator=gen) > 0.25
    mask[0] = False  # a sequence with nothing to learn from
    mask[1, :] = True
    # garbage at padding: must reach neither the loss nor any gradient
    logp[~mask] = 40.0
    adv[~mask] = 1e6
    return logp, old, adv, mask


CASES = [dict(cl=0.2, ch=0.28, dual=None, isw=False), dict(cl=0.2, ch=0.2, dual=1.5, isw=False),
         dict(cl=0.1, ch=0.3, dual=2.0, isw=True)]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("case", CASES)
def test_policy_loss_value_and_gradient_match_reference(agg, case):
    logp0, old, adv, mask = pg_inputs()
    isw = torch.rand(logp0.shape, generator=torch.Generator().manual_seed(5), dtype=D) * 2 if case["isw"] else None
    cl, ch, dual = case["cl"], case["ch"], case["dual"]
    logp = logp0.clone().requires_grad_()
    s, w, stats = policy_loss(logp, old, adv, mask, cl, ch, dual_clip=dual, agg=agg, max_len=9, is_weights=isw)
    s.backward()
    ref_s, ref_w, ref_grad, ref_stats = ref_policy_loss(logp0, old, adv, mask, cl, ch, dual, agg, 9, isw)
    assert math.isclose(s.item(), ref_s, rel_tol=1e-10) and w.item() == ref_w
    torch.testing.assert_close(logp.grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert set(stats) == {"clip_frac", "dual_clip_frac", "ratio"}
    for k, (num, cnt) in ref_stats.items():
        assert not stats[k][0].requires_grad
        assert math.isclose(stats[k][0].item(), num, rel_tol=1e-10) and stats[k][1].item() == cnt, k


def test_policy_loss_inputs_exercise_every_branch():
    # guards the test above: both clip bounds and the dual bound really are hit
    logp, old, adv, mask = pg_inputs()
    r = torch.exp(logp - old)[mask]
    a = adv[mask]
    assert ((a > 0) & (r > 1.28)).sum() >= 3  # upper clip, positive advantage
    assert ((a < 0) & (r < 0.8)).sum() >= 3  # lower clip, negative advantage
    assert ((a < 0) & (r > 2.0)).sum() >= 2  # dual clip at c=1.5 and c=2
    assert ((r > 0.9) & (r < 1.1)).sum() >= 3  # unclipped tokens


def test_policy_loss_known_tokens():
    # A=+1, ratio e^0.5 > 1.2: clipped at 1.2 -> loss -1.2, no gradient;
    # A=-1, ratio e^1 > c=2: dual bound -> loss 2; A=-1, ratio 1: loss 1, gradient 1
    logp = torch.tensor([[0.5, 1.0, 0.0]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 3, dtype=D)
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=D)
    s, w, stats = policy_loss(logp, old, adv, torch.ones(1, 3, dtype=torch.bool), 0.2, 0.2, dual_clip=2.0)
    s.backward()
    assert (s.item(), w.item()) == pytest.approx((-1.2 + 2.0 + 1.0, 3.0))
    assert logp.grad.tolist() == [[0.0, 0.0, 1.0]]
    assert stats["clip_frac"][0].item() == 1 and stats["dual_clip_frac"][0].item() == 1
    _, _, no_dual = policy_loss(logp, old, adv, torch.ones(1, 3, dtype=torch.bool), 0.2, 0.2)
    assert no_dual["dual_clip_frac"][0].item() == 0


def test_policy_loss_padding_is_inert():
    logp0, old, adv0, mask = pg_inputs()
    isw0 = torch.ones_like(logp0)
    results = []
    for fill, adv_fill, isw_fill in ((40.0, 1e6, 1.0), (float("nan"), 0.0, 1.0), (-1e9, 1.0, 1.0),
                                     (5.0, float("nan"), 1.0), (5.0, 1.0, float("inf"))):
        logp, adv, isw = logp0.clone(), adv0.clone(), isw0.clone()
        logp[~mask], adv[~mask], isw[~mask] = fill, adv_fill, isw_fill
        logp.requires_grad_()
        s, w, stats = policy_loss(logp, old, adv, mask, 0.2, 0.2, dual_clip=3.0, agg="seq_mean_token_mean",
                                  is_weights=isw)
        s.backward()
        assert torch.isfinite(logp.grad).all() and (logp.grad[~mask] == 0).all()
        assert all(torch.isfinite(v).all() for pair in stats.values() for v in pair)
        results.append((s.item(), logp.grad.clone()))
    for s, g in results[1:]:
        assert s == results[0][0] and torch.equal(g, results[0][1])


def test_policy_loss_zero_mask():
    logp, old, adv, _ = pg_inputs()
    s, w, stats = policy_loss(logp, old, adv, torch.zeros_like(adv, dtype=torch.bool), 0.2, 0.2)
    assert s.item() == 0 and w.item() == 0 and stats["ratio"][1].item() == 0


def test_policy_loss_refusals():
    logp, old, adv, mask = pg_inputs()
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, old, adv, mask, 0.2, 0.2, dual_clip=0.9)
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logp, old, adv, mask, 0.2, 0.2, agg="seq_mean_token_sum_norm")


# ---------------------------------------------------------------------------- rollout mismatch

OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0]], dtype=D)
ROLL = torch.tensor([[-1.1, -1.8, -3.5, 9.0], [-1.5, -1.5, -1.0, -1.0]], dtype=D)
IS_MASK = torch.tensor([[True, True, True, False], [True, True, False, False]])


def test_truncated_is_token_level():
    w = truncated_is(OLD, ROLL, IS_MASK, "token", cap=2.0)
    expected = [[math.exp(0.1), math.exp(-0.2), 2.0, 1.0], [math.exp(0.5), math.exp(0.5), 1.0, 1.0]]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=D))


def test_truncated_is_sequence_level():
    w = truncated_is(OLD, ROLL, IS_MASK, "sequence", cap=5.0)
    # row 0: exp(0.1 - 0.2 + 3.0) = 18.2 -> capped at 5; row 1: exp(1.0) = 2.718 uncapped
    expected = [[5.0, 5.0, 5.0, 1.0], [math.e, math.e, 1.0, 1.0]]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=D))
    low = truncated_is(ROLL, OLD, IS_MASK, "sequence", cap=5.0)  # below the cap: untouched
    torch.testing.assert_close(low[0, :3], torch.full((3,), math.exp(-2.9), dtype=D))


def test_truncated_is_is_detached_and_checked():
    old = OLD.clone().requires_grad_()
    assert not truncated_is(old, ROLL, IS_MASK, "token", cap=2.0).requires_grad
    with pytest.raises(ValueError, match="token, sequence"):
        truncated_is(OLD, ROLL, IS_MASK, "tokens", cap=2.0)


def test_logp_gap():
    stats = logp_gap(OLD, ROLL, IS_MASK)
    assert stats["logp_gap_abs"][1].item() == 5
    assert math.isclose(stats["logp_gap_abs"][0].item(), 0.1 + 0.2 + 3.0 + 0.5 + 0.5)
    d = [0.1, -0.2, 3.0, 0.5, 0.5]  # old - rollout; k3 with samples from the rollout engine
    assert math.isclose(stats["logp_gap_kl"][0].item(), sum(math.exp(x) - 1 - x for x in d))
    same = logp_gap(OLD, OLD, IS_MASK)
    assert same["logp_gap_abs"][0].item() == 0 and same["logp_gap_kl"][0].item() == 0
