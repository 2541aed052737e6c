"""Checkpoints hold named states (engine, source, stage): the data position belongs to the
batch source, the engine counts steps; checkpoints written before named states (format 1,
cursor and skipped windows at the top level) still load."""
import json
import os

import numpy as np
import pytest
import torch

from tidal.config import PretrainConfig, from_dict
from tidal.train import checkpoint as ckpt
from tidal.train.engine import build_engine
from tidal.train.source import ShardSource

TINY = {"model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2,
                  "intermediate_size": 64}, "data": {"seq_len": 8},
        "train": {"global_batch_tokens": 32, "micro_batch_size": 2},
        "scaling": {"workers": 1, "precision": "fp32"}}

pytestmark = pytest.mark.usefixtures("single_rank_group")


class Loader:
    """Four samples per global batch over ten samples, in order."""
    global_batch = 4

    def micro_batches(self, cursor, rank, world, micro):
        idx = np.arange(cursor, cursor + self.global_batch) % 10
        for i in range(0, len(idx), micro):
            yield idx[i:i + micro]

    def epoch_of(self, cursor):
        return cursor / 10


def _engine():
    return build_engine(from_dict(PretrainConfig, TINY), 50, 0, 0, rank=0, world=1,
                        device=torch.device("cpu"))


def test_the_source_owns_the_data_position():
    src = ShardSource(Loader(), lambda rows: {"rows": torch.from_numpy(rows)})
    first = [b["rows"].tolist() for b in src.batches(0, 1, 2)]
    assert first == [[0, 1], [2, 3]]
    assert src.batches(0, 1, 2)[0]["rows"].tolist() == [0, 1]  # reading does not move it
    src.advance()
    assert src.batches(0, 1, 2)[0]["rows"].tolist() == [4, 5]
    assert src.skip(12) == [4, 12] and src.cursor == 12
    again = ShardSource(Loader(), src.make_batch)
    again.load_state_dict(json.loads(json.dumps(src.state_dict())))
    assert again.state_dict() == {"cursor": 12, "skipped": [[4, 12]]}
    assert again.batches(0, 1, 2)[0]["rows"].tolist() == [2, 3]  # 12 % 10, the next epoch


def test_named_states_round_trip_and_format_one_loads(tmp_path):
    engine = _engine()
    engine.step, engine.tokens_seen = 5, 160
    path = str(tmp_path / "checkpoint_0000005")
    states = {"source": {"cursor": 20, "skipped": [[8, 12]]}, "stage": {"kl_coef": 0.05}}
    ckpt.save(engine, path, {"config": {}}, states=states)
    raw = json.load(open(os.path.join(path, ckpt.STATE_FILE)))
    assert raw["format"] == 2 and raw["states"]["stage"] == {"kl_coef": 0.05}
    assert raw["states"]["engine"] == {"step": 5, "tokens_seen": 160}
    assert (raw["cursor"], raw["skipped"]) == (20, [[8, 12]])  # mirrored for older readers
    fresh = _engine()
    state = ckpt.load(fresh, path)
    assert (fresh.step, fresh.tokens_seen) == (5, 160) and state["states"]["source"] == states["source"]
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    for a, b in zip(fresh.model.parameters(), engine.model.parameters()):
        torch.testing.assert_close(full(a), full(b))

    # format 1: what checkpoints held before named states
    old = {k: v for k, v in raw.items() if k not in ("format", "states")}
    with open(os.path.join(path, ckpt.STATE_FILE), "w") as f:
        json.dump(old, f)
    older = _engine()
    state = ckpt.load(older, path)
    assert older.step == 5 and state["states"]["source"] == {"cursor": 20, "skipped": [[8, 12]]}
    assert "stage" not in state["states"]


def test_a_rollback_skips_from_the_restored_position_through_the_failed_batch():
    src = ShardSource(Loader(), lambda rows: rows)
    src.load_state_dict({"cursor": 8, "skipped": [[0, 4]]})
    before = src.state_dict()  # the step at cursor 8 failed
    src.load_state_dict({"cursor": 4, "skipped": []})  # the checkpoint restored
    assert src.skip_failed(before) == {"skipped_samples": [4, 12], "skipped_batches": 2}
    assert src.state_dict() == {"cursor": 12, "skipped": [[0, 4], [4, 12]]}


def test_a_checkpoint_without_the_source_state_is_refused_by_name(tmp_path):
    from tidal.train import integrity
    from tidal.train.worker import restore

    engine = _engine()
    path = str(tmp_path / "checkpoint_0000002")
    engine.step = 2
    ckpt.save(engine, path, {"config": {}})  # no source state: not a training run's
    integrity.write_rank_manifest(path, 0)
    integrity.commit(path, 1, 2)
    with pytest.raises(ValueError, match="holds no 'source' state"):
        restore(_engine(), path, ShardSource(Loader(), lambda rows: rows))
