"""Real FSDP2 training on Ray Train (gloo, 2 CPU workers) on the Shakespeare corpus."""
import math
import os
import subprocess

import pytest
import torch

from tests.conftest import PYTHON, ROOT
from tests.integration.conftest import needs_shakespeare, records, small_cfg
from tidal.data.loader import GlobalSampleLoader
from tidal.data.prepare import default_output_dir, load_manifest
from tidal.train.launch import run_stage

pytestmark = [pytest.mark.integration, needs_shakespeare]



@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.mark.slow  # 1.5 minutes: the full suite runs it; -m 'not slow' keeps an inner loop
def test_two_workers_learn_and_export_loads_and_generates(ray_local, out):
    cfg = small_cfg(out, run={"name": "learn"}, logger={"wandb": True, "wandb_mode": "offline"},
                    train={"max_steps": 60, "global_batch_tokens": 4096, "eval_every": 20,
                           "checkpoint_every": 20, "keep_checkpoints": 2})
    summary = run_stage("pretrain", cfg)
    recs = records(summary["run_dir"])
    assert [r["step"] for r in recs] == list(range(1, 61))
    assert all(r["world_size"] == 2 and r["grad_accum"] == 4 for r in recs)
    first, last = recs[0]["loss"], summary["final_train_loss"]
    assert abs(first - math.log(2048)) < 0.5  # starts near uniform over the vocabulary
    assert last < first - 2.0, (first, last)  # and falls well below it
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.3 and vals[-1] < first - 2.0
    assert summary["tokens_per_s"] > 0 and "val_bpb" in recs[-1]

    run_dir = summary["run_dir"]
    for name in ("config.yaml", "run_card.md", "loss.png", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(run_dir, name)) > 0
    card = open(os.path.join(run_dir, "run_card.md")).read()
    assert "data manifest sha256" in card and "max_steps: 60" in card and "| torch |" in card
    assert "| optimizer | adamw, lr 0.003, weight decay 0.1; state 8 bytes per trainable parameter" in card
    ckpts = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_0"))
    assert ckpts == ["checkpoint_0000040", "checkpoint_0000060"]  # the newest 2 are kept
    assert summary["checkpoint"].endswith("checkpoint_0000060")
    assert any(d.startswith("offline-run") for d in os.listdir(os.path.join(run_dir, "wandb")))

    # The HF export loads with plain transformers, reproduces the reported validation loss,
    # and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(summary["hf_export"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(summary["hf_export"], local_files_only=True)
    data_dir = default_output_dir(cfg.data, str(out))
    loader = GlobalSampleLoader(data_dir, load_manifest(data_dir), 0, 32)
    total = min(len(loader.val), cfg.train.eval_batches * 32)
    losses, n = 0.0, 0
    with torch.no_grad():
        for mb in loader.val_batches(total, 0, 1, 8):
            t = torch.from_numpy(mb)
            logits = model(input_ids=t[:, :-1]).logits
            losses += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)), t[:, 1:].reshape(-1), reduction="sum").item()
            n += t[:, 1:].numel()
    assert losses / n == pytest.approx(summary["final_val_loss"], rel=1e-4)
    prompt = tok("ROMEO:", return_tensors="pt")
    gen = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert gen.shape[1] > prompt["input_ids"].shape[1]
    assert len(tok.decode(gen[0][prompt["input_ids"].shape[1]:]).strip()) > 0

    # Export on request, from any checkpoint, in a separate process: the final checkpoint's
    # export has exactly the weights of the end-of-training export.
    dest = str(out / "exported-60")
    p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "export.py"),
                        f"checkpoint={summary['checkpoint']}", f"output={dest}"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert os.path.exists(os.path.join(dest, "tokenizer.json"))

    # Continued pretraining from the HF export: it starts where the first run ended.
    cont = run_stage("pretrain", small_cfg(out, run={"name": "continued"}, model={"pretrained": summary["hf_export"]},
                                  train={"max_steps": 2, "eval_every": 2, "export_hf": False},
                                  schedule={"warmup_steps": 1}))
    assert records(cont["run_dir"])[0]["loss"] < first - 2.0
