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

    runs = {}
    for compiled in (False, True):
        cfg = tiny(every=0)
        engine = build_engine(replace(cfg, train=replace(cfg.train, compile=compiled)), VOCAB, 1, 0, 0, 1,
                              torch.device("cpu"))
        runs[compiled] = ([step(engine, seed=i)["loss"] for i in range(3)], engine.model)
    (eager, m0), (comp, m1) = runs[False], runs[True]
    assert all(b._compiled_call_impl is not None for b in decoder_blocks(m1))
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in decoder_blocks(m0))
    assert comp == pytest.approx(eager, abs=1e-5)
    assert list(m1.state_dict()) == list(m0.state_dict())  # checkpoints do not see the compile
    for (n, a), (_, b) in zip(m0.named_parameters(), m1.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)


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
