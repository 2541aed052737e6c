"""PPO's parts: GAE against a direct loop (masks, padding, truncated responses), masked
whitening, the clipped value loss, the adaptive KL controller, the value objective on the
critic's per-token head, and a checkpoint that carries the value model beside the policy."""
import json
import os
from dataclasses import replace

import pytest
import torch

from tidal.config import PretrainConfig, RLHFConfig, from_dict
from tidal.rlhf import algorithms as A


# ---------------------------------------------------------------------------- GAE

def gae_loop(rewards, values, mask, gamma, lam, next_values):
    """The textbook recursion, one row at a time over the row's masked tokens in order."""
    n, L = rewards.shape
    adv, ret = torch.zeros(n, L, dtype=torch.float64), torch.zeros(n, L, dtype=torch.float64)
    for i in range(n):
        idx = [t for t in range(L) if mask[i, t]]
        running, nxt = 0.0, float(next_values[i])
        for t in reversed(idx):
            delta = float(rewards[i, t]) + gamma * nxt - float(values[i, t])
            running = delta + gamma * lam * running
            adv[i, t] = running
            ret[i, t] = running + float(values[i, t])
            nxt = float(values[i, t])
    return adv, ret


def batch(seed=0, n=5, L=7):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, L, generator=g, dtype=torch.float64)
    values = torch.randn(n, L, generator=g, dtype=torch.float64)
    lengths = [7, 3, 1, 5, 0]
    mask = torch.zeros(n, L, dtype=torch.bool)
    for i, k in enumerate(lengths):
        mask[i, :k] = True
    mask[3, 2] = False  # an interior hole: skipped, as if the token were not there
    # garbage where the mask is off must not matter
    rewards[~mask] = float("nan")
    values[~mask] = float("inf")
    boot = torch.tensor([0.0, 0.7, 0.0, -1.3, 0.0], dtype=torch.float64)  # rows 1, 3 truncated
    return rewards, values, mask, boot


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_loop(gamma, lam):
    rewards, values, mask, boot = batch()
    adv, ret = A.gae(rewards, values, mask, gamma, lam, boot)
    ref_adv, ref_ret = gae_loop(rewards, values, mask, gamma, lam, boot)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert torch.isfinite(adv).all() and (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_special_cases():
    rewards, values, mask, boot = batch(1)
    # lambda 1, gamma 1: Monte-Carlo advantage = future rewards (+ bootstrap) - V_t
    adv, ret = A.gae(rewards, values, mask, 1.0, 1.0, boot)
    i, idx = 1, [0, 1, 2]
    for t in idx:
        expect = float(sum(rewards[i, u] for u in idx if u >= t) + boot[i] - values[i, t])
        assert float(adv[i, t]) == pytest.approx(expect)
    # lambda 0: the one-step TD error
    adv0, _ = A.gae(rewards, values, mask, 1.0, 0.0, boot)
    assert float(adv0[1, 0]) == pytest.approx(float(rewards[1, 0] + values[1, 1] - values[1, 0]))
    assert float(adv0[1, 2]) == pytest.approx(float(rewards[1, 2] + boot[1] - values[1, 2]))
    # a truncated response's last token bootstraps from the state after it; a finished one does not
    no_boot, _ = A.gae(rewards, values, mask, 1.0, 0.95)
    assert float(adv[1, 2] - no_boot[1, 2]) == pytest.approx(float(boot[1]))
    assert float(adv[0, 6]) == pytest.approx(float(no_boot[0, 6]))


def test_gae_refusals():
    r, v, m, _ = batch()
    with pytest.raises(ValueError, match="one shape"):
        A.gae(r, v[:, :3], m, 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma and lam"):
        A.gae(r, v, m, 1.5, 0.95)


def test_whitening_is_masked_and_split_invariant():
    rewards, values, mask, _ = batch(2)
    x = torch.where(mask, values.clamp(-5, 5), torch.zeros(()))
    w = A.whiten(x, mask)
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(w[mask].var(unbiased=False)) == pytest.approx(1.0, rel=1e-6)
    assert (w[~mask] == 0).all()
    # two "ranks" adding their stats whiten exactly like the whole batch
    stats = A.whiten_stats(x[:2], mask[:2]) + A.whiten_stats(x[2:], mask[2:])
    torch.testing.assert_close(torch.cat([A.whiten(x[:2], mask[:2], stats), A.whiten(x[2:], mask[2:], stats)]), w)
    kept = A.whiten(x, mask, shift_mean=False)
    assert float(kept[mask].mean()) == pytest.approx(float(x[mask].mean()), rel=1e-6)  # scaled, mean kept
    assert float(kept[mask].std(unbiased=False)) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------------------- value loss

def test_value_loss_clipping_by_hand():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 2.0, -1.0]])
    values = torch.tensor([[1.0, 0.1, -0.5]], requires_grad=True)
    mask = torch.tensor([[True, True, True]])
    loss_sum, weight, stats = A.value_loss(values, old, returns, mask, clip=0.2)
    # token 0: clipped to 0.2 -> 0.5 * (0.2 - 2)^2 = 1.62 > 0.5 * (1 - 2)^2: the clipped branch, no gradient
    # token 1: inside the clip: 0.5 * (0.1 - 2)^2 = 1.805, gradient 0.1 - 2
    # token 2: moved -0.5 past -0.2 towards -1: clipped loss 0.5 * 0.64 = 0.32 > 0.125
    assert float(weight) == 3
    assert float(loss_sum.detach()) == pytest.approx(1.62 + 1.805 + 0.32)
    loss_sum.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.1 - 2.0, 0.0]]))
    assert float(stats["vf_clip_frac"][0]) == 2 and float(stats["value"][0]) == pytest.approx(0.6)
    plain, _, st = A.value_loss(values.detach(), old, returns, mask, clip=None)
    assert float(plain) == pytest.approx(0.5 * (1 + 1.9 ** 2 + 0.25)) and float(st["vf_clip_frac"][0]) == 0


