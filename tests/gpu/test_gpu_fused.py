"""On a GPU: Liger-Kernel's layers and fused linear cross-entropy (model.kernels=liger) and
compiled decoder blocks (train.compile) train like the plain bf16 engine: the same losses
within bf16 tolerance over a few steps. Skipped without CUDA (not yet run on a GPU: no
device was lent to the task that wrote them)."""
import importlib.util
from dataclasses import replace

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SEQ, VOCAB, N = 64, 512, 8


def _cfg(**train):
    from tidal.config import PretrainConfig, from_dict

    return from_dict(PretrainConfig, {
        "model": {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 512},
        "data": {"seq_len": SEQ}, "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"global_batch_tokens": N * SEQ, "micro_batch_size": N, "max_steps": 4, "seed": 3,
                  "dynamics_every": 0, **train},
        "scaling": {"precision": "bf16"}})


def _losses(cfg):
    from tidal.objectives import to_batch
    from tidal.train.engine import build_engine, train_step

    e = build_engine(cfg, VOCAB, 1, 0, 0, 1, torch.device("cuda"))
    rows = np.random.default_rng(0).integers(3, VOCAB, (N, SEQ + 1))
    return [train_step(e, [to_batch("lm", rows, torch.device("cuda"))])["loss"] for _ in range(4)]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
@pytest.mark.usefixtures("nccl_group")
def test_liger_kernels_train_like_the_plain_engine():
    base = _cfg()
    plain = _losses(base)  # first: Liger patches the model classes of this process for good
    fused = _losses(replace(base, model=replace(base.model, kernels="liger")))
    assert fused == pytest.approx(plain, rel=2e-2)


@pytest.mark.usefixtures("nccl_group")
def test_compiled_blocks_train_like_eager_ones_on_gpu():
    assert _losses(_cfg(compile=True)) == pytest.approx(_losses(_cfg()), rel=2e-2)
