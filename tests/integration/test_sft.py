"""SFT on Alpaca records from a tiny model pretrained in the test: same engine, loop,
checkpoints and resume as pretraining; the chat template travels with the export."""
import json
import os

import pytest

from tests.conftest import SHARED_DATA
from tests.integration.conftest import _merge, needs_shakespeare, records, tiny_base_model
from tidal.config import SFTConfig, from_dict, to_dict, validate_sft
from tidal.train.launch import run_stage

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_shakespeare]  # multi-minute: full suite only
ALPACA = os.path.join(SHARED_DATA, "alpaca", "alpaca_5000.json")



@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def base_model(ray_local, tmp_path_factory):
    return tiny_base_model(tmp_path_factory)  # shared with the reward/DPO tests


def sft_cfg(out, base, **upd):
    d = to_dict(SFTConfig())
    _merge(d, {"model": {"pretrained": base},
               "data": {"name": "alpaca", "sources": [ALPACA], "seq_len": 128},
               "scaling": {"workers": 2},
               "logger": {"wandb": False, "wandb_mode": "disabled", "progress": False},
               "optim": {"lr": 2e-3},
               "train": {"max_steps": 24, "global_batch_tokens": 2048, "micro_batch_size": 4,
                         "eval_every": 8, "eval_batches": 2, "checkpoint_every": 8,
                         "deterministic": True},
               "run": {"name": "sft", "output_dir": str(out)}})
    _merge(d, upd)
    return validate_sft(from_dict(SFTConfig, d))


@pytest.fixture(scope="module")
def sft_run(base_model, out):
    """The fixed-size SFT run (24 steps, 2 workers): the reference curve, and the tuned model
    the evaluate job checks."""
    return run_stage("sft", sft_cfg(out, base_model))


def test_sft_learns_resumes_and_exports_its_chat_template(sft_run, base_model, out):
    full = sft_run
    recs = records(full["run_dir"])
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3 and vals[0] > vals[1] > vals[2] and vals[2] < vals[0] - 0.1, vals  # held-out SFT loss falls

    data_dirs = [d for d in os.listdir(os.path.join(str(out), "data")) if d.startswith("alpaca-")]
    manifest = json.load(open(os.path.join(str(out), "data", data_dirs[0], "manifest.json")))
    c = manifest["counts"]
    assert c["records"] == 5000 and c["malformed"] == {"missing or empty 'output'": 2}
    assert c["train"]["examples"] + c["val"]["examples"] + c["too_long"] == 4998
    assert manifest["packing"] and c["train"]["samples"] < c["train"]["examples"]  # packed

    # an elastic resize mid-run keeps the curve of the fixed-size run: half the run on one
    # worker (4 micro-batches of replies of every length per step), then resumed on two
    # (2 each). The loss and gradient are the global per-token means whatever the grouping,
    # so the two curves agree up to floating-point summation order.
    run_stage("sft", sft_cfg(out, base_model, run={"name": "grow"}, scaling={"workers": 1},
                    train={"stop_at_step": 12}))
    grown = run_stage("sft", sft_cfg(out, base_model, run={"name": "grow"}))
    ref = {r["step"]: r for r in recs}
    got = records(grown["run_dir"])
    assert [r["step"] for r in got] == list(range(1, 25))
    assert [r["world_size"] for r in got] == [1] * 12 + [2] * 12
    for r in got:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-4), r["step"]
        assert r["grad_norm"] == pytest.approx(ref[r["step"]]["grad_norm"], rel=1e-3), r["step"]
    assert grown["final_val_loss"] == pytest.approx(full["final_val_loss"], rel=1e-4)

    # the export carries the chat template and the added role markers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(full["hf_export"])
    assert "<|im_start|>" in tok.chat_template and "<|im_start|>" in tok.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(full["hf_export"])
    assert model.get_input_embeddings().num_embeddings == len(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name a color."}],
                                     add_generation_prompt=True, return_tensors="pt")
    ids = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids.shape[1]


def test_evaluate_job_reports_forgetting_sft_loss_and_templated_samples(sft_run, base_model, out):
    import glob
    import subprocess

    from tests.conftest import PYTHON, ROOT

    tuned = sft_run
    base_out = os.path.dirname(os.path.dirname(base_model))  # where the base model's data is
    text_data = glob.glob(os.path.join(base_out, "data", "tinyshakespeare-*"))[0]
    sft_data = glob.glob(os.path.join(str(out), "data", "alpaca-*"))[0]
    dest = os.path.join(str(out), "eval")
    p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "evaluate.py"), f"model_dir={tuned['hf_export']}",
                        f"before={base_model}", f"text_data={text_data}", f"sft_data={sft_data}",
                        f"output={dest}", "max_samples=16", "max_new_tokens=6"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, WANDB_MODE="offline", RAY_ADDRESS=""))
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(os.path.join(dest, "results.json")))
    f = res["forgetting"]
    assert f["before"]["ppl"] > 1 and f["after"]["ppl"] > 1 and "bpb" in f["after"]
    assert f["ppl_change"] == pytest.approx(f["after"]["ppl"] / f["before"]["ppl"] - 1)
    assert 0 < res["sft"]["token_accuracy"] < 1 and res["sft"]["loss"] > 0
    samples = [json.loads(line) for line in open(os.path.join(dest, "samples.jsonl"))]
    assert len(samples) == 2 and all(s["rendered"].startswith("<|im_start|>user\n") for s in samples)
    assert "forgetting/ppl change" in p.stdout  # the console table
    assert glob.glob(os.path.join(dest, "wandb", "offline-run-*"))


def test_sft_with_lora_learns_and_trains_the_new_chat_token_rows(base_model, out):
    """LoRA SFT on 2 FSDP2 workers: the base stays frozen except the rows of the added
    role-marker tokens, the held-out loss falls, and the adapter is exported."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = run_stage("sft", sft_cfg(out, base_model, model={"lora": {"rank": 8, "alpha": 32}},
                        optim={"lr": 1e-2}, run={"name": "sft-lora"},
                        train={"max_steps": 16, "eval_every": 4}))
    vals = [r["val_loss"] for r in records(s["run_dir"]) if "val_loss" in r]
    assert all(a > b for a, b in zip(vals, vals[1:])) and vals[-1] < vals[0] - 0.03, vals
    assert os.path.exists(os.path.join(s["adapter"], "adapter_config.json"))
    tok = AutoTokenizer.from_pretrained(s["adapter"])
    merged = AutoModelForCausalLM.from_pretrained(s["hf_export"])
    base = AutoModelForCausalLM.from_pretrained(base_model)
    new = tok.convert_tokens_to_ids("<|im_start|>")
    old = base.get_input_embeddings().num_embeddings
    assert new >= old  # a token the base never had
    emb, base_emb = merged.get_input_embeddings().weight, base.get_input_embeddings().weight
    # old rows are the base's exactly (frozen); the marker's row has a trained value
    torch.testing.assert_close(emb[:old], base_emb)
    assert not torch.allclose(emb[new], emb[:old].mean(0), atol=1e-3)
