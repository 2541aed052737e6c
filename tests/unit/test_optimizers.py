"""The optimizer registry beyond AdamW: Lion (tidal's own), Adafactor (torch's algorithm, made
to run on FSDP2's sharded parameters) and torchao's 8-bit AdamW (CUDA only).

Lion and Adafactor run on real FSDP2 engines over gloo at world size 2 (DTensor parameters
and states), in one pair of spawned processes: the loss falls, a run resumed from a
checkpoint continues bit for bit, the 2-rank checkpoint loads into one worker (a resize)
with its optimizer state resharded exactly and trains on, and a sharded step equals the
unsharded one for the same gradients. The update rules are checked against hand
computations and torch's own Adafactor; the state each keeps is what the run card states."""
import importlib.util
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_rank

from tidal.config import ConfigError, PretrainConfig, from_dict, to_dict, validate_pretrain
from tidal.config.validate import check_optim
from tidal.optim import OPTIMIZERS, build_optimizer
from tidal.optim.optimizers import Adafactor, Lion, available, state_bytes_per_param

SEQ, VOCAB, N, MICRO = 16, 64, 8, 4  # 8 samples per global batch, micro-batches of 4
STEPS, SAVE_AT = 6, 3
OPTIMS = {"lion": {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.1},
          "adafactor": {"lr": 0.1, "weight_decay": 0.1}}


def tiny(name, **optim):
    return from_dict(PretrainConfig, {
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 64},
        "data": {"seq_len": SEQ},
        "optim": {"name": name, **OPTIMS.get(name, {}), **optim},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"global_batch_tokens": N * SEQ, "micro_batch_size": MICRO, "seed": 7, "max_steps": STEPS},
        "scaling": {"precision": "fp32"}})


def rows(step):
    """Two global batches, alternating: what the model can learn in a few steps."""
    return np.random.default_rng(step % 2).integers(3, VOCAB, (N, SEQ + 1))


def train(engine, start, stop, rank, world):
    from tidal.objectives import to_batch
    from tidal.train.engine import train_step

    per = N // world
    losses = []
    for step in range(start, stop):
        mine = rows(step)[rank * per:(rank + 1) * per]
        micro = [to_batch("lm", mine[i:i + MICRO], torch.device("cpu")) for i in range(0, per, MICRO)]
        losses.append(train_step(engine, micro)["loss"])
    return losses


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def full_state(engine):
    """Model and optimizer state by parameter name, unsharded (every rank calls it)."""
    out = {f"param:{n}": full(p) for n, p in engine.model.named_parameters()}
    for n, p in engine.model.named_parameters():
        for k, v in engine.optimizer.state[p].items():
            out[f"state:{n}:{k}"] = full(v)
    return out


def state_bytes(optimizer):
    """Bytes of the optimizer's state tensors (global sizes; 0-d step counters left out)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v) and v.dim() > 0)


def injected_grads(model, step):
    g = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(p.shape, generator=g) * 0.01 for n, p in model.named_parameters()}


def same_grad_steps(model, optimizer, steps=3):
    """``steps`` optimizer steps with fixed gradients, given whole or sharded as the params."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for s in range(steps):
        for n, p in model.named_parameters():
            g = injected_grads(model, s)[n]
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {n: full(p) for n, p in model.named_parameters()}


def _worker(rank, world, port, out_dir):
    from tidal.models import build_model
    from tidal.parallel import apply as apply_fsdp
    from tidal.parallel import make_mesh
    from tidal.train import checkpoint as ckpt
    from tidal.train.engine import build_engine

    results = {}
    with gloo_rank(rank, world, port):
        for name in OPTIMS:
            cfg = tiny(name)
            e = build_engine(cfg, VOCAB, 1, 0, rank, world, torch.device("cpu"))
            first = train(e, 0, 1, rank, world)
            placements = {f"{n}:{k}": (type(v).__name__, str(getattr(v, "placements", "")))
                          for n, p in e.model.named_parameters() for k, v in e.optimizer.state[p].items()}
            measured = state_bytes(e.optimizer)
            losses = first + train(e, 1, SAVE_AT, rank, world)
            path = os.path.join(out_dir, name)
            ckpt.save(e, path, {"config": {}}, states={"source": {"cursor": SAVE_AT}})
            saved = full_state(e)
            losses += train(e, SAVE_AT, STEPS, rank, world)
            end = full_state(e)
            # a new engine resumed from the checkpoint goes on exactly as the first did
            r = build_engine(cfg, VOCAB, 1, 0, rank, world, torch.device("cpu"))
            ckpt.load(r, path)
            resumed = train(r, SAVE_AT, STEPS, rank, world)
            results[name] = {"losses": losses, "resumed_losses": resumed, "end": end,
                             "resumed_end": full_state(r), "saved": saved, "placements": placements,
                             "measured_bytes": measured,
                             "formula": state_bytes_per_param(e.model.parameters(), name)}
            # the same gradients, sharded or whole: the same update
            model = build_model(cfg.model, VOCAB, 1, 0, seed=3)
            apply_fsdp(model, make_mesh("cpu", world), "fp32")
            results[name]["same_grads"] = same_grad_steps(model, build_optimizer(model, cfg.optim, "cpu"))
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("optim2"))
    mp.start_processes(_worker, args=(2, free_port(), out), nprocs=2, start_method="spawn")
    return out, torch.load(os.path.join(out, "results.pt"), weights_only=True)


