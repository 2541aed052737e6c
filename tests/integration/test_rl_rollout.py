"""Rollout engines on real vLLM (CPU build) inside real Ray actors: token ids in and out,
reproducible per-sample seeds, log-probs equal to the learner's, and the versioned weight
sync (checksums, version gate, parity after a sync)."""
import glob
import os
import time

import pytest
import torch

pytestmark = pytest.mark.integration
vllm = pytest.importorskip("vllm")

VOCAB, EOS = 64, 1


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      eos_token_id=EOS, bos_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def teacher_forced(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(response)]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, ray_local):
    from tidal.rlhf.rollout import EngineSettings, start_engines

    d = str(tmp_path_factory.mktemp("policy"))
    tiny_llama(0).save_pretrained(d)
    settings = EngineSettings(model_dir=d, dtype="float32", max_model_len=128, seed=0, use_gpu=False,
                              kv_cache_bytes=64 << 20, gpu_memory_utilization=0.5, eos_id=EOS)
    actors = start_engines(settings, 2, cpus=1, gpus=0, timeout_s=600)
    RESTART.update(settings=settings, cpus=1, gpus=0, timeout_s=600)
    yield actors
    from tidal.rlhf.rollout import stop_engines

    stop_engines(actors)  # some a drill below already killed


RESTART = {}  # how a group restarts an engine: the fixture's settings


def group_of(actors):
    from tidal.rlhf.rollout import EngineGroup

    return EngineGroup(actors, timeout_s=300, sync_timeout_s=300, bucket_bytes=40_000)


def test_generation_sync_and_parity(engines):
    from tidal.rlhf.rollout import StaleWeights, WeightSyncError, sample_seed

    model = tiny_llama(0)
    both, one = group_of(engines), group_of(engines[:1])
    both.sync(model.state_dict().items(), 0)
    one.version = 0
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    seeds = [[sample_seed(3, 0, p, s) for s in range(2)] for p in range(len(prompts))]
    a = both.generate(prompts, seeds, max_tokens=8, temperature=1.0)
    b = one.generate(prompts, seeds, max_tokens=8, temperature=1.0)
    assert [[s["ids"] for s in row] for row in a] == [[s["ids"] for s in row] for row in b]
    assert any(row[0]["ids"] != row[1]["ids"] for row in a)  # different seeds, different samples
    for p, row in zip(prompts, a):
        for s in row:
            assert 1 <= len(s["ids"]) <= 8 and s["truncated"] == (s["ids"][-1] != EOS)
            ref = teacher_forced(model, p, s["ids"])
            assert max(abs(x - y) for x, y in zip(ref, s["logps"])) < 1e-4

    # a new policy: the engines serve it after the sync, with a digest that matched
    new = tiny_llama(1)
    info = both.sync(new.state_dict().items(), 1)
    assert info["sync_tensors"] == len(new.state_dict()) and info["sync_bytes"] > 0
    probe = list(range(2, 20))
    for got in both.probe(probe):
        want = teacher_forced(new, probe[:1], probe[1:])
        old = teacher_forced(model, probe[:1], probe[1:])
        assert max(abs(x - y) for x, y in zip(want, got)) < 1e-4
        assert max(abs(x - y) for x, y in zip(old, got)) > 1e-2
    with pytest.raises(StaleWeights, match="version 1"):
        one.generate(prompts, seeds, max_tokens=4, temperature=1.0)  # still expects version 0

    import ray

    with pytest.raises(ray.exceptions.RayTaskError, match="commit of version 5"):
        ray.get(engines[0].commit.remote(5))
    with pytest.raises(WeightSyncError, match="outside a sync"):
        ray.get(engines[0].receive.remote(["x"], [torch.zeros(1)]))


def test_engine_leaves_no_shared_memory_behind(engines):
    # in-process engines keep no ring buffers in /dev/shm (the multiprocess engine did)
    assert not glob.glob("/dev/shm/*vllm*") and not [p for p in glob.glob("/dev/shm/psm_*")
                                                     if os.stat(p).st_uid == os.getuid()]


def test_a_sync_that_changes_nothing_is_caught(engines):
    """The stale-weight canary: the transfer and its checksum succeed but the engine does
    not apply the weights (a drill); the parity check on a probe sequence refuses it."""
    from types import SimpleNamespace

    from tidal.rlhf.rollout import WeightSyncError
    from tidal.rlhf.sync import check_parity, hf_weights, push

    group = group_of(engines)
    group.sync(tiny_llama(0).state_dict().items(), 0)
    new = tiny_llama(2)
    learner = SimpleNamespace(model=new, rank=0, world=1, device=torch.device("cpu"))
    probe = list(range(3, 30))
    group.sync(hf_weights(new, 0), 1, drill_skip_apply=True)
    assert group.version == 1  # the version and checksum alone cannot tell
    with pytest.raises(WeightSyncError, match="do not serve the learner's weights"):
        check_parity(learner, group, probe, tol=1e-3, version=1)
    info = push(learner, group, 2)  # the learner's own path: every tensor under its HF name
    assert info["sync_tensors"] == len(new.state_dict())
    assert check_parity(learner, group, probe, tol=1e-3, version=2)["sync_parity_gap"] < 1e-4


