"""The engine's update is the gradient of the global mean loss, whatever the world size and
the micro-batch grouping: real FSDP2 engines over gloo at world sizes 1, 2 and 4, with
micro-batches of 1, 2, 3 and 8 samples, give the same loss, gradients and statistics as
one direct autograd pass over the whole batch (SFT with replies of different lengths, DPO
with a live and with a precomputed reference)."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_rank

from tidal.config import PretrainConfig, from_dict
from tidal.models import build_model
from tidal.objectives import IGNORE, DPOObjective, SFTObjective, to_batch

SEQ, VOCAB, N = 12, 64, 8  # 8 samples per global batch
TINY = {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64},
        "data": {"seq_len": SEQ},
        "optim": {"grad_clip": 0.0},
        "train": {"global_batch_tokens": N * SEQ, "seed": 7},
        "scaling": {"precision": "fp32"}}
CASES = [("sft", None), ("dpo", "live"), ("dpo", "precomputed")]
MICROS = {1: (1, 2, 3, 8), 2: (1, 3), 4: (1, 2)}


def samples(kind):
    """Reply lengths differ from sample to sample, so per-micro-batch means would weigh
    tokens unequally."""
    g = np.random.default_rng(3)
    if kind == "sft":
        out = np.zeros((N, 3, SEQ), dtype=np.int64)
        for i in range(N):
            ids = g.integers(3, VOCAB, SEQ)
            prompt, end = g.integers(1, 5), g.integers(6, SEQ + 1)
            labels = np.full(SEQ, IGNORE)
            labels[prompt:end] = ids[prompt:end]
            out[i] = [ids, labels, np.arange(SEQ)]
        return out
    out = np.zeros((N, 4, SEQ), dtype=np.int64)
    for i in range(N):
        for side in (0, 2):
            ids = g.integers(3, VOCAB, SEQ)
            labels = np.full(SEQ, IGNORE)
            start, end = g.integers(2, 5), g.integers(6, SEQ + 1)
            labels[start:end] = ids[start:end]
            out[i, side], out[i, side + 1] = ids, labels
    return out


def reference_logps():
    g = np.random.default_rng(5)
    sums = -g.uniform(5, 30, (N, 2))
    return np.concatenate([sums, g.integers(3, 9, (N, 2))], 1)


def objective(kind, mode):
    if kind == "sft":
        return SFTObjective()
    obj = DPOObjective(beta=0.5)
    if mode == "live":
        torch.manual_seed(11)
        obj.reference = build_model(from_dict(PretrainConfig, TINY).model, VOCAB, 1, 0, seed=11).eval()
    return obj


def batch(kind, mode, rows, idx):
    b = to_batch("sft" if kind == "sft" else "pairs", rows, torch.device("cpu"))
    if mode == "precomputed":
        b["ref_logps"] = torch.from_numpy(reference_logps()[idx])
    return b


def _worker(rank, world, port, out):
    from tidal.train.engine import build_engine, train_step

    results = {}
    with gloo_rank(rank, world, port):
        for kind, mode in CASES:
            data = samples(kind)
            for micro in MICROS[world]:
                cfg = from_dict(PretrainConfig, {**TINY, "train": {**TINY["train"], "micro_batch_size": micro}})
                engine = build_engine(cfg, VOCAB, 1, 0, rank, world, torch.device("cpu"))
                engine.objective = objective(kind, mode)
                per = N // world
                mine = np.arange(rank * per, (rank + 1) * per)
                micro_batches = [batch(kind, mode, data[mine[i:i + micro]], mine[i:i + micro])
                                 for i in range(0, per, micro)]
                seen = {}

                def guard(loss, norm):  # before the update: every rank holds its shards
                    for name, p in engine.model.named_parameters():
                        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                        seen[name] = g.clone()
                    seen["loss"] = torch.tensor(loss)
                    return "inspected"

                m = train_step(engine, micro_batches, guard=guard)
                assert m["anomaly"] == "inspected"
                seen.update({f"stat:{k}": torch.tensor(m[k]) for k in engine.objective.stats})
                results[f"{kind}-{mode}-{micro}"] = seen
        if rank == 0:
            torch.save(results, out)


def direct(kind, mode):
    """The definition: autograd of (summed loss over the whole batch / total weight)."""
    cfg = from_dict(PretrainConfig, TINY)
    model = build_model(cfg.model, VOCAB, 1, 0, seed=cfg.train.seed)
    obj = objective(kind, mode)
    loss_sum, weight, stats = obj.loss(model, batch(kind, mode, samples(kind), np.arange(N)))
    (loss_sum / weight).backward()
    return model, float(loss_sum.detach() / weight), {k: float(s) / float(c) for k, (s, c) in stats.items()}


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory):
    out = {}
    for world in (1, 2, 4):
        path = str(tmp_path_factory.mktemp("grads") / f"world{world}.pt")
        mp.start_processes(_worker, args=(world, free_port(), path), nprocs=world, start_method="spawn")
        for key, value in torch.load(path, weights_only=True).items():
            out[(world, key)] = value
    return out


@pytest.mark.parametrize("kind,mode", CASES, ids=["sft", "dpo-live-reference", "dpo-precomputed"])
def test_gradients_do_not_depend_on_world_size_or_micro_batches(engine_results, kind, mode):
    model, loss, stats = direct(kind, mode)
    want = {n: p.grad for n, p in model.named_parameters()}
    checked = 0
    for world, micros in MICROS.items():
        for micro in micros:
            got = engine_results[(world, f"{kind}-{mode}-{micro}")]
            assert got["loss"].item() == pytest.approx(loss, rel=1e-5), (world, micro)
            for name, g in want.items():
                torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6,
                                           msg=lambda m: f"{name} at world {world}, micro {micro}: {m}")
            assert {k for k in got if k.startswith("stat:")} == {f"stat:{k}" for k in stats}
            for k, v in stats.items():
                assert got[f"stat:{k}"].item() == pytest.approx(v, rel=1e-5, abs=1e-7), (k, world, micro)
            checked += 1
    assert checked == sum(len(m) for m in MICROS.values())


def test_per_micro_batch_means_would_differ():
    """The set-up can tell the bug apart: averaging per-micro-batch token means (what a
    trainer that normalises each micro-batch does) gives another SFT gradient."""
    cfg = from_dict(PretrainConfig, TINY)
    data, obj = samples("sft"), SFTObjective()
    right, _, _ = direct("sft", None)
    model = build_model(cfg.model, VOCAB, 1, 0, seed=cfg.train.seed)
    for i in range(0, N, 2):
        loss_sum, weight, _ = obj.loss(model, batch("sft", None, data[i:i + 2], None))
        (loss_sum / weight / (N // 2)).backward()
    diffs = [(p.grad - q.grad).abs().max() / q.grad.abs().max()
             for p, q in zip(model.parameters(), right.parameters())]
    assert max(diffs) > 1e-2


def test_statistics_are_global_means():
    """DPO's statistics over a step are sums over every pair (or token, for the KL) divided
    once, not a mean of per-micro-batch means."""
    cfg = from_dict(PretrainConfig, TINY)
    model = build_model(cfg.model, VOCAB, 1, 0, seed=cfg.train.seed)
    obj = objective("dpo", "precomputed")
    whole = obj.loss(model, batch("dpo", "precomputed", samples("dpo"), np.arange(N)))[2]
    parts = [obj.loss(model, batch("dpo", "precomputed", samples("dpo")[i:i + 3], np.arange(i, min(N, i + 3))))[2]
             for i in range(0, N, 3)]
    for k, (s, c) in whole.items():
        assert float(sum(p[k][0] for p in parts)) == pytest.approx(float(s), rel=1e-5)
        assert float(sum(p[k][1] for p in parts)) == pytest.approx(float(c))
    assert float(whole["kl"][1]) == reference_logps()[:, 2:].sum()  # k1 counts reply tokens