@pytest.mark.parametrize("name", list(OPTIMS))
def test_fsdp2_states_are_sharded_and_the_loss_falls(two_ranks, name):
    res = two_ranks[1][name]
    tensors = {k: v for k, v in res["placements"].items() if not k.endswith(":step")}  # 0-d counters
    assert tensors and all(kind == "DTensor" for kind, _ in tensors.values()), tensors
    by_kind = {}
    for k, (_, placement) in tensors.items():
        by_kind.setdefault(k.rsplit(":", 1)[1], set()).add(placement)
    if name == "lion":  # one momentum, sharded like its parameter
        assert by_kind == {"exp_avg": {"(Shard(dim=0),)"}}
    else:  # matrices: the row factor by rows, the column factor whole; vectors: sharded
        assert by_kind == {"row_var": {"(Shard(dim=0),)"}, "col_var": {"(Replicate(),)"},
                           "variance": {"(Shard(dim=0),)"}}
    losses = res["losses"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    # each of the two batches, seen again, has a lower loss every time
    assert all(later < earlier for earlier, later in zip(losses, losses[2:])), losses
    assert losses[-1] < losses[0] - 0.2, losses


@pytest.mark.parametrize("name", list(OPTIMS))
def test_resume_from_a_checkpoint_is_bit_exact(two_ranks, name):
    res = two_ranks[1][name]
    assert res["resumed_losses"] == res["losses"][SAVE_AT:]
    assert res["end"].keys() == res["resumed_end"].keys()
    for k, v in res["end"].items():
        assert torch.equal(v, res["resumed_end"][k]), k


@pytest.mark.parametrize("name", list(OPTIMS))
def test_sharded_step_equals_the_unsharded_step(two_ranks, name):
    from tidal.models import build_model

    cfg = tiny(name)
    model = build_model(cfg.model, VOCAB, 1, 0, seed=3)
    want = same_grad_steps(model, build_optimizer(model, cfg.optim, "cpu"))
    got = two_ranks[1][name]["same_grads"]
    for n, p in want.items():
        if name == "lion":  # element-wise only: exactly equal
            assert torch.equal(got[n], p), n
        else:  # the norms are summed across ranks in another order
            torch.testing.assert_close(got[n], p, rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


@pytest.mark.usefixtures("single_rank_group")
@pytest.mark.parametrize("name", list(OPTIMS))
def test_a_two_rank_checkpoint_reshards_into_one_worker(two_ranks, name):
    """A resize 2 -> 1: the one worker's (unsharded) model and optimizer state are exactly
    what the two ranks held, and it trains on as the two ranks did (up to the summation
    order of their gradients)."""
    from tidal.train import checkpoint as ckpt
    from tidal.train.engine import build_engine

    out, results = two_ranks
    res = results[name]
    e = build_engine(tiny(name), VOCAB, 1, 0, 0, 1, torch.device("cpu"))
    ckpt.load(e, os.path.join(out, name))
    assert e.step == SAVE_AT
    loaded = full_state(e)
    assert loaded.keys() == res["saved"].keys()
    for k, v in res["saved"].items():
        assert torch.equal(loaded[k], v), k
    assert not any(hasattr(p, "placements") for p in e.model.parameters())  # one worker: plain
    losses = train(e, SAVE_AT, STEPS, 0, 1)
    assert losses == pytest.approx(res["losses"][SAVE_AT:], rel=1e-3)
    assert losses[-1] < res["losses"][0] - 0.2


@pytest.mark.parametrize("name", list(OPTIMS))
def test_state_bytes_per_param_is_the_state_kept(two_ranks, name):
    """The run card's figure (a formula over the parameter shapes) is what the optimizer
    holds after a step, counted over the global (unsharded) state tensors."""
    res = two_ranks[1][name]
    cfg = tiny(name)
    from tidal.models import build_model

    model = build_model(cfg.model, VOCAB, 1, 0, seed=3)
    n = sum(p.numel() for p in model.parameters())
    assert res["formula"] == pytest.approx(res["measured_bytes"] / n, rel=1e-12)
    assert state_bytes_per_param(model.parameters(), name) == res["formula"]
    if name == "lion":
        assert res["formula"] == 4.0
    else:  # factored: far below AdamW's 8 (the vocabulary, norms and biases keep more)
        assert res["formula"] < 1.0


def test_state_bytes_formulas_of_the_other_entries():
    cfg = tiny("adamw")
    from tidal.models import build_model

    model = build_model(cfg.model, VOCAB, 1, 0, seed=3)
    for name, want in (("adamw", 8.0), ("sgd", 4.0)):
        opt = build_optimizer(model, tiny(name).optim, "cpu")
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        n = sum(p.numel() for p in model.parameters())
        assert state_bytes_per_param(model.parameters(), name) == want == state_bytes(opt) / n
    assert state_bytes_per_param([torch.nn.Parameter(torch.zeros(512, 512))], "adamw8bit") == 2 + 8 / 256
    assert state_bytes_per_param([torch.nn.Parameter(torch.zeros(512))], "adamw8bit") == 8  # too small to quantise
    # a 1000 x 4000 matrix: (rows + cols) / (rows * cols) * 4 bytes per entry
    assert state_bytes_per_param([torch.nn.Parameter(torch.zeros(1000, 4000))], "adafactor") == \
        pytest.approx(5000 / 4e6 * 4)


def test_lion_update_by_hand():
    """Two steps of Lion on three entries, computed by hand (lr 0.1, weight decay 0.5,
    betas 0.9/0.99). The third entry's second gradient is negative, but the momentum's
    interpolation is still positive: the step follows the momentum's sign."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, -0.1, 1.0], dtype=torch.float64)
    opt.step()
    # decay x0.95, then -0.1 * sign(0.1 * g); momentum 0.01 * g
    assert p.tolist() == pytest.approx([0.85, -1.8, -0.1], abs=1e-15)
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.005, -0.001, 0.01], abs=1e-15)
    p.grad = torch.tensor([-0.2, -0.3, -0.05], dtype=torch.float64)
    opt.step()
    # sign(0.9 m + 0.1 g) = sign([-0.0155, -0.0309, 0.004]) = [-1, -1, +1]
    assert p.tolist() == pytest.approx([0.85 * 0.95 + 0.1, -1.8 * 0.95 + 0.1, -0.1 * 0.95 - 0.1], abs=1e-15)
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.00295, -0.00399, 0.0094], abs=1e-15)


def test_lion_with_zero_lr_changes_nothing_but_its_state():
    """What DCP's state initialisation before a load does (a step with zero gradients and
    lr 0): the parameters are untouched."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Lion([p], lr=0.0, weight_decay=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p.tolist() == [1.0, -2.0] and opt.state[p]["exp_avg"].tolist() == [0.0, 0.0]


def test_adafactor_equals_torch_on_plain_tensors():
    torch.manual_seed(0)
    ours = [torch.randn(5, 7), torch.randn(7), torch.randn(2, 3, 4)]
    theirs = [p.clone() for p in ours]
    a = Adafactor([{"params": ours, "weight_decay": 0.1}], lr=1e-2)
    b = torch.optim.Adafactor([{"params": theirs, "weight_decay": 0.1}], lr=1e-2, foreach=False)
    for _ in range(4):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert a.state[p].keys() == b.state[q].keys()
        assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in a.state[p])


