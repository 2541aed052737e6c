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
