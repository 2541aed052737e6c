"""Range and consistency checks, run by every job before any Ray work starts."""
from __future__ import annotations

import glob
import math
import os
import re
from typing import List, Optional, Tuple

from tidal.config.convert import ConfigError
from tidal.config.schema import DataConfig, PretrainConfig, worker_bounds
from tidal.config.schema_tools import ExportConfig, PrepareConfig
from tidal.data.io import CLOUD_PREFIXES as _CLOUD
from tidal.train.faults import parse as parse_faults

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_name(problems: List[str], key: str, value) -> None:
    """Names that become directory names: no path separators, no '..', nothing absolute."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        problems.append(f"{key}: '{value}' must be letters, digits, '.', '_' or '-' (it names a "
                        "directory: no '/', no '..')")


def check_credentials(problems: List[str], cfg) -> None:
    from tidal.config.convert import to_dict
    from tidal.config.redact import credential_problems

    problems.extend(credential_problems(to_dict(cfg)))


def _check(problems: List[str], ok: bool, key: str, rule: str, value) -> None:
    if not ok:
        problems.append(f"{key}: must be {rule}, got {value!r}")


def source_exists(src: str) -> bool:
    """Whether a data source can be found (cloud URIs are checked when read)."""
    if src.startswith("embedded:") or src.startswith(_CLOUD):
        return True
    return bool(glob.glob(os.path.expanduser(src))) or os.path.exists(os.path.expanduser(src))


def _check_sources(sources, key: str, problems: List[str]) -> None:
    from tidal.data.corpus import EMBEDDED

    _check(problems, len(sources) > 0, key, "a non-empty list", sources)
    for i, src in enumerate(sources):
        if src.startswith("embedded:") and src.split(":", 1)[1] not in EMBEDDED:
            problems.append(f"{key}[{i}]: unknown embedded corpus '{src}'; "
                            f"allowed: {', '.join('embedded:' + k for k in EMBEDDED)}")
        elif not source_exists(src):
            problems.append(f"{key}[{i}]: path '{src}' does not exist")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def tokenizer_problems(path: str, key: str) -> List[str]:
    """Problems with a directory that must hold a loadable tokenizer."""
    local = os.path.expanduser(path)
    if not os.path.isdir(local):
        return [f"{key}: directory '{path}' does not exist"]
    try:
        from tidal.data.tokenizer import load

        load(local)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, named for the user
        return [f"{key}: '{path}' holds no loadable tokenizer (tokenizer.json or "
                f"tokenizer_config.json with its vocabulary): {_first_line(e)}"]
    return []


def check_pretrained(cfg, p: List[str]) -> None:
    """``model.pretrained`` must be a complete model directory: a loadable config and
    tokenizer (not an unfinished tidal export), positions for ``data.seq_len``, an even
    head dimension; corpus pretraining must use the model's own tokenizer."""
    m = cfg.model
    local = os.path.expanduser(m.pretrained)
    if not os.path.isdir(local):
        p.append(f"model.pretrained: directory '{m.pretrained}' does not exist")
        return
    from tidal.train.publish import check_readable

    bad = check_readable(local)
    if bad:
        p.append(f"model.pretrained: '{m.pretrained}' is not a complete export: {'; '.join(bad[:3])}")
        return
    try:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(local, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        p.append(f"model.pretrained: '{m.pretrained}' holds no loadable model config (config.json): "
                 f"{_first_line(e)}")
        return
    tok_bad = tokenizer_problems(local, "model.pretrained")
    p.extend(tok_bad)
    max_pos = getattr(conf, "max_position_embeddings", None)
    if max_pos and cfg.data.seq_len > max_pos:
        p.append(f"data.seq_len: {cfg.data.seq_len} is longer than model.pretrained's maximum "
                 f"positions ({max_pos}); allowed: <= {max_pos}")
    heads, hidden = getattr(conf, "num_attention_heads", None), getattr(conf, "hidden_size", None)
    head_dim = getattr(conf, "head_dim", None) or (hidden / heads if heads and hidden else None)
    if head_dim is not None and (head_dim != int(head_dim) or int(head_dim) % 2):
        p.append(f"model.pretrained: head dimension {head_dim:g} (hidden_size / num_attention_heads) "
                 "must be an even integer (rotary embeddings rotate pairs of dimensions)")
    if isinstance(cfg.data, DataConfig) and not tok_bad and not m.allow_tokenizer_mismatch:
        _check_same_tokenizer(cfg, local, p)


def _check_same_tokenizer(cfg, model_dir: str, p: List[str]) -> None:
    """Pretraining a pretrained model on text tokenized by another tokenizer scrambles
    what every embedding row means."""
    path = cfg.data.tokenizer.path
    fix = (f"set data.tokenizer.path={cfg.model.pretrained} (the model's own tokenizer), or "
           "model.allow_tokenizer_mismatch=true to continue with a new vocabulary on purpose")
    if path is None:
        path = _prepared_tokenizer(cfg)  # data already prepared: its trained tokenizer
    if path is None:
        p.append(f"data.tokenizer.path: empty, so a new BPE tokenizer would be trained for a "
                 f"pretrained model whose embeddings belong to its own; {fix}")
        return
    from tidal.data.tokenizer import load

    try:
        same = load(os.path.expanduser(path)).get_vocab() == load(model_dir).get_vocab()
    except Exception:  # noqa: BLE001 - reported by the tokenizer check itself
        return
    if not same:
        p.append(f"data.tokenizer.path: '{path}' has another vocabulary than model.pretrained's "
                 f"tokenizer; {fix}")


def _prepared_tokenizer(cfg):
    """The tokenizer of this data config's prepared directory, when it is already there
    (continued pretraining on the data a model was trained on); else None."""
    from tidal.data.prepare import default_output_dir, load_manifest, tokenizer_path

    root = cfg.run.storage_path or cfg.run.output_dir
    if root.startswith(_CLOUD) or (cfg.data.output_dir or "").startswith(_CLOUD):
        return None
    data_dir = default_output_dir(cfg.data, os.path.abspath(os.path.expanduser(root)))
    try:
        manifest = load_manifest(data_dir)
        return tokenizer_path(manifest, data_dir) if manifest else None
    except (OSError, ValueError, KeyError):
        return None


def check_data(d: DataConfig, problems: List[str]) -> None:
    check_name(problems, "data.name", d.name)
    if not d.mixture:
        _check_sources(d.sources, "data.sources", problems)
    names = [m.name for m in d.mixture]
    for j, m in enumerate(d.mixture):
        key = f"data.mixture[{j}]"
        _check_sources(m.sources, f"{key}.sources", problems)
        _check(problems, m.weight > 0, f"{key}.weight", "> 0", m.weight)
        if names.count(m.name) > 1:
            problems.append(f"{key}.name: '{m.name}' is used by more than one source")
        check_name(problems, f"{key}.name", m.name)
    from tidal.data.curriculum import SCORERS

    if d.curriculum.score is not None and d.curriculum.score not in SCORERS:
        problems.append(f"data.curriculum.score: '{d.curriculum.score}' is not one of "
                        f"{', '.join(sorted(SCORERS))} (or null)")
    _check(problems, d.curriculum.epochs >= 1, "data.curriculum.epochs", ">= 1", d.curriculum.epochs)
    _check(problems, d.seq_len >= 8, "data.seq_len", ">= 8", d.seq_len)
    _check(problems, 0.0 < d.val_fraction <= 0.5, "data.val_fraction", "in (0, 0.5]", d.val_fraction)
    _check(problems, d.shard_samples >= 1, "data.shard_samples", ">= 1", d.shard_samples)
    _check(problems, d.min_chars >= 1, "data.min_chars", ">= 1", d.min_chars)
    _check_curation(d, problems)
    t = d.tokenizer
    if t.path is not None:
        problems.extend(tokenizer_problems(t.path, "data.tokenizer.path"))
    _check(problems, 256 < t.vocab_size <= 1_000_000, "data.tokenizer.vocab_size",
           "in (256, 1000000] (byte-level BPE needs the 256 bytes plus merges)", t.vocab_size)


def _check_curation(d: DataConfig, p: List[str]) -> None:
    from tidal.data.curate.pii import RULES

    c = d.curation
    dd = c.dedup
    _check(p, dd.num_perm >= 8, "data.curation.dedup.num_perm", ">= 8", dd.num_perm)
    if dd.bands * dd.rows != dd.num_perm:
        p.append(f"data.curation.dedup.bands: bands x rows ({dd.bands} x {dd.rows}) must equal "
                 f"num_perm ({dd.num_perm})")
    _check(p, 0 < dd.threshold <= 1, "data.curation.dedup.threshold", "in (0, 1]", dd.threshold)
    _check(p, dd.shingle_words >= 1, "data.curation.dedup.shingle_words", ">= 1", dd.shingle_words)
    _check(p, 1 <= dd.bands <= 127, "data.curation.dedup.bands", "in [1, 127]", dd.bands)
    kinds = sorted({k for k, *_ in RULES})
    for i, kind in enumerate(c.pii.types):
        if kind not in kinds:
            p.append(f"data.curation.pii.types[{i}]: '{kind}' is not one of {', '.join(kinds)}")
    f = c.filters
    _check(p, 0 <= f.min_words <= f.max_words, "data.curation.filters.min_words",
           f"in [0, max_words={f.max_words}]", f.min_words)
    if f.script not in ("latin",):
        p.append(f"data.curation.filters.script: '{f.script}' is not one of latin")


def check_post_data(d, p: List[str], embedded: str) -> None:
    """Instruction (SFT) or preference-pair data: sources, lengths, split, limit."""
    check_name(p, "data.name", d.name)
    if not d.sources:
        p.append(f"data.sources: empty; allowed: {embedded}, files, directories, globs, s3:// or gs:// URIs")
    for i, src in enumerate(d.sources):
        if not src.startswith(("embedded:", *_CLOUD)) and not source_exists(src):
            p.append(f"data.sources[{i}]: nothing matches '{src}'")
        elif os.path.isfile(os.path.expanduser(src)) and os.path.getsize(os.path.expanduser(src)) == 0:
            p.append(f"data.sources[{i}]: '{src}' is empty: no records to use")
        if src.startswith("embedded:") and src != embedded:
            p.append(f"data.sources[{i}]: '{src}' is not an embedded set; allowed: {embedded}")
    _check(p, d.seq_len >= 16, "data.seq_len", ">= 16", d.seq_len)
    _check(p, 0 <= d.val_fraction < 1, "data.val_fraction", "in [0, 1)", d.val_fraction)
    if d.limit is not None:
        _check(p, d.limit >= 2, "data.limit", ">= 2 or null", d.limit)


def _done(cfg, problems: List[str]):
    if problems:
        raise ConfigError(problems)
    return cfg


def validate_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """Pretraining: the sections every stage shares and the corpus; LoRA needs a
    pretrained model to adapt. Raises ConfigError listing every problem; else returns cfg."""
    p: List[str] = []
    if cfg.model.lora.rank and not cfg.model.pretrained:
        p.append("model.lora.rank: LoRA adapts a pretrained model; set model.pretrained to an "
                 "HF directory (or use model.lora.rank=0)")
    check_data(cfg.data, p)
    return _done(cfg, validate_common(cfg, p))


def validate_sft(cfg):
    """SFT: the shared sections and instruction data."""
    p: List[str] = []
    check_post_data(cfg.data, p, "embedded:pydocs_instruct")
    return _done(cfg, validate_common(cfg, p))


def validate_reward(cfg):
    """Reward model: the shared sections and preference pairs; all weights train (no LoRA)."""
    p: List[str] = []
    if cfg.model.lora.rank:
        p.append("model.lora.rank: the reward job trains all weights; LoRA is for sft and dpo "
                 "(use model.lora.rank=0)")
    check_post_data(cfg.data, p, "embedded:pydocs_prefs")
    return _done(cfg, validate_common(cfg, p))


def validate_dpo(cfg):
    """DPO: the shared sections, preference pairs and DPO's parameters."""
    p: List[str] = []
    dpo = cfg.dpo
    _check(p, dpo.beta > 0, "dpo.beta", "> 0", dpo.beta)
    _check(p, 0 <= dpo.label_smoothing < 0.5, "dpo.label_smoothing", "in [0, 0.5)", dpo.label_smoothing)
    check_post_data(cfg.data, p, "embedded:pydocs_prefs")
    return _done(cfg, validate_common(cfg, p))


# head sizes vLLM's CPU attention runs (vllm/v1/attention/backends/cpu_attn.py)
def kernels_unavailable(kernels: str, use_gpu: Optional[bool] = None) -> Optional[str]:
    """Why ``model.kernels`` cannot run here, or None (the driver's view: a remote
    cluster's workers are checked when they build the model, ``tidal.models.kernels``)."""
    import importlib.util

    import torch

    if kernels == "none":
        return None
    cuda_here = torch.cuda.is_available()
    if use_gpu is False or (not cuda_here and not os.environ.get("RAY_ADDRESS")):
        why = "scaling.use_gpu=false" if use_gpu is False else "this machine has no CUDA device"
        return f"'{kernels}' runs Triton kernels on CUDA GPUs ({why}); allowed here: none"
    if cuda_here and importlib.util.find_spec("liger_kernel") is None:
        return f"'{kernels}' needs liger-kernel (pip install liger-kernel==0.8.5), which is not installed"
    return None


def check_optim(o, key: str, p: List[str], use_gpu: "bool | None" = None) -> None:
    """An optimizer section (``optim``, ``critic.optim``). ``use_gpu``: ``scaling.use_gpu``;
    a CUDA-only optimizer (``adamw8bit``) is refused where no GPU will run it."""
    from tidal.optim import OPTIMIZERS
    from tidal.optim.optimizers import unavailable

    if o.name not in OPTIMIZERS:
        p.append(f"{key}.name: '{o.name}' is not one of {', '.join(sorted(OPTIMIZERS))}")
    elif (why := unavailable(o.name, use_gpu)) is not None:
        p.append(f"{key}.name: {why}")
    _check(p, o.lr > 0, f"{key}.lr", "> 0", o.lr)
    _check(p, len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"{key}.betas",
           "two values in [0, 1)", o.betas)
    _check(p, o.eps > 0, f"{key}.eps", "> 0", o.eps)
    _check(p, o.weight_decay >= 0, f"{key}.weight_decay", ">= 0", o.weight_decay)
    _check(p, o.grad_clip >= 0, f"{key}.grad_clip", ">= 0 (0 disables clipping)", o.grad_clip)


def check_schedule(s, key: str, max_steps: int, p: List[str]) -> None:
    """A learning-rate schedule section (``schedule``, ``critic.schedule``)."""
    from tidal.optim import SCHEDULES

    if s.name not in SCHEDULES:
        p.append(f"{key}.name: '{s.name}' is not one of {', '.join(sorted(SCHEDULES))}")
    _check(p, 0 <= s.warmup_steps <= max_steps, f"{key}.warmup_steps",
           f"in [0, train.max_steps={max_steps}]", s.warmup_steps)
    if s.warmup_fraction is not None:
        _check(p, 0 <= s.warmup_fraction < 1, f"{key}.warmup_fraction", "in [0, 1) or null",
               s.warmup_fraction)
    _check(p, 0 <= s.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "in [0, 1]", s.min_lr_ratio)
    _check(p, 0 < s.decay_fraction <= 1, f"{key}.decay_fraction", "in (0, 1]", s.decay_fraction)
    _check(p, s.power > 0, f"{key}.power", "> 0", s.power)


def validate_common(cfg, p: List[str], shard_batches: bool = True) -> List[str]:
    """Every out-of-range or inconsistent value in the sections all training stages share
    (model, optim, schedule, scaling, logger, train, run), added to ``p``.
    ``shard_batches``: the stage reads fixed-length samples whose global batch is
    ``train.global_batch_tokens`` (not RL, whose batch is its rollout)."""
    _check_model(cfg, p)
    check_optim(cfg.optim, "optim", p, cfg.scaling.use_gpu)
    if (why := kernels_unavailable(cfg.model.kernels, cfg.scaling.use_gpu)) is not None:
        p.append(f"model.kernels: {why}")
    check_schedule(cfg.schedule, "schedule", cfg.train.max_steps, p)
    lo, hi = _check_scaling(cfg, p)
    _check_guard(cfg.train.guard, p)
    _check_faults(cfg, p)
    _check_train(cfg.train, p)
    if shard_batches:
        _check_global_batch(cfg, lo, hi, p)
    _check_run(cfg.run, p)
    check_credentials(p, cfg)
    return p


def _check_model(cfg, p: List[str]) -> None:
    m = cfg.model
    lo = m.lora
    _check(p, lo.rank >= 0, "model.lora.rank", ">= 0 (0: off)", lo.rank)
    if lo.rank:
        _check(p, lo.alpha > 0, "model.lora.alpha", "> 0", lo.alpha)
        _check(p, 0 <= lo.dropout < 1, "model.lora.dropout", "in [0, 1)", lo.dropout)
        if not lo.target_modules:
            p.append("model.lora.target_modules: empty; give module names (e.g. [q_proj, v_proj]) "
                     "or [all-linear]")
    if m.pretrained is not None:
        check_pretrained(cfg, p)
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
        _check(p, getattr(m, key) >= 1, f"model.{key}", ">= 1", getattr(m, key))
    if m.num_heads >= 1 and m.hidden_size % m.num_heads:
        p.append(f"model.hidden_size: {m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    elif m.pretrained is None and m.num_heads >= 1 and (m.hidden_size // m.num_heads) % 2:
        p.append(f"model.hidden_size: the head dimension {m.hidden_size} / {m.num_heads} = "
                 f"{m.hidden_size // m.num_heads} must be even (rotary embeddings rotate pairs of "
                 "dimensions)")
    if m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads:
        p.append(f"model.num_heads: {m.num_heads} must be divisible by model.num_kv_heads={m.num_kv_heads}")
    _check(p, m.max_position_embeddings >= cfg.data.seq_len, "model.max_position_embeddings",
           f">= data.seq_len ({cfg.data.seq_len})", m.max_position_embeddings)


def _check_scaling(cfg, p: List[str]) -> Tuple[int, int]:
    """The scaling section's checks; returns the worker bounds (0, 0 when they are invalid)."""
    sc = cfg.scaling
    try:
        lo, hi = worker_bounds(sc.workers)
    except ValueError:
        lo = hi = 0
        p.append(f"scaling.workers: {sc.workers!r} is not a worker count (2) or elastic bounds "
                 "'min..max' (\"1..4\")")
    else:
        if not 1 <= lo <= hi:
            p.append(f"scaling.workers: {sc.workers!r} needs 1 <= min <= max")
            lo = hi = 0
    _check(p, sc.same_step_failures >= 0, "scaling.same_step_failures", ">= 0 (0: never stop)",
           sc.same_step_failures)
    _check(p, sc.resize_check_s > 0, "scaling.resize_check_s", "> 0", sc.resize_check_s)
    _check(p, sc.preemption_check_every >= 0, "scaling.preemption_check_every", ">= 0 (0: off)",
           sc.preemption_check_every)
    _check(p, sc.cpus_per_worker >= 1, "scaling.cpus_per_worker", ">= 1", sc.cpus_per_worker)
    _check(p, sc.max_failures >= -1, "scaling.max_failures", ">= -1 (-1: retry forever)", sc.max_failures)
    _check(p, cfg.logger.progress_every >= 1, "logger.progress_every", ">= 1", cfg.logger.progress_every)
    _check(p, sc.start_timeout_s >= 0, "scaling.start_timeout_s", ">= 0 (0: fail at once when the "
           "workers cannot be placed now)", sc.start_timeout_s)
    return lo, hi


def _check_guard(g, p: List[str]) -> None:
    _check(p, g.loss_spike_factor == 0 or g.loss_spike_factor > 1, "train.guard.loss_spike_factor",
           "> 1 (0: off)", g.loss_spike_factor)
    _check(p, g.grad_spike_factor == 0 or g.grad_spike_factor > 1, "train.guard.grad_spike_factor",
           "> 1 (0: off)", g.grad_spike_factor)
    _check(p, g.window >= 1, "train.guard.window", ">= 1", g.window)
    _check(p, 1 <= g.min_history <= g.window, "train.guard.min_history",
           f"in [1, train.guard.window={g.window}]", g.min_history)
    _check(p, g.max_rollbacks >= 0, "train.guard.max_rollbacks", ">= 0", g.max_rollbacks)


def _check_faults(cfg, p: List[str]) -> None:
    sc = cfg.scaling
    try:
        faults = parse_faults(cfg.train.inject_faults)
    except ValueError as e:
        p.append(str(e))
    else:
        rl_only = sorted({f.spec for f in faults if f.kind in ("kill_engine", "kill_reward", "stall_sync")})
        if rl_only and not hasattr(cfg, "rollout"):
            p.append(f"train.inject_faults: {', '.join(rl_only)} drill rollout engines and reward actors, "
                     "which only RL runs (jobs/rlhf.py) have")
        kills = sum(f.kind in ("kill", "kill_in_save") for f in faults)
        if sc.max_failures != -1 and kills > sc.max_failures:
            p.append(f"train.inject_faults: {kills} worker kill(s) need as many retries, but "
                     f"scaling.max_failures={sc.max_failures}; raise scaling.max_failures to at "
                     f"least {kills} (or -1) so the drill can recover")


def _check_train(t, p: List[str]) -> None:
    _check(p, t.max_steps >= 1, "train.max_steps", ">= 1", t.max_steps)
    if t.stop_at_step is not None:
        _check(p, 1 <= t.stop_at_step <= t.max_steps, "train.stop_at_step",
               f"in [1, train.max_steps={t.max_steps}] or null", t.stop_at_step)
    _check(p, t.micro_batch_size >= 1, "train.micro_batch_size", ">= 1", t.micro_batch_size)
    _check(p, t.global_batch_tokens >= 1, "train.global_batch_tokens", ">= 1", t.global_batch_tokens)
    _check(p, t.eval_every >= 1, "train.eval_every", ">= 1", t.eval_every)
    _check(p, t.eval_batches >= 1, "train.eval_batches", ">= 1", t.eval_batches)
    _check(p, t.log_every >= 1, "train.log_every", ">= 1", t.log_every)
    _check(p, t.checkpoint_every >= 0, "train.checkpoint_every", ">= 0 (0: only at the end)",
           t.checkpoint_every)
    _check(p, t.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", t.keep_checkpoints)


def _check_global_batch(cfg, lo: int, hi: int, p: List[str]) -> None:
    """Fixed-length samples: the global batch must split evenly over every worker count."""
    t, sc = cfg.train, cfg.scaling
    if t.global_batch_tokens >= 1 and cfg.data.seq_len >= 8:
        if t.global_batch_tokens % cfg.data.seq_len:
            p.append(f"train.global_batch_tokens: {t.global_batch_tokens} must be a multiple of "
                     f"data.seq_len={cfg.data.seq_len}")
        elif lo >= 1 and lo == hi and t.micro_batch_size >= 1:
            samples = t.global_batch_tokens // cfg.data.seq_len
            per_step = lo * t.micro_batch_size
            if samples % per_step:
                fits = [k for k in range(1, samples // lo + 1) if samples % (lo * k) == 0] \
                    if samples % lo == 0 else []
                lower = (f"lower train.micro_batch_size to {max(k for k in fits if k < t.micro_batch_size)} "
                         f"(any of {', '.join(map(str, fits))} divides the {samples // lo} sequences "
                         f"each of the {lo} workers gets), or " if any(k < t.micro_batch_size for k in fits)
                         else "")
                p.append(f"train.global_batch_tokens: {samples} sequences per step are not divisible "
                         f"by scaling.workers x train.micro_batch_size = {per_step}; {lower}make "
                         f"train.global_batch_tokens a multiple of {per_step * cfg.data.seq_len} tokens")
        elif lo >= 1:  # elastic: the global batch stays fixed, so every size must split it
            samples = t.global_batch_tokens // cfg.data.seq_len
            bad = [w for w in range(lo, hi + 1) if samples % w]
            if bad:
                step = math.lcm(*range(lo, hi + 1))
                p.append(f"train.global_batch_tokens: {samples} sequences per step cannot be split "
                         f"evenly over {', '.join(map(str, bad))} workers (scaling.workers={sc.workers}); "
                         f"allowed: a multiple of {step * cfg.data.seq_len} tokens")


def _check_run(r, p: List[str]) -> None:
    check_name(p, "run.name", r.name)
    _check(p, r.lease_stale_s > 0, "run.lease_stale_s", "> 0", r.lease_stale_s)
    if r.resume_from is not None and not r.resume_from.startswith(_CLOUD) \
            and not os.path.isdir(os.path.expanduser(r.resume_from)):
        p.append(f"run.resume_from: checkpoint directory '{r.resume_from}' does not exist")


def validate_prepare(cfg: PrepareConfig) -> PrepareConfig:
    p: List[str] = []
    check_data(cfg.data, p)
    _check_run(cfg.run, p)
    check_credentials(p, cfg)
    if p:
        raise ConfigError(p)
    return cfg


def validate_export(cfg: ExportConfig) -> ExportConfig:
    creds: List[str] = []
    check_credentials(creds, cfg)
    if creds:
        raise ConfigError(creds)
    if cfg.checkpoint.startswith(_CLOUD):
        return cfg  # checked when fetched
    path = os.path.expanduser(cfg.checkpoint)
    if not os.path.isdir(path):
        raise ConfigError([f"checkpoint: directory '{cfg.checkpoint}' does not exist"])
    if not os.path.exists(os.path.join(path, ".metadata")) or \
            not os.path.isdir(os.path.join(path, "hf_meta")):
        raise ConfigError([f"checkpoint: '{cfg.checkpoint}' is not a tidal checkpoint "
                           "(expected .metadata and hf_meta/ inside)"])
    return cfg


def validate_eval(cfg):
    p: List[str] = []
    check_credentials(p, cfg)
    from tidal.train.publish import check_readable

    for key in ("model_dir", "before"):
        path = getattr(cfg, key)
        if path is not None and os.path.isdir(os.path.expanduser(path)):
            bad = check_readable(os.path.expanduser(path))
            if bad:
                p.append(f"{key}: '{path}' is not a complete export: {'; '.join(bad[:3])}")
    for key in ("model_dir", "before", "text_data", "sft_data", "pair_data"):
        path = getattr(cfg, key)
        if path is not None and not os.path.isdir(os.path.expanduser(path)):
            p.append(f"{key}: directory '{path}' does not exist")
    if os.path.isdir(os.path.expanduser(cfg.model_dir)) and \
            not os.path.exists(os.path.join(os.path.expanduser(cfg.model_dir), "config.json")):
        p.append(f"model_dir: '{cfg.model_dir}' is not an HF model directory (no config.json)")
    for key in ("text_data", "sft_data", "pair_data"):
        path = getattr(cfg, key)
        if path and os.path.isdir(path) and not os.path.exists(os.path.join(path, "manifest.json")):
            p.append(f"{key}: '{path}' is not a prepared data directory (no manifest.json)")
        elif path and os.path.isdir(path):
            import json

            with open(os.path.join(path, "manifest.json")) as f:
                val = json.load(f).get("counts", {}).get("val", {})
            if not val.get("samples"):
                p.append(f"{key}: '{path}' has no validation split (too little data to hold one "
                         "out): nothing to evaluate on")
    _check(p, cfg.max_samples >= 1, "max_samples", ">= 1", cfg.max_samples)
    _check(p, cfg.max_new_tokens >= 1, "max_new_tokens", ">= 1", cfg.max_new_tokens)
    if p:
        raise ConfigError(p)
    return cfg
