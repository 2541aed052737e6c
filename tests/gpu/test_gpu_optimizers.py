"""torchao's 8-bit AdamW on a GPU engine: FSDP2 bf16 on a one-rank NCCL group, the loss falls
and a checkpoint resume continues exactly. Skipped without CUDA or torchao (not verified on
a GPU when written: no device was lent to that task)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEQ, VOCAB, N = 32, 128, 8


def _engine():
    from tidal.config import PretrainConfig, from_dict
    from tidal.train.engine import build_engine

    cfg = from_dict(PretrainConfig, {
        "model": {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                  "intermediate_size": 512},
        "data": {"seq_len": SEQ}, "optim": {"name": "adamw8bit", "lr": 3e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"global_batch_tokens": N * SEQ, "micro_batch_size": N, "max_steps": 8, "seed": 3},
        "scaling": {"workers": 1, "use_gpu": True, "precision": "bf16"}})
    return build_engine(cfg, VOCAB, 1, 0, 0, 1, torch.device("cuda", 0))


def _train(engine, start, stop):
    from tidal.objectives import to_batch
    from tidal.train.engine import train_step

    return [train_step(engine, [to_batch("lm", np.random.default_rng(s % 2).integers(3, VOCAB, (N, SEQ + 1)),
                                         engine.device)])["loss"] for s in range(start, stop)]


def test_adamw8bit_trains_and_resumes_exactly(nccl_group, tmp_path):
    pytest.importorskip("torchao")
    from tidal.config import PretrainConfig, from_dict, validate_pretrain
    from tidal.train import checkpoint as ckpt

    validate_pretrain(from_dict(PretrainConfig, {"optim": {"name": "adamw8bit"}, "scaling": {"use_gpu": True}}))
    e = _engine()
    assert type(e.optimizer).__name__ == "AdamW8bit"
    losses = _train(e, 0, 4)
    ckpt.save(e, str(tmp_path / "c"), {"config": {}}, states={"source": {"cursor": 4}})
    losses += _train(e, 4, 8)
    assert losses[-1] < losses[0] - 0.3, losses
    r = _engine()
    ckpt.load(r, str(tmp_path / "c"))
    assert _train(r, 4, 8) == losses[4:]
    for (n, p), q in zip(e.model.named_parameters(), r.model.parameters()):
        assert torch.equal(p.full_tensor(), q.full_tensor()), n
