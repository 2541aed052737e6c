"""LoRA adapters (peft) and the model-level chunked log-probs, in one process."""
import os

import pytest
import torch

from tidal.config import LoRAConfig, ModelConfig
from tidal.models import build_model, lora
from tidal.train import export
from tidal.objectives import model_token_logprobs, shift_targets
from tidal.objectives.logprobs import IGNORE


def tiny(tmp_path, vocab=96):
    m = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                                intermediate_size=64), vocab, 1, 0, seed=0)
    path = str(tmp_path / "base")
    m.save_pretrained(path)
    return path


def test_model_token_logprobs_match_full_logits_in_values_and_gradients(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                                    intermediate_size=64), 97, 1, 0, seed=0)
    ids = torch.randint(0, 97, (3, 11))
    labels = ids.clone()
    labels[:, :4] = IGNORE
    target = shift_targets(labels)
    assert (target[:, :-1] == labels[:, 1:]).all() and (target[:, -1] == IGNORE).all()

    logp, ent = model_token_logprobs(model, target, chunk_size=5, input_ids=ids)
    (logp.sum() + 0.1 * ent.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(input_ids=ids).logits.float()
    lp_all = torch.log_softmax(logits, -1)
    ref = lp_all.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != IGNORE)
    ref_ent = -(lp_all.exp() * lp_all).sum(-1)
    (ref.sum() + 0.1 * ref_ent.sum()).backward()
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    # the head's own forward is back once the call returns
    assert "forward" not in vars(model.get_output_embeddings())


def test_lora_freezes_the_base_trains_new_token_rows_and_switches_off(tmp_path):
    base = tiny(tmp_path)
    cfg = ModelConfig(pretrained=base)
    model = build_model(cfg, 100, 1, 0, seed=0)  # 4 tokens added (e.g. chat markers)
    assert model.tidal_new_tokens == [96, 97, 98, 99]
    peft_model = lora.wrap(model, LoRAConfig(rank=4, alpha=8), "lm", model.tidal_new_tokens, base)
    names = lora.trainable_names(peft_model)
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names), names
    assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    for n, p in peft_model.named_parameters():  # a training step's worth of change
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    off = lora.AdaptersOff(peft_model)(input_ids=ids).logits
    assert lora.trainable_names(peft_model) == names  # switching off leaves them trainable
    assert not torch.allclose(before, after)
    torch.testing.assert_close(off, before)  # adapters off: exactly the starting model
    with pytest.raises(ValueError, match="model.lora.target_modules"):
        lora.wrap(build_model(cfg, 96, 1, 0, seed=0), LoRAConfig(rank=4, target_modules=["nope"]))


def test_adapter_directory_and_merged_export_give_the_same_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    base = tiny(tmp_path)
    tok_dir = str(tmp_path / "tok")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, "<unk>")),
                            eos_token="<unk>").save_pretrained(tok_dir)
    model = build_model(ModelConfig(pretrained=base), 96, 1, 0, seed=0)
    pm = lora.wrap(model, LoRAConfig(rank=4, alpha=8), "lm", [], base)
    for p in pm.parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    # what the training loop does with the gathered state dict on rank 0
    plain = export.plain_peft(pm.config, pm.state_dict(), pm.peft_config["default"])
    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "hf")
    export.write_peft(plain, tok_dir, adapter, merged)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    AutoTokenizer.from_pretrained(adapter)  # the tokenizer travels with the adapter
    m = AutoModelForCausalLM.from_pretrained(merged)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in m.state_dict())


class _Split:
    def __init__(self, arr):
        self.arr = arr

    def __len__(self):
        return len(self.arr)

    def take(self, idx):
        return self.arr[idx]


def test_precomputed_reference_gives_the_per_batch_losses(tmp_path):
    from tidal.objectives import DPOObjective, to_batch
    from tidal.objectives.preference import reference_sums
    from tidal.train import reference as R

    torch.manual_seed(0)
    mk = lambda: build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                                         intermediate_size=64), 50, 1, 0, seed=0)
    ref, policy = mk(), mk()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    pairs = torch.randint(2, 50, (7, 4, 12), generator=g).numpy()
    pairs[:, 1, :5] = IGNORE  # prompt tokens carry no label
    pairs[:, 3, :5] = IGNORE

    class Loader:
        train, val = _Split(pairs[:5]), _Split(pairs[5:])
    rows = R.compute(ref, Loader, 0, 1, 3, torch.device("cpu"), reference_sums)
    assert len(rows) == 7
    R.save(str(tmp_path / "refs"), rows, {"m": 1})
    assert R.load(str(tmp_path / "refs"), {"m": 2}) is None  # another model or data: recompute
    table = R.ReferenceTable(R.load(str(tmp_path / "refs"), {"m": 1}))
    cpu = torch.device("cpu")
    batch = to_batch("pairs", pairs, cpu)
    with_ref = {**batch, "ref_logps": table.lookup(pairs, cpu)}
    for loss in ("sigmoid", "ipo"):
        live, pre = DPOObjective(beta=0.5, loss=loss), DPOObjective(beta=0.5, loss=loss)
        live.reference = ref
        a, b = live._terms(policy, batch), pre._terms(policy, with_ref)
        for x, y in zip(a[:3], b[:3]):  # losses, chosen and rejected rewards
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
        (ls, lw, lstats), (ps, pw, pstats) = live.loss(policy, batch), pre.loss(policy, with_ref)
        torch.testing.assert_close(ls, ps, atol=1e-5, rtol=1e-5)
        assert lw == pw == 7 and set(lstats) == set(pstats)
    with pytest.raises(KeyError, match="missing from the precomputed"):
        table.lookup(pairs[:1] + 1, cpu)
