"""The reward model as Ray actors on a real local Ray runtime: a tiny reward export built
with the project's own code, scored by a pool of actors exactly as the model scores in
this process; a killed actor is replaced and its share scored again; deadlines."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration

VOCAB, EOS, PAD = 64, 1, 0


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A reward export as ``jobs/reward.py`` writes one: the pretrained network with a
    scalar head (``build_model(head="reward")``), written by the export writer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tidal.config import ModelConfig
    from tidal.models import build_model
    from tidal.train.export import write_hf

    root = tmp_path_factory.mktemp("rm")
    tok_dir, base, dest = str(root / "tok"), str(root / "base"), str(root / "rm")
    vocab = {"<pad>": PAD, "<eos>": EOS, **{f"t{i}": i for i in range(2, VOCAB)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<pad>")),
                            eos_token="<eos>", pad_token="<pad>").save_pretrained(tok_dir)
    build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                            intermediate_size=64), VOCAB, EOS, PAD, seed=0).save_pretrained(base)
    rm = build_model(ModelConfig(pretrained=base), VOCAB, EOS, PAD, seed=0, head="reward")
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)  # scores of order one, not the init's near-zero
    write_hf(rm, tok_dir, dest)
    return dest, rm.eval()


@pytest.fixture(scope="module")
def pool(ray_local, export):
    from tidal.rlhf.reward_model import RewardModelPool

    p = RewardModelPool(export[0], actors=2, batch_size=3, timeout_s=120, cpus=1)
    yield p
    p.shutdown()


def sequences(seed=0, n=11):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, VOCAB, size=int(rng.integers(2, 20))).tolist() for _ in range(n)]


def direct(model, seqs):
    """Each sequence alone, unpadded, through the model: its logit at the last token."""
    with torch.no_grad():
        return np.array([model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in seqs])


def test_the_pool_scores_as_the_model_does_and_replaces_a_dead_actor(pool, export, ray_local):
    from tidal.evaluate import load
    from tidal.rlhf.rewards import RewardScorer
    from tidal.config.schema_rl import RLRewardConfig

    seqs = sequences()
    want = direct(export[1], seqs)
    assert want.std() > 0.05  # the scores tell the sequences apart
    np.testing.assert_allclose(direct(load(export[0], reward=True)[0], seqs), want, atol=1e-5)  # the export
    got = pool.score(seqs)
    assert got.shape == (len(seqs),) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert pool.score([]).shape == (0,)

    # the pool as the scorer's model part, weighted
    r = RewardScorer(RLRewardConfig(model="auto", model_weight=2.0), pool).score(
        ["p"] * 3, ["c"] * 3, [[2]] * 3, [{}] * 3, seqs[:3])
    np.testing.assert_allclose(r.total, 2 * want[:3], atol=2e-5)

    # an actor that dies is replaced, and its share scored again on the new one
    dead = pool.actors[0]
    ray_local.kill(dead)
    got = pool.score(seqs)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert pool.replaced == 1 and pool.actors[0] is not dead and len(pool.actors) == 2


def test_bad_inputs_come_back_as_their_own_errors_and_deadlines_are_typed(pool):
    from tidal.rlhf.reward_model import RewardTimeout
    from tidal.rlhf.rewards import RewardError

    with pytest.raises(ValueError, match="outside the vocabulary"):
        pool.score([[2, 3], [VOCAB + 5]])
    assert issubclass(RewardTimeout, RewardError)
    pool.timeout_s = 0.0
    try:
        with pytest.raises(RewardTimeout, match="no answer"):
            pool.score(sequences(1, n=40))
    finally:
        pool.timeout_s = 120
