"""Training-dynamics metrics (train.dynamics_every): per-layer-group gradient norms that add
up to the step's global norm, update-to-parameter ratios equal to the weights' measured
change, FSDP2's all-gather and reduce-scatter seconds on 2 gloo ranks, and the plot."""
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_rank

from tidal.config import PretrainConfig, from_dict
from tidal.train.dynamics import layer_groups

SEQ, VOCAB, N = 16, 64, 8


def tiny(every=1, layers=3):
    return from_dict(PretrainConfig, {
        "model": {"hidden_size": 32, "num_layers": layers, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64},
        "data": {"seq_len": SEQ}, "optim": {"lr": 1e-2},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"global_batch_tokens": N * SEQ, "micro_batch_size": 4, "seed": 3, "max_steps": 4,
                  "dynamics_every": every},
        "scaling": {"precision": "fp32"}})


def step(engine, rank=0, world=1, seed=0):
    from tidal.objectives import to_batch
    from tidal.train.engine import train_step

    rows = np.random.default_rng(seed).integers(3, VOCAB, (N, SEQ + 1))[rank * N // world:(rank + 1) * N // world]
    return train_step(engine, [to_batch("lm", rows[i:i + 4], torch.device("cpu")) for i in range(0, len(rows), 4)])


def test_layer_groups():
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(20)] + [
        "model.norm.weight", "lm_head.weight", "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight"]
    groups = layer_groups(names)
    assert groups[0] == "embed" and groups[-3:] == ["head", "head", "blocks.3-5"]
    assert sorted(set(groups[1:21]), key=lambda g: int(g.split(".")[1].split("-")[0])) == [
        "blocks.0-2", "blocks.3-5", "blocks.6-8", "blocks.9-11", "blocks.12-14", "blocks.15-17", "blocks.18-19"]
    assert len(set(layer_groups([f"model.layers.{i}.w" for i in range(64)]))) == 8


@pytest.mark.usefixtures("single_rank_group")
def test_groups_add_up_to_the_step_and_the_ratio_is_the_weights_change():
    from tidal.train.engine import build_engine

    engine = build_engine(tiny(every=2), VOCAB, 1, 0, 0, 1, torch.device("cpu"))
    first = step(engine)
    assert not any(k.startswith(("update_ratio", "grad_norm/")) for k in first)  # step 1: not measured
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    m = step(engine, seed=1)
    groups = [k.split("/", 1)[1] for k in m if k.startswith("grad_norm/")]
    assert groups == ["embed", "blocks.0-0", "blocks.1-1", "blocks.2-2", "head"]
    assert sum(m[f"grad_norm/{g}"] ** 2 for g in groups) == pytest.approx(m["grad_norm"] ** 2, rel=1e-5)
    after = dict(engine.model.named_parameters())
    delta = sum(float((after[n] - b).pow(2).sum()) for n, b in before.items())
    norm = sum(float(b.pow(2).sum()) for b in before.values())
    assert m["update_ratio"] == pytest.approx((delta / norm) ** 0.5, rel=1e-5)
    emb = "model.embed_tokens.weight"
    assert m["update_ratio/embed"] == pytest.approx(float((after[emb] - before[emb]).norm() / before[emb].norm()), rel=1e-5)
    assert 1e-4 < m["update_ratio"] < 1  # lr 1e-2 on a fresh model
    assert m["comm_gather_s"] == m["comm_reduce_s"] == 0.0  # one rank, fp32: nothing sharded
    assert m["compute_s"] == pytest.approx(m["step_time_s"])


def _worker(rank, world, port, out):
    import json

    import torch.distributed as dist

    from tidal.train.engine import build_engine

    with gloo_rank(rank, world, port):
        engine = build_engine(tiny(), VOCAB, 1, 0, rank, world, torch.device("cpu"))
        m = step(engine, rank, world)
        with open(os.path.join(out, f"{rank}.json"), "w") as f:
            json.dump(m, f)
        assert dist.all_gather_into_tensor is not None  # the originals are back after the step


def test_two_ranks_time_gathers_and_reductions(tmp_path):
    import json

    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    ms = [json.load(open(tmp_path / f"{r}.json")) for r in range(2)]
    for m in ms:
        assert m["comm_gather_s"] > 0 and m["comm_reduce_s"] > 0
        assert m["compute_s"] + m["comm_gather_s"] + m["comm_reduce_s"] == pytest.approx(m["step_time_s"])
        groups = [k for k in m if k.startswith("grad_norm/")]
        assert sum(m[k] ** 2 for k in groups) == pytest.approx(m["grad_norm"] ** 2, rel=1e-5)
    # every rank reports the same (all-reduced) group statistics
    assert {k: v for k, v in ms[0].items() if "/" in k or k == "update_ratio"} == pytest.approx(
        {k: v for k, v in ms[1].items() if "/" in k or k == "update_ratio"})


def test_the_dynamics_plot(tmp_path):
    from tidal.tracking.plots import dynamics_curves

    recs = [{"step": s, "loss": 3.0, "update_ratio": 1e-3 * s, "update_ratio/embed": 1e-3, "update_ratio/head": 2e-3,
             "grad_norm/embed": 0.5, "grad_norm/head": 0.7, "comm_gather_s": 0.1, "comm_reduce_s": 0.05,
             "compute_s": 0.3, "data_wait_s": 0.01} for s in (10, 20, 30)]
    path = dynamics_curves(recs + [{"step": 31, "loss": 2.0}], str(tmp_path / "dynamics.png"), "t")
    assert os.path.getsize(path) > 10_000
