"""GPU runs: NCCL, bf16 compute with fp32 reduction, MFU. Skipped where CUDA is absent."""
import pytest
import torch

from tests.integration.conftest import needs_shakespeare, small_cfg
from tidal.train.launch import run_stage

pytestmark = [
    pytest.mark.gpu, pytest.mark.integration, needs_shakespeare,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_nccl_training_reports_mfu(ray_local, tmp_path):
    workers = torch.cuda.device_count()
    cfg = small_cfg(tmp_path, run={"name": "gpu"},
                    scaling={"workers": workers, "use_gpu": True, "precision": "bf16"},
                    train={"max_steps": 20, "global_batch_tokens": 128 * 8 * workers,
                           "micro_batch_size": 8, "eval_every": 10, "export_hf": False})
    summary = run_stage("pretrain", cfg)
    assert 0 < summary["mfu"] < 1
    assert summary["final_train_loss"] < 7.0
