"""The batch contract's token accounting: tokens/s and MFU count real input tokens (no
padding, both sides of a preference pair), and a step reports what it trained on."""
import numpy as np
import pytest
import torch

from tidal.config import PretrainConfig, from_dict
from tidal.objectives import IGNORE, SFTObjective, to_batch
from tidal.objectives.batch import real_tokens

PAD = 0


def sft_rows():
    """Two right-padded rows: 7 and 10 real tokens of 12 (a pad-valued id inside the prompt
    is not padding)."""
    rows = np.zeros((2, 3, 12), dtype=np.int64)
    for r, n in enumerate((7, 10)):
        ids = np.arange(5, 5 + 12)
        ids[1] = PAD  # inside the prompt: a real token that happens to be the pad id
        ids[n:] = PAD
        labels = np.full(12, IGNORE)
        labels[3:n] = ids[3:n]
        rows[r] = [ids, labels, np.arange(12)]
    return rows


def test_real_tokens_exclude_only_the_trailing_padding():
    rows = sft_rows()
    assert real_tokens(rows[:, 0], rows[:, 1], PAD) == 17
    assert real_tokens(rows[:, 0], rows[:, 1], None) == 24  # no pad id known: every token
    b = to_batch("sft", rows, torch.device("cpu"), PAD)
    assert int(b["tokens"]) == 17 and int(b["loss_mask"].sum()) == (7 - 3) + (10 - 3)


def test_pairs_count_both_sides_and_packed_text_counts_every_token():
    rows = sft_rows()
    pairs = np.stack([rows[0, 0], rows[0, 1], rows[1, 0], rows[1, 1]])[None]
    b = to_batch("pairs", pairs, torch.device("cpu"), PAD)
    assert int(b["tokens"]) == 7 + 10 and b["input_ids"].shape == (2, 12)
    lm = to_batch("lm", np.ones((3, 9), dtype=np.int64), torch.device("cpu"))
    assert int(lm["tokens"]) == 3 * 8


def sft_engine(micro: int):
    """A one-rank SFT engine on two 12-token rows per step."""
    from tidal.train.engine import build_engine

    cfg = from_dict(PretrainConfig, {
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                  "intermediate_size": 64},
        "data": {"seq_len": 12}, "train": {"global_batch_tokens": 24, "micro_batch_size": micro},
        "scaling": {"workers": 1, "precision": "fp32"}})
    engine = build_engine(cfg, 40, 1, PAD, rank=0, world=1, device=torch.device("cpu"))
    engine.objective = SFTObjective()
    return engine


@pytest.mark.usefixtures("single_rank_group")
def test_a_step_counts_the_tokens_it_trained_on():
    from tidal.train.engine import train_step

    engine = sft_engine(micro=1)
    rows = sft_rows()
    m = train_step(engine, [to_batch("sft", rows[i:i + 1], torch.device("cpu"), PAD) for i in range(2)])
    assert m["tokens_seen"] == 17 == engine.tokens_seen
    assert m["tokens_per_s"] == pytest.approx(17 / m["step_time_s"])


@pytest.mark.usefixtures("single_rank_group")
def test_an_all_padding_step_changes_no_weight():
    from tidal.train.engine import train_step

    engine = sft_engine(micro=2)
    rows = sft_rows()
    rows[:, 1] = IGNORE  # no reply token anywhere: weight 0
    before = [p.detach().clone() for p in engine.model.parameters()]
    seen = []
    m = train_step(engine, [to_batch("sft", rows, torch.device("cpu"), PAD)],
                   guard=lambda loss, norm: seen.append(loss))
    assert m["loss"] == 0.0 and m["step"] == 1 and seen == []  # the guard never saw a fake 0
    for a, b in zip(engine.model.parameters(), before):
        assert torch.equal(a.detach(), b)  # AdamW's decay did not move the weights either
