"""Typed, frozen configuration schemas.

Every job's configuration is a tree of these dataclasses. Jobs compose YAML with Hydra and
turn the result into these objects with :func:`tidal.config.from_dict`, which checks keys,
types and ranges; the library and Ray workers only ever see the frozen objects.

These defaults are the only ones: they are what ``python jobs/<stage>.py`` runs with no
overrides (the CPU "tiny" preset), and a conf file sets only what its choice changes (a
bigger model, another schedule). Choices are ``Literal`` types, checked by the converter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional, Tuple


def worker_bounds(workers: Any) -> Tuple[int, int]:
    """``(min, max)`` from ``scaling.workers``: 2, "2" or "1..4"; ValueError otherwise."""
    if isinstance(workers, bool):
        raise ValueError(workers)
    if isinstance(workers, int):
        return workers, workers
    text = str(workers).strip()
    lo, sep, hi = text.partition("..")
    if not sep:
        lo = hi = text
    if not (lo.strip().isdigit() and hi.strip().isdigit()):
        raise ValueError(workers)
    return int(lo), int(hi)


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (peft) on a pretrained model: the base stays frozen and only the
    adapters (and the rows of tokens added to the vocabulary) train. ``rank: 0`` is off."""

    rank: int = 0
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # module names (suffixes) to adapt; ["all-linear"]: every linear layer but the output head
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    merge_export: bool = True  # train.export_hf: also write the base with adapters merged in


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM, built from an architecture config or loaded from a local HF directory."""

    name: str = "tiny"
    arch: Literal["llama", "qwen2", "mistral"] = "llama"
    pretrained: Optional[str] = None  # local HF checkpoint directory; overrides the shape below
    hidden_size: int = 192  # the tiny preset: ~3M parameters with a 4k vocabulary
    num_layers: int = 4
    num_heads: int = 6  # head_dim 32: a size vLLM's CPU attention supports (rollouts)
    num_kv_heads: int = 6
    intermediate_size: int = 512
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # liger: Liger-Kernel's Triton RMSNorm, SwiGLU and RoPE in the llama/qwen2/mistral
    # blocks and its fused linear cross-entropy for the next-token loss (CUDA only)
    kernels: Literal["none", "liger"] = "none"
    # build on the meta device, shard, then materialise only this worker's shards (seeded
    # init or the pretrained files' rows); false: every worker builds the whole model first.
    # From scratch it draws other initial weights than the whole-model path (a seeded rule per
    # row block instead of one RNG stream), so it is opt-in; the 1B and 8B presets set it
    meta_init: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # pretraining a `pretrained` model on text from another tokenizer is refused unless set
    allow_tokenizer_mismatch: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """A local HF tokenizer directory, or a byte-level BPE trained on the corpus."""

    path: Optional[str] = None
    vocab_size: int = 4096
    min_frequency: int = 2
    train_max_chars: int = 20_000_000


@dataclass(frozen=True)
class FilterConfig:
    """Gopher/C4-style quality heuristics; a document failing any enabled one is dropped."""

    enabled: bool = True
    min_words: int = 20
    max_words: int = 100_000
    min_mean_word_length: float = 2.5
    max_mean_word_length: float = 12.0
    max_symbol_word_ratio: float = 0.1  # '#' and '...' per word
    min_end_punct_line_fraction: float = 0.0  # C4 keeps lines ending in punctuation; 0 = off
    max_dup_line_fraction: float = 0.3
    max_top_ngram_fraction: float = 0.2  # characters in the most frequent word 2-gram
    max_dup_ngram_fraction: float = 0.5  # characters in repeated word 5-grams
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    min_stop_words: int = 2
    boilerplate: bool = True  # lorem ipsum, javascript notices, cookie banners
    min_script_fraction: float = 0.0  # share of letters in `script`; 0 = off
    script: str = "latin"


@dataclass(frozen=True)
class PIIConfig:
    enabled: bool = True
    types: List[str] = field(default_factory=lambda: ["email", "phone", "ip", "credit_card", "secret"])


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    shingle_words: int = 3
    num_perm: int = 128
    bands: int = 32  # LSH: bands x rows = num_perm; candidates from Jaccard ~0.4 up,
    rows: int = 4  # then verified against the threshold on the full signatures
    threshold: float = 0.7  # Jaccard similarity (estimated) to call two documents near-duplicates
    seed: int = 42
    # Below this many documents the group-bys run in the driver with the same functions:
    # Ray Data's per-stage scheduling costs more than it saves on small corpora.
    distributed_min_docs: int = 50_000


@dataclass(frozen=True)
class CurationConfig:
    normalize: bool = True
    filters: FilterConfig = field(default_factory=FilterConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    write_dropped: bool = False  # side output: every dropped record with its reason


@dataclass(frozen=True)
class CurriculumConfig:
    """Order training samples from easy to hard for the first ``epochs`` epochs (then
    random). ``score`` names a scorer in ``tidal.data.curriculum.SCORERS``; null: off."""

    score: Optional[str] = None
    epochs: int = 1


@dataclass(frozen=True)
class SourceConfig:
    """One named source of a mixture, read with its own format and text field."""

    name: str = "source"
    sources: List[str] = field(default_factory=list)
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    text_unit: Literal["file", "paragraph", "line"] = "paragraph"
    weight: float = 1.0  # share of training tokens, relative to the other sources


@dataclass(frozen=True)
class DataConfig:
    """Sources to tokenize, pack and shard (see ``jobs/prepare.py``)."""

    name: str = "pydocs"
    # "embedded:pydocs" (text shipped with Python), or local paths / globs / directories,
    # or s3:// and gs:// URIs.
    sources: List[str] = field(default_factory=lambda: ["embedded:pydocs"])
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = "text"
    text_unit: Literal["file", "paragraph", "line"] = "paragraph"  # how plain text splits into documents
    min_chars: int = 1
    seq_len: int = 256
    val_fraction: float = 0.05
    shard_samples: int = 2048
    seed: int = 0
    # Where shards go; empty means <run.output_dir>/data/<name>-<config hash>.
    output_dir: Optional[str] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    # Several named sources with sampling weights; when set, `sources` and the reading
    # options above are not used. downsample: no document repeats, the largest mixture the
    # data allows; upsample: sources below their share are repeated, nothing is left out.
    mixture: List[SourceConfig] = field(default_factory=list)
    mixture_mode: Literal["downsample", "upsample"] = "downsample"
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"
    lr: float = 2e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    fused: Optional[bool] = None  # None: fused where the device supports it


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule; ``name`` is a key of ``tidal.optim.schedules.SCHEDULES``."""

    name: str = "cosine"
    warmup_steps: int = 20
    # a share of train.max_steps instead (e.g. 0.05); when set it replaces warmup_steps
    warmup_fraction: Optional[float] = None
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # WSD: share of training spent in the final decay
    power: float = 1.0  # polynomial decay exponent


