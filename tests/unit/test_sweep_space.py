"""Sweep search spaces: up-front validation against the swept job, and trial configs."""
from tidal.config import PretrainConfig, SweepConfig, from_dict, to_dict
from tidal.sweep.space import check, job_metrics, trial_dict, tune_space


def sweep(space, **kw):
    return from_dict(SweepConfig, {"search": {"algorithm": kw.pop("algorithm", "random"), "space": space}, **kw})


BASE = to_dict(PretrainConfig())


def test_a_valid_space_passes_and_sets_typed_values_in_the_trial_config():
    s = sweep([{"key": "optim.lr", "type": "loguniform", "low": 1e-4, "high": 1e-2},
               {"key": "schedule.warmup_steps", "type": "randint", "low": 0, "high": 10},
               {"key": "schedule.name", "type": "choice", "values": ["cosine", "wsd"]}])
    assert check(s, BASE) == []
    import numpy as np

    d = trial_dict(BASE, s, {"optim.lr": np.float64(3e-3), "schedule.warmup_steps": np.int64(4),
                             "schedule.name": "wsd"})
    assert d["optim"]["lr"] == 3e-3 and type(d["schedule"]["warmup_steps"]) is int
    assert d["schedule"]["name"] == "wsd" and BASE["schedule"]["name"] == "cosine"  # base untouched
    domains = tune_space(s)
    assert domains["schedule.warmup_steps"].upper == 11  # randint's high is inclusive


def test_every_corner_of_the_space_must_make_a_valid_job_config():
    s = sweep([{"key": "schedule.warmup_steps", "type": "randint", "low": 0, "high": 10_000}])
    problems = check(s, BASE)
    assert len(problems) == 1 and problems[0].startswith("search.space (schedule.warmup_steps=10000): ")
    assert "train.max_steps" in problems[0]


def test_space_problems_are_all_named():
    s = sweep([{"key": "data.seq_len", "type": "choice", "values": [128]},
               {"key": "optim.lr", "type": "uniform", "low": 1e-2, "high": 1e-3},
               {"key": "optim.lr", "type": "gaussian"},
               {"key": "model.hidden_size", "type": "choice", "values": [128]}],
              scheduler={"name": "pbt"}, metric="val_bpb", mode="lowest")
    text = "\n".join(check(s, BASE))
    assert "search.space[0].key: 'data.seq_len': trials share one prepared data set" in text
    assert "search.space[1]: uniform needs low < high" in text
    assert "search.space[2].key: 'optim.lr' appears twice" in text
    assert "search.space[2].type: 'gaussian' is not one of loguniform, uniform, randint, choice" in text
    assert "search.space[3].key: 'model.hidden_size': pbt forks trials" in text
    assert "mode: 'lowest' is not one of min, max" in text
    assert "metric" not in text  # val_bpb is reported by pretraining


def test_metrics_follow_the_job():
    assert "val_bpb" in job_metrics("pretrain") and "val_accuracy" not in job_metrics("pretrain")
    assert {"val_accuracy", "val_margin", "val_kl", "accuracy"} <= set(job_metrics("dpo"))
    assert "val_accuracy" in job_metrics("reward") and "val_kl" not in job_metrics("reward")


def test_pbt_perturbations_stay_inside_the_ranges():
    from tidal.sweep.runner import clip

    s = sweep([{"key": "schedule.min_lr_ratio", "type": "uniform", "low": 0.0, "high": 0.3},
               {"key": "schedule.warmup_steps", "type": "randint", "low": 0, "high": 10},
               {"key": "schedule.name", "type": "choice", "values": ["cosine"]}])
    out = clip(s, {"schedule.min_lr_ratio": 0.36, "schedule.warmup_steps": 4.8, "schedule.name": "cosine"})
    assert out == {"schedule.min_lr_ratio": 0.3, "schedule.warmup_steps": 5, "schedule.name": "cosine"}
    remote = sweep([{"key": "optim.lr", "type": "choice", "values": [1e-3]}], output_dir="s3://b/sweeps")
    assert check(remote, BASE)[0].startswith("output_dir: 's3://b/sweeps'")
