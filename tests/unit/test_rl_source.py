"""The RL source's micro-batches and the policy objective on them: responses are the only
targets, per-token fields sit at the positions that predict them, and at the rollout's own
weights the surrogate's gradient is the policy gradient (ratio 1)."""
from types import SimpleNamespace

import pytest
import torch

from tidal.config import RLHFConfig
from tidal.objectives.logprobs import IGNORE
from tidal.objectives.policy import PolicyObjective
from tidal.rlhf.source import RolloutSource


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def rows():
    return [{"prompt": [5, 6, 7], "response": [8, 9], "rollout_logp": [-1.0, -2.0], "keep": True,
             "advantage": 1.5},
            {"prompt": [4], "response": [10, 11, 12], "rollout_logp": [-0.5, -0.5, -0.5], "keep": True,
             "advantage": -0.5},
            {"prompt": [3, 3], "response": [13], "rollout_logp": [-3.0], "keep": False, "advantage": 2.0}]


def source(world=1, rank=0, **alg):
    from dataclasses import replace

    cfg = RLHFConfig()
    cfg = replace(cfg, algorithm=replace(cfg.algorithm, kl_coef=0.0, **alg))
    return RolloutSource(cfg, [], [], rank, world, torch.device("cpu"), pad_id=0)


def with_old(model, src, rs):
    src._learner_logps(SimpleNamespace(model=model), None, rs)
    return rs


def test_batch_layout():
    model, src = tiny(), source()
    rs = with_old(model, src, rows())
    b = src.make_batch(rs)
    assert b["input_ids"].tolist()[1] == [4, 10, 11, 12, 0]
    assert b["targets"].tolist()[0] == [IGNORE, IGNORE, 8, 9, IGNORE]
    assert b["targets"].tolist()[1] == [10, 11, 12, IGNORE, IGNORE]
    assert (b["targets"][2] == IGNORE).all()  # a dropped sample trains nothing
    assert b["advantages"][0].tolist() == [0, 0, 1.5, 1.5, 0]
    assert b["rollout_logp"][1, :3].tolist() == [-0.5, -0.5, -0.5]
    assert int(b["tokens"]) == 5 + 4 + 3
    torch.testing.assert_close(b["old_logp"][0, 2:4], rs[0]["old_logp"])


def test_on_policy_surrogate_is_the_policy_gradient():
    model, src = tiny(), source()
    rs = with_old(model, src, rows()[:2])
    b = src.make_batch(rs)
    obj = PolicyObjective(src.cfg.algorithm, max_tokens=4)
    loss_sum, weight, stats = obj.loss(model, b)
    assert float(weight) == 5 and float(stats["ratio"][0] / stats["ratio"][1]) == pytest.approx(1.0)
    assert obj.ratio_range == pytest.approx((1.0, 1.0))  # on-policy: every ratio is 1
    assert float(loss_sum.detach()) == pytest.approx(-(1.5 * 2 - 0.5 * 3), abs=1e-5)  # -sum(A * ratio)
    loss_sum.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # REINFORCE: -sum_t A_t log p(token_t), at the same weights
    from tidal.objectives.logprobs import model_token_logprobs

    logp, _ = model_token_logprobs(model, b["targets"], input_ids=b["input_ids"])
    (-(logp * b["advantages"]).sum()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


def test_minibatches_split_evenly_over_ranks():
    src = source(world=2, rank=1, minibatches=2)
    assert src.my_rows(16) == [[4, 5, 6, 7], [12, 13, 14, 15]]