@dataclass(frozen=True)
class ScalingConfig:
    # A fixed count (2) or elastic bounds "min..max" ("1..4"): Ray Train starts with what
    # the cluster offers (>= min), restarts with fewer workers on node loss and grows back.
    workers: Any = 2
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False
    max_failures: int = 3  # Ray Train FailureConfig retries after a lost worker; -1: forever
    same_step_failures: int = 2  # stop (with a report) when this many attempts in a row die at one step; 0: never
    resize_check_s: float = 60.0  # elastic: how often Ray Train looks for capacity to grow into
    preemption_check_every: int = 10  # steps between Ray Train preemption checks (a barrier); 0: off
    # how long a run waits for the cluster to offer its minimum workers (an autoscaler adding
    # nodes) before failing with what it asked for and what exists; a local runtime that can
    # never hold them fails at once
    start_timeout_s: float = 600.0


@dataclass(frozen=True)
class LoggerConfig:
    wandb: bool = True
    wandb_mode: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online only with an API key
    project: str = "tidal"
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    run_id: Optional[str] = None  # W&B run id; default run.name (a sweep trial keeps one across restarts)
    progress: bool = True  # live progress bar on the driver (a terminal), else plain lines
    progress_every: int = 10  # steps between plain progress lines when stdout is not a terminal


@dataclass(frozen=True)
class GuardConfig:
    """Divergence guards: checked every step before the optimizer update is applied."""

    enabled: bool = True
    loss_spike_factor: float = 3.0  # loss > factor x running median of healthy losses; 0: off
    grad_spike_factor: float = 10.0  # grad norm > factor x its running median; 0: off
    window: int = 50  # healthy steps in the running medians
    min_history: int = 20  # spikes are judged only after this many healthy steps
    max_rollbacks: int = 3  # then stop with a report


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 200  # the schedule's length
    stop_at_step: Optional[int] = None  # stop early (with a checkpoint), schedule unchanged
    global_batch_tokens: int = 8192
    micro_batch_size: int = 8  # sequences per worker per forward/backward
    eval_every: int = 50
    eval_batches: int = 2
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 1234
    deterministic: bool = False
    export_hf: bool = True
    async_checkpoint: bool = False  # DCP async_save: training continues while shards are written
    # every N optimizer steps: per-layer-group gradient norms, update-to-parameter ratios and
    # the step's communication seconds (tidal.train.dynamics); 0: never
    dynamics_every: int = 10
    # torch.compile each decoder block (torchtitan's approach: blocks compiled in place, then
    # sharded; parameter names and checkpoints unchanged)
    compile: bool = False
    guard: GuardConfig = field(default_factory=GuardConfig)
    inject_faults: List[str] = field(default_factory=list)  # drills: kill@S[:R], kill_in_save@S[:R], nan@S, spike@S


