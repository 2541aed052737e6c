"""train.compile (each decoder block compiled in place, torchtitan's approach) gives the
eager engine's losses and keeps parameter names; model.kernels=liger (Liger-Kernel, CUDA
only) is refused where it cannot run. The GPU equivalence tests are in tests/gpu."""
from dataclasses import replace

import pytest
import torch

from tidal.config import ConfigError, PretrainConfig, from_dict, validate_pretrain


@pytest.mark.slow  # inductor compiles the block (~20 s on 2 cores)
@pytest.mark.usefixtures("single_rank_group")
def test_compiled_blocks_train_like_eager_ones():
    from tests.unit.test_dynamics import VOCAB, step, tiny
    from tidal.parallel.fsdp import decoder_blocks
    from tidal.train.engine import build_engine

    def params(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    runs = {}
    for compiled in (False, True):
        cfg = tiny(every=0)
        engine = build_engine(replace(cfg, train=replace(cfg.train, compile=compiled)), VOCAB, 1, 0, 0, 1,
                              torch.device("cpu"))
        start = params(engine.model)
        runs[compiled] = ([step(engine, seed=i)["loss"] for i in range(3)], engine.model, start)
    (eager, m0, start0), (comp, m1, start1) = runs[False], runs[True]
    assert all(b._compiled_call_impl is not None for b in decoder_blocks(m1))
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in decoder_blocks(m0))
    assert comp == pytest.approx(eager, abs=1e-5)
    assert list(m1.state_dict()) == list(m0.state_dict())  # checkpoints do not see the compile
    # the same start, and the same three updates: inductor's fused kernels round differently
    # (AdamW turns that into ~1e-5 relative differences where a gradient is near zero), so
    # the updates are compared by their relative distance, not elementwise
    after0, after1 = params(m0), params(m1)
    for n in start0:
        assert torch.equal(start0[n], start1[n]), n
        d0, d1 = after0[n] - start0[n], after1[n] - start1[n]
        assert d0.norm() > 0 and (d1 - d0).norm() / d0.norm() < 1e-3, (n, float((d1 - d0).norm() / d0.norm()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_liger_kernels_are_refused_without_a_gpu(monkeypatch):
    from tidal.models.kernels import apply

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = from_dict(PretrainConfig, {"model": {"kernels": "liger"}})
    with pytest.raises(ConfigError, match=r"model.kernels: 'liger' runs Triton kernels on CUDA GPUs "
                                          r"\(this machine has no CUDA device\); allowed here: none"):
        validate_pretrain(cfg)
    with pytest.raises(RuntimeError, match="model.kernels=liger: this worker has no CUDA device"):
        apply(cfg.model, torch.device("cpu"))
    assert validate_pretrain(from_dict(PretrainConfig, {"model": {"kernels": "none"}}))
