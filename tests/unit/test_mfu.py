import pytest

from tidal.train.metrics import flops_per_token, mfu, peak_flops


def test_mfu_matches_llm_foundry_mpt7b_on_h100():
    # LLM Foundry's published throughput table: MPT-7B, H100 bf16, seq 2048,
    # 10,643 tokens/s/GPU, ~46.4% MFU. MPT-7B: 6.649e9 params, 32 layers, d_model 4096.
    fpt = flops_per_token(6_649_000_000, 32, 4096, 2048)
    assert fpt == pytest.approx(6 * 6.649e9 + 12 * 32 * 4096 * 2048)
    value = mfu(10_643, fpt, peak_flops("NVIDIA H100 80GB HBM3"))
    assert value == pytest.approx(0.464, abs=0.002)


def test_peak_table_lookup():
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # the more specific name wins
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("Some CPU") is None
    assert mfu(1000.0, 1e9, None) is None


def test_matmul_params_leave_out_an_untied_input_embedding():
    from tidal.config import ModelConfig
    from tidal.models import build_model
    from tidal.train.metrics import matmul_params

    shape = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128)
    untied = build_model(ModelConfig(**shape), 500, 0, 1, seed=0)
    total = sum(p.numel() for p in untied.parameters())
    assert matmul_params(untied) == total - 500 * 64
    tied = build_model(ModelConfig(tie_embeddings=True, **shape), 500, 0, 1, seed=0)
    assert matmul_params(tied) == sum(p.numel() for p in tied.parameters())
    assert peak_flops("NVIDIA L40") == 181.05e12 and peak_flops("NVIDIA L4") == 121e12
