"""The chunked per-token log-prob/entropy against the plain full-logits reference."""
import pytest
import torch

from tidal.objectives.logprobs import (IGNORE, chunked_token_logprobs, sequence_logprob,
                                       token_logprobs)


@pytest.mark.parametrize("shape,hidden,vocab,chunk", [
    ((2, 7), 16, 33, 4),      # odd sizes, chunk not dividing the tokens
    ((3, 5), 8, 101, 1),      # one token per chunk
    ((1, 13), 32, 50, 1024),  # one chunk larger than everything
    ((4, 9), 12, 257, 5),
])
def test_chunked_matches_reference_in_values_and_gradients(shape, hidden, vocab, chunk):
    g = torch.Generator().manual_seed(sum(shape) + hidden + vocab)
    h = torch.randn(*shape, hidden, generator=g, dtype=torch.float64).float()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[0, :2] = IGNORE  # prompt positions
    up_lp = torch.randn(shape, generator=g)
    up_ent = torch.randn(shape, generator=g)

    results = []
    for fn in (token_logprobs, lambda *a: chunked_token_logprobs(*a, chunk_size=chunk)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(hh, ww, labels)
        ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()
        results.append((lp.detach(), ent.detach(), hh.grad, ww.grad))
    for ref, got, name in zip(results[0], results[1], ("logp", "entropy", "d hidden", "d weight")):
        assert got.shape == ref.shape, name
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=name)
    assert (results[1][0][0, :2] == 0).all()  # ignored positions carry no log-prob


def test_gradcheck_in_double():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 3, IGNORE, 6, 0])

    def f(h, w):
        lp, ent = chunked_token_logprobs(h, w, labels, chunk_size=2)
        return lp.double(), ent.double()

    # the function computes in fp32 internally: compare against finite differences loosely
    assert torch.autograd.gradcheck(f, (h, w), eps=1e-3, atol=5e-3, rtol=5e-3)


def test_sequence_logprob_sums_labelled_positions():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    labels = torch.tensor([[IGNORE, 4, 5], [1, 2, IGNORE]])
    assert sequence_logprob(lp, labels).tolist() == [-5.0, -1.0]
    assert sequence_logprob(lp, labels, average=True).tolist() == [-2.5, -0.5]


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long),
                               chunk_size=0)


@pytest.mark.parametrize("chunk,dtype", [(3, torch.float32), (1024, torch.float32), (4, torch.float64)])
def test_fused_nll_matches_reference_in_value_and_gradients(chunk, dtype):
    from tidal.objectives.logprobs import chunked_nll_sum

    g = torch.Generator().manual_seed(chunk)
    h = torch.randn(3, 7, 16, generator=g).to(dtype)
    w = (torch.randn(41, 16, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, 41, (3, 7), generator=g)
    labels[1, :3] = IGNORE
    out = []
    for fn in (lambda a, b, c: -token_logprobs(a, b, c)[0].sum(),
               lambda a, b, c: chunked_nll_sum(a, b, c, chunk_size=chunk)):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww, labels)
        (loss * 2.5).backward()  # the stored gradient is scaled by the incoming one
        out.append((loss.detach().double(), hh.grad, ww.grad))
    for ref, got, name in zip(out[0], out[1], ("loss", "d hidden", "d weight")):
        torch.testing.assert_close(got.double(), ref.double(), atol=1e-5, rtol=1e-5, msg=name)
    assert out[1][1][1, :3].abs().max() == 0  # ignored positions get no gradient


def test_model_nll_sum_matches_full_logits_cross_entropy():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidal.objectives.logprobs import model_nll_sum, shift_targets

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    ids = torch.randint(0, 53, (2, 9))
    targets = shift_targets(ids)
    grads = []
    for variant in ("full", "fused"):
        model.zero_grad()
        if variant == "full":
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 53), targets.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
        else:
            loss = model_nll_sum(model, targets, chunk_size=5, input_ids=ids)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-5)
    for name, ref in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], ref, atol=1e-5, rtol=1e-4, msg=name)
    assert "forward" not in vars(model.get_output_embeddings())  # the head is restored