def test_value_loss_ignores_padding():
    values = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    loss_sum, weight, _ = A.value_loss(values, torch.zeros(1, 2), torch.ones(1, 2),
                                       torch.tensor([[True, False]]), clip=0.2)
    loss_sum.backward()
    assert torch.isfinite(loss_sum) and float(weight) == 1 and torch.isfinite(values.grad).all()


# ---------------------------------------------------------------------------- KL controller

def test_adaptive_kl_controller_update():
    c = A.KLController("adaptive", 0.1, target=6.0, horizon=1000)
    assert c.update(9.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # 9/6 - 1 = 0.5, clipped to 0.2
    c.value = 0.1
    assert c.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 0.1))  # 5.4/6 - 1 = -0.1
    c.value = 0.1
    assert c.update(0.0, 500) == pytest.approx(0.1 * (1 - 0.2 * 0.5))
    # driven by a KL above target it keeps rising, below it keeps falling
    up, down = A.KLController("adaptive", 0.1, 1.0, 100), A.KLController("adaptive", 0.1, 1.0, 100)
    for _ in range(10):
        up.update(2.0, 10), down.update(0.5, 10)
    assert up.value > 0.1 * 1.15 and down.value < 0.1 * 0.9
    fixed = A.KLController("fixed", 0.05)
    assert fixed.update(100.0, 1000) == 0.05
    again = A.KLController("adaptive", 0.1, 1.0, 100)
    again.load_state_dict(json.loads(json.dumps(up.state_dict())))
    assert again.value == up.value
    with pytest.raises(ValueError, match="adaptive"):
        A.KLController("adaptive", 0.1, target=0.0)
    with pytest.raises(ValueError, match="fixed, adaptive"):
        A.KLController("pid", 0.1)


# ---------------------------------------------------------------------------- the critic on a model

