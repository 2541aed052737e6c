import os
import subprocess
import time

import pytest

from tests.conftest import PYTHON, ROOT
from tidal.config import (ConfigError, PretrainConfig, allowed_keys, from_dict, to_dict,
                          validate_pretrain)


def _cfg(**sections):
    base = to_dict(PretrainConfig())
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        base[section][key] = value
    return from_dict(PretrainConfig, base)


def _problems(**sections):
    with pytest.raises(ConfigError) as err:
        validate_pretrain(_cfg(**sections))
    return err.value.problems


def test_defaults_are_valid_and_roundtrip():
    cfg = validate_pretrain(PretrainConfig())
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg


def test_unknown_key_is_named_with_allowed_keys():
    data = to_dict(PretrainConfig())
    data["optim"]["lrr"] = 1e-3
    with pytest.raises(ConfigError) as err:
        from_dict(PretrainConfig, data)
    (msg,) = err.value.problems
    assert msg.startswith("optim.lrr: unknown key (did you mean 'lr'?)")
    assert "weight_decay" in msg and "grad_clip" in msg


def test_wrong_type_names_key_and_expected_type():
    data = to_dict(PretrainConfig())
    data["optim"]["lr"] = "fast"
    data["train"]["max_steps"] = 1.5
    with pytest.raises(ConfigError) as err:
        from_dict(PretrainConfig, data)
    assert any(p.startswith("optim.lr: expected float, got 'fast'") for p in err.value.problems)
    assert any(p.startswith("train.max_steps: expected int, got 1.5") for p in err.value.problems)


def test_int_is_accepted_for_float_and_bool_is_not_int():
    assert _cfg(optim__lr=1).optim.lr == 1.0
    data = to_dict(PretrainConfig())
    data["train"]["max_steps"] = True
    with pytest.raises(ConfigError, match="train.max_steps: expected int"):
        from_dict(PretrainConfig, data)


def test_negative_lr():
    assert _problems(optim__lr=-1e-3) == ["optim.lr: must be > 0, got -0.001"]


def test_global_batch_not_multiple_of_seq_len():
    (msg,) = _problems(train__global_batch_tokens=1000)
    assert msg == "train.global_batch_tokens: 1000 must be a multiple of data.seq_len=256"


def test_global_batch_not_divisible_by_workers_times_micro_batch():
    # 3 sequences per step cannot be split over 2 workers x 8
    (msg,) = _problems(train__global_batch_tokens=3 * 256)
    assert "not divisible by scaling.workers x train.micro_batch_size = 16" in msg
    assert "multiple of 4096 tokens" in msg


def test_missing_data_path_and_tokenizer():
    data = to_dict(PretrainConfig())
    data["data"]["sources"] = ["/nonexistent/corpus.txt"]
    data["data"]["tokenizer"]["path"] = "/nonexistent/tok"
    with pytest.raises(ConfigError) as err:
        validate_pretrain(from_dict(PretrainConfig, data))
    assert "data.sources[0]: path '/nonexistent/corpus.txt' does not exist" in err.value.problems
    assert "data.tokenizer.path: directory '/nonexistent/tok' does not exist" in err.value.problems


def test_unknown_schedule_optimizer_and_choices_list_allowed_values():
    probs = _problems(schedule__name="cosinus", optim__name="lamb")
    assert any(p.startswith("schedule.name: 'cosinus' is not one of") and "wsd" in p for p in probs)
    assert any(p.startswith("optim.name: 'lamb' is not one of adafactor, adamw, adamw8bit, lion, sgd") for p in probs)
    # a choice is a Literal type: the converter names what the schema allows
    with pytest.raises(ConfigError) as err:
        _cfg(scaling__precision="fp8", model__arch="gpt2")
    assert err.value.problems == ["model.arch: 'gpt2' is not one of llama, qwen2, mistral",
                                  "scaling.precision: 'fp8' is not one of auto, fp32, bf16"]


def test_all_problems_reported_together():
    probs = _problems(optim__lr=0.0, train__max_steps=0, scaling__workers=0)
    keys = {p.split(":")[0] for p in probs}
    assert {"optim.lr", "train.max_steps", "scaling.workers"} <= keys


def test_model_shape_checks():
    probs = _problems(model__hidden_size=100, model__num_heads=3)
    assert any("model.hidden_size: 100 must be divisible by model.num_heads=3" in p for p in probs)


