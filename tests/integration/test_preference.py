"""Reward model and DPO on HH-RLHF pairs from a tiny model pretrained in the test, on the
same engine as pretraining (2 FSDP2 workers)."""
import os

import pytest

from tests.conftest import SHARED_DATA
from tests.integration.conftest import _merge, needs_shakespeare, records, small_cfg
from tidal.config import DPOConfig, RewardConfig, from_dict, to_dict, validate_pairs
from tidal.train.launch import run_dpo, run_pretrain, run_reward

pytestmark = [pytest.mark.integration, needs_shakespeare]
HH = os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base-pairs.jsonl.gz")



@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("pref")


@pytest.fixture(scope="module")
def base_model(ray_local, out):
    return run_pretrain(small_cfg(out, run={"name": "base"}, train={"max_steps": 10}))["hf_export"]


def pair_cfg(cls, out, base, **upd):
    d = to_dict(cls())
    _merge(d, {"model": {"pretrained": base},
               "data": {"name": "hh", "sources": [HH], "seq_len": 192, "val_fraction": 0.2, "limit": 120},
               "scaling": {"workers": 2},
               "logger": {"wandb": False, "wandb_mode": "disabled", "progress": False},
               "train": {"max_steps": 40, "global_batch_tokens": 16 * 192, "micro_batch_size": 4,
                         "eval_every": 20, "eval_batches": 4, "checkpoint_every": 20,
                         "deterministic": True},
               "run": {"output_dir": str(out)}})
    _merge(d, upd)
    return validate_pairs(from_dict(cls, d))


def test_reward_model_learns_and_exports_a_classifier(base_model, out):
    s = run_reward(pair_cfg(RewardConfig, out, base_model, optim={"lr": 2e-3}, run={"name": "rm"}))
    recs = records(s["run_dir"])
    early = sum(r["accuracy"] for r in recs[:10]) / 10
    late = sum(r["accuracy"] for r in recs[-10:]) / 10
    assert late > 0.6 and late > early, (early, late)  # training accuracy above chance
    assert "val_accuracy" in recs[-1] and 0 <= recs[-1]["val_accuracy"] <= 1  # held-out split
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(s["hf_export"])
    assert rm.config.num_labels == 1


def test_dpo_raises_preference_accuracy_and_beta_bounds_the_drift(base_model, out):
    s = run_dpo(pair_cfg(DPOConfig, out, base_model, optim={"lr": 1e-3}, dpo={"beta": 0.1},
                         run={"name": "dpo"}))
    recs = records(s["run_dir"])
    vals = [r for r in recs if "val_margin" in r]
    # the policy starts as the reference (margin 0): held-out margins rise from there
    assert 0 < vals[0]["val_margin"] < vals[-1]["val_margin"], [v["val_margin"] for v in vals]
    late = sum(r["accuracy"] for r in recs[-10:]) / 10
    assert late > 0.6, late
    # a large beta keeps the policy near the reference: far smaller KL for the same steps
    stiff = run_dpo(pair_cfg(DPOConfig, out, base_model, optim={"lr": 1e-3},
                             dpo={"beta": 50.0, "loss": "cdpo"}, run={"name": "dpo-stiff"}))
    kl_loose = records(s["run_dir"])[-1]["val_kl"]
    kl_stiff = records(stiff["run_dir"])[-1]["val_kl"]
    assert kl_stiff < kl_loose / 2, (kl_stiff, kl_loose)