def classifier(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    conf = LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    LlamaForCausalLM(conf).save_pretrained(str(tmp_path / "policy"))
    return LlamaForSequenceClassification.from_pretrained(str(tmp_path / "policy"), num_labels=1)


def test_token_values_are_the_heads_output_at_every_position(tmp_path):
    from tidal.objectives.value import token_values

    model = classifier(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    values = token_values(model, ids)
    hidden = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(values, model.score(hidden)[..., 0])
    # the causal model's value at a position does not see the tokens after it
    torch.testing.assert_close(token_values(model, ids[:, :2]), values[:, :2])


def test_ppo_rows_carry_returns_and_values_at_the_response_positions(tmp_path):
    from types import SimpleNamespace

    from tidal.objectives.value import ValueObjective, token_values
    from tidal.rlhf.source import RolloutSource
    from tests.unit.test_rl_source import rows, tiny

    cfg = RLHFConfig()
    cfg = replace(cfg, algorithm=replace(cfg.algorithm, estimator="gae", kl_coef=0.0, whiten_advantages=False,
                                         bootstrap_truncated=True))
    src = RolloutSource(cfg, [], [], 0, 1, torch.device("cpu"), pad_id=0)
    policy, critic = tiny(), classifier(tmp_path)
    rs = rows()
    for r in rs:
        r.pop("advantage")
        r["score"], r["index"] = 1.0, rs.index(r)
    src._learner_logps(SimpleNamespace(model=policy), None, rs, SimpleNamespace(model=critic))
    out = {}
    src._gae(rs, len(rs), [False, True, False], 0.0, out)
    v = token_values(critic, torch.tensor([[4, 10, 11, 12]]))[0].detach()
    torch.testing.assert_close(rs[1]["old_values"], v[:3])
    assert rs[1]["bootstrap"] == pytest.approx(float(v[3]))
    # gamma 1, lambda 0.95, score 1 on the last token, bootstrapped from V(after) (truncated)
    ref, _ = gae_loop(torch.tensor([[0.0, 0.0, 1.0]]), v[:3].double()[None], torch.ones(1, 3, dtype=torch.bool),
                      1.0, 0.95, torch.tensor([float(v[3])]))
    torch.testing.assert_close(rs[1]["advantage"].double(), ref[0], atol=1e-6, rtol=1e-6)
    assert (rs[2]["advantage"] == 0).all()  # a dropped sample has no advantage
    # by default a truncated response's score ends its episode: no value after it
    terminal = replace(cfg, algorithm=replace(cfg.algorithm, bootstrap_truncated=False))
    cut = [dict(r) for r in rs]
    RolloutSource(terminal, [], [], 0, 1, torch.device("cpu"), pad_id=0)._gae(cut, len(cut), [False, True, False],
                                                                            0.0, {})
    ref, _ = gae_loop(torch.tensor([[0.0, 0.0, 1.0]]), v[:3].double()[None], torch.ones(1, 3, dtype=torch.bool),
                      1.0, 0.95, torch.zeros(1))
    torch.testing.assert_close(cut[1]["advantage"].double(), ref[0], atol=1e-6, rtol=1e-6)
    assert float(rs[1]["advantage"][-1] - cut[1]["advantage"][-1]) == pytest.approx(float(v[3]), rel=1e-4)
    assert "explained_var" in out and "returns_mean" in out
    b = src.make_batch(rs)
    torch.testing.assert_close(b["returns"][1, :3], rs[1]["returns"])
    torch.testing.assert_close(b["old_values"][0, 2:4], rs[0]["old_values"])
    assert (b["returns"][2] == 0).all()
    # the value objective at the rollout's own values: the loss is the squared error to the returns
    loss_sum, weight, stats = ValueObjective(cfg.algorithm, 4).loss(critic, b)
    m = b["loss_mask"]
    expect = 0.5 * ((b["old_values"] - b["returns"])[m] ** 2).sum()
    assert float(weight) == int(m.sum()) == 5
    assert float(loss_sum.detach()) == pytest.approx(float(expect), rel=1e-5)
    loss_sum.backward()
    assert critic.score.weight.grad is not None and critic.score.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- checkpoints

TINY = {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                  "intermediate_size": 64}, "data": {"seq_len": 8},
        "train": {"global_batch_tokens": 32, "micro_batch_size": 2},
        "scaling": {"workers": 1, "precision": "fp32"}}


@pytest.mark.usefixtures("single_rank_group")
def test_a_checkpoint_carries_the_companion_engine(tmp_path):
    from tidal.train import checkpoint as ckpt
    from tidal.train.engine import build_engine

    def engine(seed):
        cfg = from_dict(PretrainConfig, {**TINY, "train": {**TINY["train"], "seed": seed}})
        return build_engine(cfg, 50, 0, 0, rank=0, world=1, device=torch.device("cpu"))

    def full(p):
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    policy, value = engine(1), engine(2)
    policy.companions["value"] = value
    policy.step, value.step, value.tokens_seen = 4, 4, 99
    path = str(tmp_path / "checkpoint_0000004")
    from transformers import AutoTokenizer

    from tidal.rlhf.toy import char_model

    tokenizer = str(tmp_path / "tokenizer")  # the run's tokenizer (alone), which exports carry
    AutoTokenizer.from_pretrained(char_model(str(tmp_path / "toy"))).save_pretrained(tokenizer)
    ckpt.save(policy, path, {"config": {}}, tokenizer_dir=tokenizer,
              states={"source": {"iteration": 4}, "stage": {"kl_coef": 0.07}})
    raw = json.load(open(os.path.join(path, ckpt.STATE_FILE)))
    assert raw["states"]["value_engine"] == {"step": 4, "tokens_seen": 99}
    p2, v2 = engine(3), engine(4)
    p2.companions["value"] = v2
    state = ckpt.load(p2, path)
    assert state["states"]["stage"] == {"kl_coef": 0.07} and (v2.step, v2.tokens_seen) == (4, 99)
    for a, b in zip(v2.model.parameters(), value.model.parameters()):
        torch.testing.assert_close(full(a), full(b))
    for a, b in zip(p2.model.parameters(), policy.model.parameters()):
        torch.testing.assert_close(full(a), full(b))
    # a checkpoint without the value model cannot resume a run that has one
    plain = engine(5)
    ckpt.save(plain, str(tmp_path / "plain"), {"config": {}}, states={"source": {"iteration": 1}})
    p3 = engine(6)
    p3.companions["value"] = engine(7)
    with pytest.raises(ValueError, match="holds no value model"):
        ckpt.load(p3, str(tmp_path / "plain"))

    # either model exports on its own from the (committed) checkpoint
    from transformers import AutoModelForCausalLM

    from tidal.train import integrity
    from tidal.train.export import export_checkpoint

    for d in (path, str(tmp_path / "plain")):
        integrity.write_rank_manifest(d, 0)
        integrity.commit(d, 1, 4)
    for part, engine_ in (("value", value), ("model", policy)):
        out = export_checkpoint(path, str(tmp_path / f"{part}-export"), part=part)
        got = AutoModelForCausalLM.from_pretrained(out).state_dict()
        want = {k: full(v) for k, v in engine_.model.state_dict().items()}
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), part
    with pytest.raises(FileNotFoundError, match="holds no value model .*allowed: part=model"):
        export_checkpoint(str(tmp_path / "plain"), str(tmp_path / "nothing"), part="value")
    assert not os.path.exists(tmp_path / "nothing")


