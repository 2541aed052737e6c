"""Prepared data ready for a run: prepared on first use, reused while its inputs are
unchanged, prepared again when they changed (or refused, under a resumed run)."""
from __future__ import annotations

import os
from typing import Dict, Optional

from tidal.data import io as tio
from tidal.data.prepare import data_key, default_output_dir, load_manifest, prepare


def ensure_data(data_cfg, root: str, log=print, resuming: Optional[str] = None) -> tuple[str, Dict]:
    """The prepared data directory and its manifest, preparing it first when missing.
    Refuses shards that were prepared with a different data config."""
    data_dir = default_output_dir(data_cfg, root if tio.is_cloud(root) else os.path.abspath(root))
    manifest = load_manifest(data_dir)
    if manifest is None:
        log(f"no prepared data at {data_dir}: preparing '{data_cfg.name}'")
        manifest = prepare(data_cfg, data_dir, log=log)
    elif manifest.get("data_key") != data_key(data_cfg):
        raise ValueError(
            f"data.output_dir: {data_dir} holds data prepared with another data config "
            f"(key {manifest.get('data_key')}, this config: {data_key(data_cfg)}; its config is in "
            f"{tio.join(data_dir, 'manifest.json')}); point data.output_dir elsewhere or remove it")
    elif _stale(manifest, data_cfg, data_dir, log, resuming):
        manifest = prepare(data_cfg, data_dir, log=log)
    return data_dir, manifest


def _stale(manifest: Dict, data_cfg, data_dir: str, log, resuming: Optional[str] = None) -> bool:
    """Whether the inputs changed since ``data_dir`` was prepared (then it is prepared again:
    a run never trains on shards of files that are no longer what they were). A run that
    resumes is refused instead: its checkpoint's data cursor points into the old shards."""
    from tidal.data import DataError
    from tidal.data.inputs import changed_inputs

    stale = changed_inputs(manifest, data_cfg)
    if stale and resuming:
        raise DataError(f"the inputs of {data_dir} changed since it was prepared, and this run "
                        f"resumes from {resuming}, trained on the old data: restore the inputs, or "
                        "start a new run (another run.name) on the new data:\n  " + "\n  ".join(stale[:10]))
    if stale:
        log(f"the inputs of {data_dir} changed since it was prepared; preparing it again:\n  "
            + "\n  ".join(stale[:10]) + (f"\n  (+{len(stale) - 10} more)" if len(stale) > 10 else ""))
    return bool(stale)


# post-training data kinds: the module that prepares each (its ``data_key``) and the function
POST_KINDS = {"sft": ("tidal.data.sft", "prepare_sft"), "pairs": ("tidal.data.pairs", "prepare_pairs"),
              "prompts": ("tidal.rlhf.prompts", "prepare_prompts")}


def ensure_post_data(cfg, root: str, kind: str, log=print,
                     resuming: Optional[str] = None) -> tuple[str, Dict]:
    """SFT (``kind="sft"``) or preference-pair (``"pairs"``) shards, or RL prompts
    (``"prompts"``), for ``cfg.data``, tokenized with ``cfg.model.pretrained``'s tokenizer
    and chat template."""
    import importlib

    from tidal.data.tokenizer import tokenizer_hash

    if kind not in POST_KINDS:
        raise ValueError(f"data kind {kind!r} is not one of {', '.join(POST_KINDS)}")
    mod = importlib.import_module(POST_KINDS[kind][0])
    prep = getattr(mod, POST_KINDS[kind][1])
    tok_src = cfg.model.pretrained
    key = f"{mod.data_key(cfg.data)}-{tokenizer_hash(tok_src)[:8]}"
    data_dir = cfg.data.output_dir or tio.join(root, "data", f"{cfg.data.name}-{key}")
    manifest = load_manifest(data_dir)
    if manifest is None:
        log(f"no prepared {kind} data at {data_dir}: preparing '{cfg.data.name}'")
        manifest = prep(cfg.data, tok_src, data_dir, log)
    elif manifest.get("data_key") != mod.data_key(cfg.data) or manifest.get("kind") != kind:
        raise ValueError(f"data.output_dir: {data_dir} holds data prepared with another config")
    elif _stale(manifest, cfg.data, data_dir, log, resuming):
        manifest = prep(cfg.data, tok_src, data_dir, log)
    return data_dir, manifest