def test_registry_and_presets():
    assert {"adamw", "sgd", "lion", "adafactor", "adamw8bit"} <= set(OPTIMIZERS)
    assert available(False) == sorted(set(OPTIMIZERS) - {"adamw8bit"})
    assert available(True) == sorted(OPTIMIZERS)
    import yaml

    from tests.conftest import ROOT

    for name in ("adamw", "lion", "adafactor", "adamw8bit"):
        with open(os.path.join(ROOT, "conf", "optim", f"{name}.yaml")) as f:
            assert yaml.safe_load(f)["name"] == name
    with open(os.path.join(ROOT, "conf", "optim", "lion.yaml")) as f:
        assert yaml.safe_load(f)["betas"] == [0.9, 0.99]  # the paper's


def _problems(**optim):
    data = to_dict(PretrainConfig())
    data["optim"].update(optim)
    with pytest.raises(ConfigError) as err:
        validate_pretrain(from_dict(PretrainConfig, data))
    return err.value.problems


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_adamw8bit_is_refused_without_cuda_at_validation(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert _problems(name="adamw8bit") == [
        "optim.name: 'adamw8bit' runs only on CUDA GPUs (this machine has no CUDA device); "
        "allowed here: adafactor, adamw, lion, sgd"]
    # on a remote cluster the workers' devices are not visible here: the worker says it
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    validate_pretrain(tiny("adamw8bit"))
    with pytest.raises(RuntimeError, match="optim.name: 'adamw8bit' runs only on CUDA GPUs.*allowed here: "
                                           "adafactor, adamw, lion, sgd"):
        build_optimizer(torch.nn.Linear(2, 2), tiny("adamw8bit").optim, "cpu")


def test_adamw8bit_needs_cuda_workers_and_torchao(monkeypatch):
    p = []
    check_optim(tiny("adamw8bit").optim, "optim", p, use_gpu=False)
    assert p == ["optim.name: 'adamw8bit' runs only on CUDA GPUs (scaling.use_gpu=false); "
                 "allowed here: adafactor, adamw, lion, sgd"]
    # a GPU machine without torchao
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torchao" else real(n, *a))
    p = []
    check_optim(tiny("adamw8bit").optim, "optim", p)
    assert p == ["optim.name: 'adamw8bit' needs torchao (pip install torchao), which is not installed"]
    p = []
    check_optim(tiny("lion").optim, "optim", p)
    assert p == []


class _FakeAdamW8bit(torch.optim.Optimizer):
    """torchao's contract as far as tidal meets it: the signature, and a tensor lr."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, block_size=256):
        super().__init__(params, {"lr": torch.tensor(lr), "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.block_size = block_size

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                raise RuntimeError("lr was changed to a non-Tensor object")
            for p in group["params"]:
                p.sub_(group["lr"] * p.grad)


def test_adamw8bit_gets_the_engines_lr_as_a_tensor(monkeypatch):
    """torchao's step refuses a float lr, which the engine sets every step: the entry hands
    it over as a tensor (checked here against a stand-in with torchao's contract)."""
    import sys
    import types

    from tidal.optim import optimizers

    fake = types.ModuleType("torchao.optim")
    fake.AdamW8bit = _FakeAdamW8bit
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.optim", fake)
    monkeypatch.setattr(optimizers, "_AO_CLASS", [])
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, tiny("adamw8bit", lr=0.5).optim, "cuda")
    assert isinstance(opt, _FakeAdamW8bit) and type(opt).__name__ == "AdamW8bit" and opt.block_size == 256
    before = model.weight.detach().clone()
    for group in opt.param_groups:
        group["lr"] = 0.25  # what train_step does
    model.weight.grad, model.bias.grad = torch.ones(4, 4), torch.ones(4)
    opt.step()
    assert torch.equal(model.weight.detach(), before - 0.25)
    assert all(torch.is_tensor(g["lr"]) and g["lr"].item() == 0.25 for g in opt.param_groups)
    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # torchao missing on a GPU worker
    monkeypatch.setitem(sys.modules, "torchao.prototype.low_bit_optim", None)
    monkeypatch.setattr(optimizers, "_AO_CLASS", [])
    with pytest.raises(RuntimeError, match=r"'adamw8bit' needs torchao on every GPU worker \(pip install torchao\)"):
        build_optimizer(model, tiny("adamw8bit").optim, "cuda")


def test_a_sweep_can_search_over_the_optimizer():
    from tidal.config import SweepConfig
    from tidal.sweep.space import check, trial_dict, tune_space

    base = to_dict(PretrainConfig())

    def sweep(values, scheduler="asha"):
        return from_dict(SweepConfig, {"search": {"algorithm": "grid", "space": [
            {"key": "optim.name", "type": "choice", "values": values}]}, "scheduler": {"name": scheduler}})

    s = sweep(["adamw", "lion", "adafactor"])
    assert check(s, base) == []
    assert tune_space(s)["optim.name"] == {"grid_search": ["adamw", "lion", "adafactor"]}
    assert trial_dict(base, s, {"optim.name": "lion"})["optim"]["name"] == "lion"
    problems = check(sweep(["adamw", "lamb"]), base)
    assert problems == ["search.space[0].values: 'lamb' is not a registered optimizer; allowed: "
                        + ", ".join(sorted(OPTIMIZERS))]
    # PBT continues trials from each other's checkpoints: one optimizer's state, not another's
    problems = check(sweep(["adamw", "lion"], scheduler="pbt"), base)
    assert len(problems) == 1 and "optim.name" in problems[0] and "asha or fifo" in problems[0]
    if not torch.cuda.is_available():
        problems = check(sweep(["adamw", "adamw8bit"]), base)
        assert problems and all(p.startswith("search.space (optim.name='adamw8bit'): optim.name: ")
                                for p in problems)