# ---------------------------------------------------------------------------- critic.init

def test_critic_init_takes_a_value_model_directory_and_refuses_what_is_not_one(tmp_path):
    """A PPO run goes on from an earlier run's value export (``critic.init=<dir>``); a path
    that is no directory, a causal LM, or a classifier over another vocabulary is refused
    before any work, naming the key and what is allowed."""
    from transformers import AutoModelForSequenceClassification

    from tidal.config import ConfigError, to_dict, validate_rlhf
    from tidal.rlhf.learner import critic_init
    from tidal.rlhf.toy import char_model, digit_prompts

    policy = char_model(str(tmp_path / "policy"))
    value = str(tmp_path / "value")
    AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1).save_pretrained(value)
    classifier(tmp_path / "other").save_pretrained(str(tmp_path / "other_vocab"))  # 30 tokens, not 16
    base = to_dict(RLHFConfig())
    base.update(model={**base["model"], "pretrained": policy},
                data={**base["data"], "name": "digits", "sources": [digit_prompts(str(tmp_path / "p.jsonl"))],
                      "seq_len": 16},
                rollout={**base["rollout"], "max_tokens": 4},
                reward={**base["reward"], "model": None, "rules": ["prefix_match"]},
                algorithm={**base["algorithm"], "name": "ppo", "estimator": "gae"})

    def cfg(init):
        return validate_rlhf(from_dict(RLHFConfig, {**base, "critic": {**base["critic"], "init": init}}))

    assert critic_init(cfg(value)) == value
    assert critic_init(cfg("auto")) == critic_init(cfg("policy")) == policy  # no reward model
    for init, said in ((str(tmp_path / "nowhere"), "neither a keyword nor a directory that exists; allowed: "
                        "auto, reward, policy, or a value-model directory"),
                       ("polcy", "neither a keyword"),
                       (policy, "is not a value model (an HF sequence classifier with one output"),
                       (str(tmp_path / "other_vocab"), "has a vocabulary of 30 tokens, the policy "
                        "(model.pretrained) 16")):
        with pytest.raises(ConfigError, match="critic.init: ") as e:
            cfg(init)
        assert said in str(e.value), (init, str(e.value))
