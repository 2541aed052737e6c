"""Sharded initialisation (``model.meta_init``): a ~125M-parameter Llama (the llama_125m
preset) built on the meta device, sharded over 2 gloo ranks and materialised shard by
shard has exactly the weights of the whole-model path (with the same seeded rule, which
``meta_init`` selects) at world size 1, from a seeded
initialisation and from a pretrained directory (each rank reading only its rows), and a
worker's peak memory while building it at world size 2 is about half of world size 1's.
The seeded rule itself is checked block by block in-process."""
import hashlib
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port, gloo_rank

from tidal.config import PretrainConfig, from_dict
from tidal.models import materialize as M

VOCAB = 32000


def cfg(meta: bool, pretrained=None, **model):
    shape = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 12,
             "intermediate_size": 2048, "tie_embeddings": True, **model}
    return from_dict(PretrainConfig, {"model": {**shape, "meta_init": meta, "pretrained": pretrained},
                                      "train": {"seed": 11}, "scaling": {"precision": "fp32"}})


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith(field + ":"))


def _worker(rank, world, port, out, meta, pretrained, export):
    import gc

    from tidal.train.engine import build_engine

    with gloo_rank(rank, world, port):
        M.build_meta(cfg(True, num_layers=1).model, 64, 1, 0)  # imports (transformers' model code) first
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) starts again from here
        if not meta:  # the whole-model path (as for a model the sharded build does not cover)
            M.eligible = lambda *a, **k: False
        base = _rss("VmRSS")
        engine = build_engine(cfg(True, pretrained), VOCAB, 1, 0, rank, world, torch.device("cpu"))
        peak = _rss("VmHWM") - base
        digests = {}
        for name, p in engine.model.named_parameters():
            whole = p.full_tensor() if hasattr(p, "full_tensor") else p
            digests[name] = hashlib.sha256(whole.detach().contiguous().numpy().tobytes()).hexdigest()
        if export and rank == 0:
            engine.model.save_pretrained(export, safe_serialization=True)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"peak": peak, "digests": digests,
                       "local": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                    for p in engine.model.parameters())}, f)


def build(tmp, tag, world, meta, pretrained=None, export=None):
    out = tmp / tag
    out.mkdir()
    mp.start_processes(_worker, args=(world, free_port(), str(out), meta, pretrained, export), nprocs=world,
                       start_method="spawn")
    return [json.load(open(out / f"rank{r}.json")) for r in range(world)]


@pytest.mark.slow
def test_sharded_build_equals_the_whole_model_and_halves_the_peak(tmp_path):
    export = str(tmp_path / "export")
    whole = build(tmp_path, "whole1", 1, meta=False, export=export)[0]
    meta1 = build(tmp_path, "meta1", 1, meta=True)[0]
    meta2 = build(tmp_path, "meta2", 2, meta=True)
    n = sum(r["local"] for r in meta2)
    assert 100e6 < n < 140e6 and all(r["local"] < 0.51 * n for r in meta2)  # sharded
    # the same weights whatever the path and world size
    assert meta1["digests"] == whole["digests"]
    assert all(r["digests"] == whole["digests"] for r in meta2)
    # peak memory of building it: each of 2 workers about half of one worker's
    one, two = meta1["peak"], max(r["peak"] for r in meta2)
    print(f"peak while building ~125M fp32: whole path {whole['peak'] / 2**20:.0f} MiB, sharded "
          f"world 1 {one / 2**20:.0f} MiB, world 2 {two / 2**20:.0f} MiB per worker ({two / one:.2f}x)")
    assert one > 0.9 * 4 * n and two < 0.6 * one
    # from a pretrained directory: each rank reads its rows, the weights are the file's
    loaded = build(tmp_path, "pre2", 2, meta=True, pretrained=export)
    assert all(r["digests"] == whole["digests"] for r in loaded)
    assert max(r["peak"] for r in loaded) < 0.6 * one


def test_seeded_rows_do_not_depend_on_who_asks():
    shape = torch.Size([300, 5])
    whole = M.init_rows("w", "normal", shape, 0, 300, seed=3, std=0.02, padding_idx=7)
    parts = [M.init_rows("w", "normal", shape, a, b, seed=3, std=0.02, padding_idx=7)
             for a, b in ((0, 100), (100, 250), (250, 300), (300, 300))]
    assert torch.equal(torch.cat(parts), whole)
    assert (whole[7] == 0).all() and whole.std().item() == pytest.approx(0.02, rel=0.1)
    assert not torch.equal(whole, M.init_rows("w", "normal", shape, 0, 300, seed=4, std=0.02))
    assert not torch.equal(whole[:, 0], M.init_rows("v", "normal", shape, 0, 300, seed=3, std=0.02)[:, 0])
    assert torch.equal(M.init_rows("n", "ones", torch.Size([9]), 2, 5, 3, 0.02), torch.ones(3))


def test_meta_build_falls_back_where_loading_is_not_enough(tmp_path):
    from tidal.config.schema import LoRAConfig, ModelConfig

    on = ModelConfig(meta_init=True)
    assert M.eligible(on, "lm", 4096)
    assert not M.eligible(ModelConfig(), "lm", 4096)  # opt-in
    assert not M.eligible(on, "reward", 4096)  # a new head
    assert not M.eligible(ModelConfig(meta_init=True, lora=LoRAConfig(rank=4)), "lm", 4096)
    from tidal.models.build import build_model

    small = build_model(on, 64, 1, 0, seed=1)
    small.save_pretrained(str(tmp_path / "m"))
    assert M.eligible(ModelConfig(meta_init=True, pretrained=str(tmp_path / "m")), "lm", 64)
    assert not M.eligible(ModelConfig(meta_init=True, pretrained=str(tmp_path / "m")), "lm", 80)  # resized
    # the whole-model path draws the seeded rule only when meta_init asks for it
    plain = build_model(ModelConfig(), 64, 1, 0, seed=1)
    assert not torch.equal(plain.model.embed_tokens.weight, small.model.embed_tokens.weight)


def test_pretrained_rows_are_read_in_place_from_any_float_dtype(tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(300, 6, generator=g).to(torch.bfloat16), "n": torch.randn(7, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = M._Safetensors(str(tmp_path))
    rows = torch.empty(170, 6)
    files.fill_rows_(rows, "w", 100, 270)  # across two 128-row blocks
    assert torch.equal(rows, tensors["w"][100:270].float())
    tail = torch.empty(2)
    files.fill_rows_(tail, "n", 5, 7)
    assert torch.equal(tail, tensors["n"][5:7])
    with pytest.raises(ValueError, match=r"w is \[300, 6\] in the files, the model wants rows \[0, 10\) of \[10, 5\]"):
        files.fill_rows_(torch.empty(10, 5), "w", 0, 10)
    cut = tmp_path / "cut"
    cut.mkdir()
    save_file({"n": tensors["n"]}, str(cut / "model.safetensors"))
    blob = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(blob[:-8])  # cut short
    with pytest.raises(ValueError, match="ends inside n"):
        M._Safetensors(str(cut)).fill_rows_(torch.empty(7), "n", 0, 7)
