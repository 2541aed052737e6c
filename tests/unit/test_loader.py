import numpy as np
import pytest

from tidal.data import io as tio
from tidal.data.loader import GlobalSampleLoader, epoch_order


@pytest.fixture()
def data_dir(tmp_path):
    """A fake prepared dataset: sample i is filled with the value i (so ids identify samples)."""
    width = 9
    shards = []
    start = 0
    for k, n in enumerate([40, 40, 23]):
        arr = np.repeat(np.arange(start, start + n, dtype=np.uint16)[:, None], width, axis=1)
        tio.save_npy(str(tmp_path / f"train_{k:05d}.npy"), arr)
        shards.append({"file": f"train_{k:05d}.npy", "samples": n})
        start += n
    tio.save_npy(str(tmp_path / "val_00000.npy"), np.zeros((10, width), dtype=np.uint16))
    manifest = {"shards": {"train": shards, "val": [{"file": "val_00000.npy", "samples": 10}]}}
    return str(tmp_path), manifest


def ids(batch):
    return batch[:, 0].tolist()


def step_samples(loader, cursor, world, micro):
    out = []
    for rank in range(world):
        for mb in loader.micro_batches(cursor, rank, world, micro):
            out += ids(mb)
    return out


def test_order_is_pure_function_of_seed_and_epoch():
    assert (epoch_order(50, 7, 0) == epoch_order(50, 7, 0)).all()
    assert not (epoch_order(50, 7, 0) == epoch_order(50, 7, 1)).all()
    assert not (epoch_order(50, 7, 0) == epoch_order(50, 8, 0)).all()
    assert sorted(epoch_order(50, 7, 3)) == list(range(50))


def test_same_samples_per_step_for_world_size_1_2_4(data_dir):
    path, manifest = data_dir
    loader = GlobalSampleLoader(path, manifest, seed=3, global_batch=16)
    for step in range(10):  # crosses epoch boundaries (103 samples)
        cursor = step * 16
        reference = step_samples(loader, cursor, 1, 4)
        assert len(reference) == 16
        for world in (2, 4):
            assert step_samples(loader, cursor, world, 2) == reference


def test_each_epoch_visits_every_sample_once(data_dir):
    path, manifest = data_dir
    loader = GlobalSampleLoader(path, manifest, seed=3, global_batch=16)
    seq = [int(i) for i in loader.global_indices(0, 103 * 2)]
    assert sorted(seq[:103]) == list(range(103)) and sorted(seq[103:]) == list(range(103))
    assert seq[:103] != seq[103:]


def test_restored_cursor_continues_the_sequence(data_dir):
    path, manifest = data_dir
    a = GlobalSampleLoader(path, manifest, seed=5, global_batch=8)
    uninterrupted = [step_samples(a, s * 8, 2, 4) for s in range(20)]
    b = GlobalSampleLoader(path, manifest, seed=5, global_batch=8)  # a fresh process
    cursor = 7 * 8  # the cursor a checkpoint at step 7 holds
    resumed = [step_samples(b, cursor + s * 8, 4, 2) for s in range(13)]  # and a new world size
    assert resumed == uninterrupted[7:]


def test_rank_slices_are_disjoint_and_cover_the_batch(data_dir):
    path, manifest = data_dir
    loader = GlobalSampleLoader(path, manifest, seed=1, global_batch=16)
    parts = [ids(loader.rank_batch(32, r, 4)) for r in range(4)]
    flat = [i for p in parts for i in p]
    assert len(set(flat)) == 16 and flat == [int(i) for i in loader.global_indices(32, 16)]


def test_validation_is_dealt_to_ranks_without_overlap(data_dir):
    path, manifest = data_dir
    loader = GlobalSampleLoader(path, manifest, seed=1, global_batch=16)
    seen = sum((len(mb) for r in range(3) for mb in loader.val_batches(10, r, 3, 2)), 0)
    assert seen == 10


def test_curriculum_serves_easy_samples_first_then_random(data_dir):
    path, manifest = data_dir
    n = 103
    scores = np.arange(n, dtype=np.float32)[::-1].copy()  # sample i has score n-1-i
    scores[10] = scores[11]  # a tie, broken by the seeded key
    tio.save_npy(f"{path}/train_scores.npy", scores)
    cur = dict(manifest, curriculum={"score": "length", "epochs": 1, "file": "train_scores.npy"})
    loader = GlobalSampleLoader(path, cur, seed=3, global_batch=16)
    first_epoch = [int(i) for i in loader.global_indices(0, n)]
    assert [scores[i] for i in first_epoch] == sorted(scores.tolist())  # easy to hard
    second = [int(i) for i in loader.global_indices(n, n)]
    assert sorted(second) == list(range(n)) and second != first_epoch
    assert second == [int(i) for i in GlobalSampleLoader(path, manifest, 3, 16).global_indices(n, n)]
    for world in (2, 4):  # still the same samples per step whatever the world size
        assert step_samples(loader, 32, world, 2) == step_samples(loader, 32, 1, 4)