@pytest.mark.slow  # three engine restarts
def test_lost_and_lying_engines_are_recreated_and_resynced(engines):
    """Runs last (it kills the module's engines). A sync that an engine dies in, and one
    whose engines answer but serve the old weights, are retried on re-created engines,
    which then serve the current policy: the same seeds give the samples they gave before."""
    from types import SimpleNamespace

    import ray

    from tidal.rlhf.rollout import EngineGroup, EngineLost, WeightSyncError, sample_seed
    from tidal.rlhf.sync import check_parity, hf_weights, push, with_retries

    group = EngineGroup(list(engines), timeout_s=300, sync_timeout_s=120, bucket_bytes=40_000, restart=RESTART)
    new = tiny_llama(3)
    learner = SimpleNamespace(model=new, rank=0, world=1, device=torch.device("cpu"))
    probe = list(range(3, 30))
    push(learner, group, 1)
    prompts = [[5, 6, 7], [8, 9]]
    seeds = [[sample_seed(4, 1, p, s) for s in range(2)] for p in range(2)]
    before = group.generate(prompts, seeds, max_tokens=6, temperature=1.0)

    # an engine dies in the middle of a generation: named, replaced, the group must resync
    with pytest.raises(EngineLost) as lost:
        group.generate(prompts, seeds, max_tokens=6, temperature=1.0, kill_one=True)
    assert lost.value.dead == [0] and group.alive() == [1]
    pids = [ray.get(a.info.remote())["pid"] for a in group.actors[1:]]
    info = group.replace(lost.value.dead)
    assert info["engines_lost"] == 1 and group.version is None and group.alive() == [0, 1]
    assert ray.get(group.actors[1].info.remote())["pid"] == pids[0]  # the survivor was kept

    events, calls = [], []

    def attempt(skip_apply: bool):
        calls.append(skip_apply)
        if skip_apply:  # the engines take the weights but keep serving the old ones
            group.sync(hf_weights(new, 0), 2,
                       drill_skip_apply=True)
            return check_parity(learner, group, probe, tol=1e-3, version=2)
        out = push(learner, group, 2)
        out.update(check_parity(learner, group, probe, tol=1e-3, version=2))
        return out

    old = [ray.get(a.info.remote())["pid"] for a in group.actors]
    info = with_retries(lambda: attempt(len(calls) == 0), group, 2, 0, 1, events.append, 2)
    assert calls == [True, False] and info["sync_attempts"] == 2 and info["sync_parity_gap"] < 1e-4
    assert [e["event"] for e in events] == ["sync_retry"] and events[0]["engines_lost"] == 2
    assert "do not serve the learner's weights" in events[0]["reason"]
    now = [ray.get(a.info.remote())["pid"] for a in group.actors]
    assert not set(now) & set(old)  # both were re-created: they answered, with the wrong weights
    # the re-created engines serve the current policy: the samples of before, exactly
    assert group.generate(prompts, seeds, max_tokens=6, temperature=1.0) == [
        [{**s, "version": 2} for s in row] for row in before]

    # an engine that hangs in a sync past its deadline: a typed timeout, then a retry on a
    # re-created engine (only the hung one: the other answers its ping), which serves version 3
    group.sync_timeout_s = 8
    stalled = group.actors[0]
    kept = ray.get(group.actors[1].info.remote())["pid"]
    ray.get(stalled.arm_stall.remote())
    events.clear()
    t0 = time.time()
    info = with_retries(lambda: {**push(learner, group, 3), **check_parity(learner, group, probe, 1e-3, 3)},
                        group, 2, 0, 1, events.append, 3)
    assert info["sync_attempts"] == 2 and time.time() - t0 >= 8
    assert [e["event"] for e in events] == ["sync_retry"] and events[0]["engines_lost"] == 1
    assert "no answer within 8 s" in events[0]["reason"] and "RolloutTimeout" in events[0]["reason"]
    assert group.actors[0] != stalled and ray.get(group.actors[1].info.remote())["pid"] == kept
    assert group.generate(prompts, seeds, max_tokens=6, temperature=1.0) == [
        [{**s, "version": 3} for s in row] for row in before]

    # retries are bounded: the last failure is raised, typed
    def never():
        raise WeightSyncError("no engine took the weights")

    events.clear()
    with pytest.raises(WeightSyncError, match="no engine took"):
        with_retries(never, group, 0, 0, 1, events.append, 3)
    assert events == []
    from tidal.rlhf.rollout import stop_engines

    stop_engines(group.actors)
