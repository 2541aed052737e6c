"""Reward model and DPO on HH-RLHF pairs from a tiny model pretrained in the test, on the
same engine as pretraining (2 FSDP2 workers)."""
import os

import pytest

from tests.conftest import SHARED_DATA
from tests.integration.conftest import _merge, events, needs_shakespeare, records, tiny_base_model
from tidal import stages
from tidal.config import DPOConfig, RewardConfig, from_dict, to_dict
from tidal.train.launch import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_shakespeare]  # multi-minute: full suite only
HH = os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base-pairs.jsonl.gz")



@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("pref")


@pytest.fixture(scope="module")
def base_model(ray_local, tmp_path_factory):
    return tiny_base_model(tmp_path_factory)  # shared with the SFT tests


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
    stage = stages.get("dpo" if cls is DPOConfig else "reward")
    return stage.validate(from_dict(cls, d))


@pytest.fixture(scope="module")
def reward_run(base_model, out):
    return run_stage("reward", pair_cfg(RewardConfig, out, base_model, optim={"lr": 2e-3}, run={"name": "rm"}))


def test_reward_model_learns_and_exports_a_classifier(reward_run):
    s = reward_run
    recs = records(s["run_dir"])
    early = sum(r["accuracy"] for r in recs[:10]) / 10
    late = sum(r["accuracy"] for r in recs[-10:]) / 10
    assert late > 0.6 and late > early, (early, late)  # training accuracy above chance
    assert "val_accuracy" in recs[-1] and 0 <= recs[-1]["val_accuracy"] <= 1  # held-out split
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(s["hf_export"])
    assert rm.config.num_labels == 1


def test_dpo_raises_preference_accuracy_and_beta_bounds_the_drift(base_model, out):
    s = run_stage("dpo", pair_cfg(DPOConfig, out, base_model, optim={"lr": 1e-3}, dpo={"beta": 0.1},
                         run={"name": "dpo"}))
    recs = records(s["run_dir"])
    vals = [r for r in recs if "val_margin" in r]
    # the policy starts as the reference (margin 0): held-out margins rise from there
    assert 0 < vals[0]["val_margin"] < vals[-1]["val_margin"], [v["val_margin"] for v in vals]
    late = sum(r["accuracy"] for r in recs[-10:]) / 10
    assert late > 0.6, late
    # a large beta keeps the policy near the reference: far smaller KL for the same steps
    stiff = run_stage("dpo", pair_cfg(DPOConfig, out, base_model, optim={"lr": 1e-3},
                             dpo={"beta": 50.0, "loss": "cdpo"}, run={"name": "dpo-stiff"}))
    kl_loose = records(s["run_dir"])[-1]["val_kl"]
    kl_stiff = records(stiff["run_dir"])[-1]["val_kl"]
    assert kl_stiff < kl_loose / 2, (kl_stiff, kl_loose)


def test_reward_job_resumes_from_a_mid_run_checkpoint_exactly(reward_run, base_model, out):
    name = "rm-resumed"
    first = run_stage("reward", pair_cfg(RewardConfig, out, base_model, optim={"lr": 2e-3}, run={"name": name},
                                train={"stop_at_step": 20}))
    assert records(first["run_dir"])[-1]["step"] == 20
    s = run_stage("reward", pair_cfg(RewardConfig, out, base_model, optim={"lr": 2e-3}, run={"name": name}))
    starts = [e for e in events(s["run_dir"]) if e["event"] == "start"]  # both invocations'
    assert [(e["step"], e["restored"]) for e in starts] == [(0, False), (20, True)]
    full = {r["step"]: r for r in records(reward_run["run_dir"])}
    recs = records(s["run_dir"])
    assert [r["step"] for r in recs] == list(range(1, 41))
    for r in recs:  # the same losses as the uninterrupted run, step for step
        assert r["loss"] == full[r["step"]]["loss"], r["step"]


def test_dpo_with_lora_on_fsdp2_precomputed_reference_resumes_and_exports(base_model, out):
    """LoRA DPO on 2 FSDP2 workers with a precomputed reference: a worker killed mid-run
    restarts from the last checkpoint with the same losses as an uninterrupted run, the
    reference is computed once, checkpoints hold only adapters, and the adapter directory
    and the merged export are the same model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tidal.train import integrity

    upd = dict(optim={"lr": 2e-3}, model={"lora": {"rank": 8, "alpha": 16}},
               dpo={"beta": 0.1, "reference": "precompute"}, scaling={"max_failures": 2},
               train={"max_steps": 30, "checkpoint_every": 10, "eval_every": 15})
    clean = run_stage("dpo", pair_cfg(DPOConfig, out, base_model, run={"name": "dpo-lora"}, **upd))
    upd["train"] = {**upd["train"], "inject_faults": ["kill@15:1"]}
    s = run_stage("dpo", pair_cfg(DPOConfig, out, base_model, run={"name": "dpo-lora-killed"}, **upd))

    base = {r["step"]: r for r in records(clean["run_dir"])}
    recs = records(s["run_dir"])
    assert [r["step"] for r in recs] == list(range(1, 31))
    for r in recs:
        assert r["loss"] == base[r["step"]]["loss"], r["step"]
    ev = events(s["run_dir"])
    assert [e["step"] for e in ev if e["event"] == "start"] == [0, 10]
    assert all(e["trainable_params"] < e["num_params"] / 5 for e in ev if e["event"] == "start")
    pre = [e for e in ev if e["event"] == "reference_precomputed"]
    assert [e["reused"] for e in pre] == [False, True] and pre[0]["pairs"] > 100
    # the adapters learn the preference: training margins rise from 0 (policy = reference)
    early = sum(r["margin"] for r in recs[:5]) / 5
    late = sum(r["margin"] for r in recs[-10:]) / 10
    assert late > 0 and late > early, (early, late)

    # checkpoints: the adapters and their optimizer state, not the frozen base
    ckpt = integrity.list_checkpoints(os.path.join(str(out), "dpo-lora-killed"))[-1][1]
    ckpt_bytes = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt) if f.endswith(".distcp"))
    base_bytes = os.path.getsize(os.path.join(base_model, "model.safetensors"))
    assert ckpt_bytes < base_bytes / 2, (ckpt_bytes, base_bytes)

    adapter, merged = s["adapter"], s["hf_export"]
    assert os.path.exists(os.path.join(adapter, "adapter_config.json"))
    ids = torch.randint(5, 200, (2, 24))
    with torch.no_grad():
        # the PEFT way: the base, its vocabulary grown to the adapter's tokenizer, + adapter
        start = AutoModelForCausalLM.from_pretrained(base_model)
        start.resize_token_embeddings(len(AutoTokenizer.from_pretrained(adapter)))
        a = PeftModel.from_pretrained(start, adapter)(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        c = AutoModelForCausalLM.from_pretrained(base_model)(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(b[..., :c.shape[-1]], c, atol=1e-4)  # the adapters changed the model
    # a mid-run checkpoint exports on its own too (base + adapters)
    from tidal.train.export import export_checkpoint

    dest = export_checkpoint(ckpt, str(out / "dpo-lora-ckpt-hf"))
    assert os.path.exists(os.path.join(dest + "-adapter", "adapter_model.safetensors"))
    AutoModelForCausalLM.from_pretrained(dest)
