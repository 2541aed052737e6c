"""Instruction and preference records, the chat template's label mask, packing, and the
SFT objective on packed against unpacked batches."""
import numpy as np
import pytest
import torch

from tidal.data.chat import END, IGNORE, encode_conversation, ensure_chat_template, render
from tidal.data.formats import instruction_example, parse_hh, preference_example
from tidal.data.sft import pack


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tidal.config import TokenizerConfig
    from tidal.data.tokenizer import load, train_bpe

    d = str(tmp_path_factory.mktemp("tok"))
    text = " ".join(["Name a king of England. Richard the Third was one. The user asks and the "
                     "assistant answers with care."] * 50)
    train_bpe([text], TokenizerConfig(vocab_size=300), d)
    t = load(d)
    assert ensure_chat_template(t) is True  # a base tokenizer gets ChatML + role markers
    assert ensure_chat_template(t) is False  # idempotent
    return t


def test_instruction_formats_and_reasons():
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert instruction_example(alpaca)[0] == [{"role": "user", "content": "Add\n\n2 and 3"},
                                              {"role": "assistant", "content": "5"}]
    assert instruction_example({"prompt": "Hi", "completion": "Hello"})[0][1]["content"] == "Hello"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert instruction_example({"messages": msgs})[0] == msgs
    bad = [({"instruction": "x", "output": ""}, "empty 'output'"),
           ({"messages": [{"role": "user", "content": "Hi"}]}, "does not end with"),
           ({"messages": [{"role": "robot", "content": "Hi"}]}, "role 'robot'"),
           ({"text": "nothing"}, "no instruction/output"),
           ("a string", "not an object")]
    for rec, reason in bad:
        value, why = instruction_example(rec)
        assert value is None and reason in why, (rec, why)


def test_preference_formats_including_hh_transcripts():
    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: A pun.",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Joke?\n\nAssistant: No."}
    ex, why = preference_example(hh)
    assert why is None
    assert [t["role"] for t in ex["prompt"]] == ["user", "assistant", "user"]
    assert (ex["chosen"], ex["rejected"]) == ("A pun.", "No.")
    assert preference_example({"prompt": "Q", "chosen": "a", "rejected": "b"})[0]["prompt"] == [
        {"role": "user", "content": "Q"}]
    diverged = dict(hh, rejected="\n\nHuman: Bye\n\nAssistant: No.")
    assert "differ before the last reply" in preference_example(diverged)[1]
    assert "identical" in preference_example({"prompt": "Q", "chosen": "a", "rejected": "a"})[1]
    assert parse_hh("no markers here") is None


def test_label_mask_is_exactly_the_assistant_tokens(tok):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a king."},
             {"role": "assistant", "content": "Richard the Third."},
             {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "The user."}]
    ids, labels = encode_conversation(tok, turns)
    assert tok.decode(ids) == render(tok, turns)
    # token by token: a label is set exactly on the tokens of each reply and its end marker
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == [f"Richard the Third.{END}", f"The user.{END}"]


def test_packing_keeps_examples_apart():
    a = ([1, 2, 3], [IGNORE, 2, 3])
    b = ([4, 5], [IGNORE, 5])
    packed = pack([a, b], 8, pad_id=0, packing=True)
    assert packed.shape == (1, 3, 8)
    assert packed[0, 0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert packed[0, 1].tolist() == [IGNORE, 2, 3, IGNORE, 5, IGNORE, IGNORE, IGNORE]
    assert packed[0, 2].tolist() == [0, 1, 2, 0, 1, 0, 1, 2]  # positions restart per example
    assert pack([a, b], 8, pad_id=0, packing=False).shape == (2, 3, 8)
    assert pack([a, b], 4, pad_id=0, packing=True).shape == (2, 3, 4)  # b does not fit after a


def test_packed_and_unpacked_batches_give_the_same_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tidal.objectives import SFTObjective, to_batch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, use_cache=False)).eval()
    rng = np.random.default_rng(0)
    examples = []
    for n in (7, 5, 9):
        ids = rng.integers(1, 50, n).tolist()
        labels = [IGNORE] * 3 + ids[3:]
        examples.append((ids, labels))
    packed = torch.from_numpy(pack(examples, 24, pad_id=0, packing=True)).long()
    unpacked = torch.from_numpy(pack(examples, 24, pad_id=0, packing=False)).long()
    assert packed.shape[0] == 1 and unpacked.shape[0] == 3
    obj = SFTObjective()
    cpu = torch.device("cpu")
    with torch.no_grad():
        ls, lc, _ = obj.loss(model, to_batch("sft", packed.numpy(), cpu))
        us, uc, _ = obj.loss(model, to_batch("sft", unpacked.numpy(), cpu))
    assert lc == uc == sum(n - 3 for n in (7, 5, 9))  # every reply token, predicted from inside its example
    torch.testing.assert_close(ls, us, atol=1e-4, rtol=1e-5)
    # without the position-id reset, the second example would attend to the first
    leaky = packed.clone()
    leaky[:, 2] = torch.arange(24)
    with torch.no_grad():
        assert abs(obj.loss(model, to_batch("sft", leaky.numpy(), cpu))[0].item() - ls.item()) > 1e-3
