import pytest
import torch

from tidal.config import ModelConfig
from tidal.models import build_model, count_params
from tidal.objectives import causal_lm_loss, split_sample
from tidal.parallel import apply, decoder_blocks, make_mesh

SMALL = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_build_each_architecture(arch):
    model = build_model(ModelConfig(arch=arch, **SMALL), 300, 0, 1, seed=0)
    assert model.config.model_type == arch and model.config.vocab_size == 300
    assert len(decoder_blocks(model)) == 2
    out = model(input_ids=torch.randint(0, 300, (2, 16))).logits
    assert out.shape == (2, 16, 300)


def test_same_seed_same_weights_on_every_rank():
    a = build_model(ModelConfig(**SMALL), 300, 0, 1, seed=7)
    b = build_model(ModelConfig(**SMALL), 300, 0, 1, seed=7)
    c = build_model(ModelConfig(**SMALL), 300, 0, 1, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert count_params(a) == sum(p.numel() for p in a.parameters())


def _grads(model, tokens):
    inputs, labels = split_sample(tokens)
    loss = causal_lm_loss(model(input_ids=inputs).logits, labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_gradients(single_rank_group):
    tokens = torch.randint(0, 300, (2, 33))
    plain = build_model(ModelConfig(**SMALL), 300, 0, 1, seed=0)
    ckpt = build_model(ModelConfig(**SMALL), 300, 0, 1, seed=0)
    apply(ckpt, make_mesh("cpu", 1), "fp32", activation_checkpointing=True)
    assert ckpt.is_gradient_checkpointing
    ckpt.train()
    plain.train()
    la, ga = _grads(plain, tokens)
    lb, gb = _grads(ckpt, tokens)
    assert la == pytest.approx(lb, abs=1e-6)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6)


def test_fsdp2_bf16_policy_shards_parameters(single_rank_group):
    from torch.distributed.tensor import DTensor

    model = build_model(ModelConfig(**SMALL), 300, 0, 1, seed=0)
    apply(model, make_mesh("cpu", 1), "bf16")
    assert all(isinstance(p, DTensor) for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    inputs, labels = split_sample(torch.randint(0, 300, (2, 17)))
    logits = model(input_ids=inputs).logits
    assert logits.dtype == torch.bfloat16  # computed in bf16
    causal_lm_loss(logits, labels).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