@dataclass(frozen=True)
class RunConfig:
    name: str = "pretrain"
    output_dir: str = "outputs"  # local run directory root: config, run card, metrics, plots
    storage_path: Optional[str] = None  # checkpoints; local dir or s3:// / gs://. Default output_dir
    resume_from: Optional[str] = None  # a checkpoint directory to start from
    # Config keys (or sections, e.g. "optim") allowed to differ from the checkpoint's when
    # resuming; any other change to what the checkpoint means is refused. "*": allow all.
    allow_changes: List[str] = field(default_factory=list)
    # A run holds a lease in its storage while a driver runs it: a second driver on the same
    # name is refused. A lease whose heartbeat is older than this is taken over (so is one
    # whose driver process is gone on this host); take_over=true takes a live one.
    lease_stale_s: float = 120.0
    take_over: bool = False


@dataclass(frozen=True)
class StageConfig:
    """The sections every training stage shares; a stage adds its data (and its own
    parameters, e.g. ``dpo``) and may change a default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass(frozen=True)
class PretrainConfig(StageConfig):
    data: DataConfig = field(default_factory=DataConfig)


@dataclass(frozen=True)
class PostTrainingConfig(StageConfig):
    """What the post-training stages share: they start from a trained model
    (``model.pretrained``), with a short warmup and a short run; each sets its learning
    rate (no weight decay) and run name."""

    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(warmup_steps=6))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=60, micro_batch_size=4, eval_every=20, checkpoint_every=30))


def _optim(lr: float):
    return field(default_factory=lambda: OptimConfig(lr=lr, weight_decay=0.0))


def _run(name: str):
    return field(default_factory=lambda: RunConfig(name=name))


@dataclass(frozen=True)
class PostDataConfig:
    """Records for a post-training stage: JSON-list / JSONL (.gz) files, directories, globs,
    s3:// or gs:// URIs, or an embedded set derived from the Python docs."""

    name: str = "records"
    sources: List[str] = field(default_factory=list)
    limit: Optional[int] = None  # use only the first N records (quick runs, ablations)
    seq_len: int = 256
    val_fraction: float = 0.05
    chat_template: Optional[str] = None  # Jinja; default: the tokenizer's own, else ChatML
    seed: int = 0
    output_dir: Optional[str] = None  # default <storage>/data/<name>-<hash>


@dataclass(frozen=True)
class SFTDataConfig(PostDataConfig):
    """Instruction data: Alpaca records, prompt/completion pairs or chat ``messages``;
    by default instructions derived from the Python docs shipped with Python."""

    name: str = "pydocs_instruct"
    sources: List[str] = field(default_factory=lambda: ["embedded:pydocs_instruct"])
    packing: bool = True  # several conversations per row, attention kept within each


@dataclass(frozen=True)
class SFTConfig(PostTrainingConfig):
    """Supervised fine-tuning on the pretraining engine: same model, optimizer, schedule,
    scaling, checkpoints and fault tolerance; another objective and data source.
    ``model.pretrained``: an HF directory (e.g. a pretraining run's hf/ export); empty means
    the main pretraining job's newest export, pretraining one first if there is none."""

    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = _optim(3e-4)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        max_steps=60, micro_batch_size=8, eval_every=20, checkpoint_every=30))
    run: RunConfig = _run("sft")


@dataclass(frozen=True)
class PairDataConfig(PostDataConfig):
    """Preference pairs: ``{prompt, chosen, rejected}`` records or HH-RLHF transcripts; by
    default the Python docs' answer to a question preferred over another topic's."""

    name: str = "pydocs_prefs"
    sources: List[str] = field(default_factory=lambda: ["embedded:pydocs_prefs"])


@dataclass(frozen=True)
class DPOParams:
    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "cdpo"] = "sigmoid"  # cdpo: conservative, label_smoothing flipped labels
    label_smoothing: float = 0.1  # cdpo: the assumed share of flipped labels
    # batch: the reference's log-probs per batch, without gradients (a frozen copy of the
    # starting model, or with LoRA the base with adapters off: no second copy);
    # precompute: one pass over the pairs before training, cached in the run directory, and
    # no reference model in memory while training (the KL is then a per-sequence k1 estimate)
    reference: Literal["batch", "precompute"] = "batch"


@dataclass(frozen=True)
class RewardConfig(PostTrainingConfig):
    """Reward model: a scalar head on the causal LM, Bradley-Terry loss on pairs."""

    data: PairDataConfig = field(default_factory=PairDataConfig)
    optim: OptimConfig = _optim(1e-4)
    run: RunConfig = _run("reward")


@dataclass(frozen=True)
class DPOConfig(PostTrainingConfig):
    """Direct preference optimization against a frozen reference (the starting model)."""

    data: PairDataConfig = field(default_factory=PairDataConfig)
    dpo: DPOParams = field(default_factory=DPOParams)
    optim: OptimConfig = _optim(5e-5)
    run: RunConfig = _run("dpo")