def test_allowed_keys_for_dotted_paths():
    assert allowed_keys(PretrainConfig, "optim.lr") is None
    assert allowed_keys(PretrainConfig, "data.tokenizer.vocab_size") is None
    assert "lr" in allowed_keys(PretrainConfig, "optim.lrr")
    assert "optim" in allowed_keys(PretrainConfig, "optimizer")


def _job(*args, timeout=120):
    env = dict(os.environ, RAY_ADDRESS="")
    t0 = time.time()
    p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", "pretrain.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=env)
    return p, time.time() - t0


@pytest.mark.parametrize("override, expected", [
    ("optim.lrr=1e-3", "optim.lrr: unknown key (did you mean 'lr'?); allowed here: name, lr,"),
    ("optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
    ("train.global_batch_tokens=1000", "train.global_batch_tokens: 1000 must be a multiple"),
    ("data.sources=[/no/such/file.txt]", "data.sources[0]: path '/no/such/file.txt' does not exist"),
])
def test_job_rejects_bad_input_before_ray_starts(override, expected):
    p, _ = _job(override)
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr
    assert "Started a local Ray instance" not in p.stdout + p.stderr


def test_job_wrong_type_is_refused_naming_the_key_with_exit_2():
    p, _ = _job("optim.lr=fast")
    assert p.returncode == 2
    assert "optim.lr: Value 'fast' of type 'str' could not be converted to Float" in p.stderr
    assert "Traceback" not in p.stderr


def test_job_prints_resolved_config():
    p, _ = _job("--cfg", "job", "optim.lr=0.0123", "model=llama_125m", "schedule=wsd")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "lr: 0.0123" in out and "hidden_size: 768" in out and "name: wsd" in out


def test_job_mixture_entries_are_overridable_and_validated():
    p, _ = _job("data=shared_mix", "data.mixture.0.weight=-1", "data/curation=off")
    assert p.returncode == 2, p.stderr
    assert "data.mixture[0].weight: must be > 0, got -1.0" in p.stderr
    p, _ = _job("--cfg", "job", "data=shared_mix", "data.mixture.1.text_field=instruction")
    assert p.returncode == 0 and "text_field: instruction" in p.stdout


@pytest.mark.parametrize("job, override, expected", [
    ("sft.py", "data.sorces=[x]", "data.sorces: unknown key (did you mean 'sources'?)"),
    ("sft.py", "data.sources=[/no/such.json]", "data.sources[0]: nothing matches '/no/such.json'"),
    ("reward.py", "data.limit=1", "data.limit: must be >= 2 or null, got 1"),
    ("dpo.py", "dpo.loss=hinge", "dpo.loss: 'hinge' is not one of sigmoid, ipo, cdpo"),
    ("dpo.py", "scaling.workers=3..1", "scaling.workers: '3..1' needs 1 <= min <= max"),
    ("pretrain.py", "train.inject_faults=[boom@3]", "train.inject_faults: 'boom@3' is not kind@step"),
    ("evaluate.py", "model_dir=/no/such/hf", "model_dir: directory '/no/such/hf' does not exist"),
    ("sft.py", "model.lora.rank=4 model.lora.dropout=1.5", "model.lora.dropout: must be in [0, 1), got 1.5"),
    ("sft.py", "model.lora.rank=4 model.lora.target_modules=[]", "model.lora.target_modules: empty"),
    ("reward.py", "model.lora.rank=4", "model.lora.rank: the reward job trains all weights"),
    ("pretrain.py", "model.lora.rank=4", "model.lora.rank: LoRA adapts a pretrained model"),
    ("dpo.py", "dpo.reference=cache", "dpo.reference: 'cache' is not one of batch, precompute"),
    ("sweep.py", "search.space=[]", "search.space: empty; name at least one key to sweep"),
    ("sweep.py", "sweep=grid search.space.1.values=[cosine,bogus]",
     "search.space[1].values: 'bogus' is not a registered schedule; allowed: constant, cosine"),
    ("sweep.py", "metric=val_accuracy", "metric: 'val_accuracy' is not reported by the pretrain job"),
    ("sweep.py", "search.space.0.key=optim.lrate", "search.space[0].key: 'optim.lrate' is not a key"),
    ("sweep.py", "job=dpo", "overrides: the dpo job starts from an HF model directory"),
])
def test_post_training_jobs_reject_bad_input_before_ray_starts(job, override, expected):
    p = subprocess.run([PYTHON, os.path.join(ROOT, "jobs", job), *override.split()], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, RAY_ADDRESS=""))
    assert p.returncode == 2, p.stderr
    assert expected in p.stderr
    assert "Started a local Ray instance" not in p.stdout + p.stderr
