import numpy as np

from tidal.config.schema import DedupConfig
from tidal.data.curate import dedup as D
from tidal.data.curate.pipeline import _bucket_partition, _exact_partition, _runs

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
        "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity")


def test_signatures_are_seeded_and_estimate_jaccard():
    cfg = DedupConfig()
    perms = D.permutations(cfg)
    a = D.signature(TEXT, cfg, perms)
    assert (a == D.signature(TEXT, cfg, D.permutations(cfg))).all()
    assert not (a == D.signature(TEXT, DedupConfig(seed=7), D.permutations(DedupConfig(seed=7)))).all()
    edited = TEXT.replace("wisdom", "quills")
    assert 0.7 < D.similarity(a, D.signature(edited, cfg, perms)) < 1.0
    assert D.similarity(a, D.signature("An entirely different sentence about boats.", cfg, perms)) < 0.1
    assert len(D.band_keys(a, cfg)) == cfg.bands


def test_union_find_keeps_the_earliest_document():
    reps = D.clusters([(5, 9), (9, 12), (3, 40), (40, 41)])
    assert reps == {5: 5, 9: 5, 12: 5, 3: 3, 40: 3, 41: 3}


def test_runs_pair_each_row_with_its_groups_first_id():
    keys = np.array([1, 1, 1, 2, 3, 3])
    ids = np.array([4, 7, 9, 1, 2, 8])
    dup, first = _runs(keys, ids)
    assert dup.tolist() == [7, 9, 8] and first.tolist() == [4, 4, 2]


def test_partition_functions_sort_within_groups():
    out = _exact_partition({"exact": np.array(["b", "a", "b", "a", "c"], dtype=object),
                            "doc_id": np.array([9, 5, 3, 1, 2])})
    assert sorted(zip(out["doc_id"].tolist(), out["rep"].tolist())) == [(5, 1), (9, 3)]
    pairs = _bucket_partition({"band": np.array([7, 7, 8, 7]), "doc_id": np.array([30, 10, 11, 20])})
    assert sorted(zip(pairs["a"].tolist(), pairs["b"].tolist())) == [(10, 20), (10, 30)]
