"""One typed config for every powerclip run.

The schema is a tree of dataclasses; YAML presets in configs/ fill it and dotted overrides on the
command line (``optim.lr=1e-4``) patch it. OmegaConf does the merging and the type checks, so an
unknown key or a value of the wrong type fails with a message that names the full dotted key.
Checks that need more than a type (ranges, choices, cross-field rules) live in ``validate``.

The resolved config is saved in the run folder (``config.yaml``) and hashed into every checkpoint,
so a resumed run can tell whether it is continuing the same experiment.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from powerclip.atomic import write_text_atomic


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending dotted key."""


# --------------------------------------------------------------------------------------- data
@dataclass
class DataSourceConfig:
    """One shard set. ``shards`` is a brace pattern (``/data/cc12m/{00000..01242}.tar``)."""

    shards: str = "???"
    weight: float = 1.0


@dataclass
class DataConfig:
    sources: list[DataSourceConfig] = field(default_factory=list)
    # resampled: infinite stream drawing shards with replacement (the usual pretraining mode);
    # otherwise epoch mode, which needs at least ranks x workers shards (checked before training).
    resampled: bool = True
    batch_size: int = 32  # per rank, per micro-batch
    workers: int = 2  # loader processes per rank (the GPU presets use 8)
    # batches each worker prepares ahead (DataLoader prefetch_factor); each costs one uint8 image
    # buffer of batch_size x 3 x H x W bytes in shared memory
    prefetch_factor: int = 2
    # page-locked host batches so the copy to the GPU is asynchronous (ignored without CUDA)
    pin_memory: bool = True
    shuffle_buffer: int = 1000
    shard_shuffle: bool = True
    seed: int = 0
    tokenizer: str = "clip"  # "clip" (open_clip BPE) or "sentencepiece:/path/model.model"
    context_length: int = 77
    # regions (docs/losses.md §2)
    num_regions: int = 10
    region_source: str = "random"  # random | precomputed (json boxes) | patches (samlens/samcat .npy)
    # grid of the ``patches`` regions' indices: 14 = patch 16 at 224 px, PowerCLIP's published
    # shards; null = the model's own grid
    region_grid: int | None = 14
    # parse-tree phrases (docs/losses.md §2)
    max_phrases: int = 32
    phrase_unit: str = "tree"  # tree | token  (ablation: single tokens instead of tree nodes)
    # concepts (docs/losses.md §3)
    concepts: bool = False
    max_concepts_per_caption: int | None = None
    # hard negatives (docs/losses.md §4)
    num_negatives: int = 0
    # augmentation (open_clip's train transform)
    augment_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])


# -------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    # Either an open_clip built-in name ("ViT-B-16") or a full open_clip model_cfg dict in ``config``.
    name: str | None = None
    config: dict[str, Any] | None = None
    # Starting weights: our checkpoint dir, an exported open_clip folder, or an open_clip weights file.
    pretrained: str | None = None
    init_logit_scale: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)  # clamp applied where the scale is used
    init_logit_bias: float | None = None  # SigLIP: -10
    grad_checkpointing: bool = False
    # default: the open_clip config's pooling (ViT: CLS token, text: EOT token); mean: both towers
    # average their tokens (PowerCLIP's released code). The ViT's is open_clip's own pool_type "avg"
    # (patch tokens); the text tower's (SOT..EOT) has no open_clip config key, so the export records
    # it under "powerclip" in open_clip_config.json and powerclip's evaluation applies it
    pool: str = "default"


# ------------------------------------------------------------------------------------- losses
@dataclass
class PowersetLossConfig:
    """PowerCLIP powerset alignment (docs/losses.md §2)."""

    weight: float = 0.0  # lambda; 0 switches the term off
    tau: float = 1e-3
    zeta: float = 0.15
    margin: float = 0.2  # delta
    region_scale: float | None = None  # None -> 1/M_i, M_i = valid regions of image i (= 1/M when all filled)
    phrase_pool: str = "mean"  # mean | sum
    use_t1: bool = True
    use_t2: bool = True
    singletons_only: bool = False
    exact: bool = False  # enumerate all 2^M subsets (M <= 12); tests and zeta calibration
    memory_budget_mb: float = 512.0  # per column chunk of the [rows, chunk, M, K] intermediates
    # all | local | sample:N (losses/pool.py): captions/images each row is scored against; sample:4096
    # is every column up to a global batch of 4096 (the paper's) and a fixed per-rank cost beyond
    negative_pool: str = "sample:4096"
    # run | fp32: dtype in which phi/p cross ranks. run = the model's dense-feature dtype (bf16 under a
    # bf16 run: half the traffic and gather buffers); the scoring itself is always fp32
    gather_precision: str = "run"
    # fp32 | bf16: operands of the score matmuls (losses/matmul_precision.py); activations, softmax /
    # log-sum-exp and reductions stay fp32 either way. bf16 runs on tensor cores; fp32 is the safe default
    matmul_precision: str = "fp32"


@dataclass
class ConceptLossConfig:
    """C2LIP concept-centric losses (docs/losses.md §3)."""

    npc_weight: float = 0.0
    xac_weight: float = 0.0
    form: str = "auto"  # auto (follows loss.global) | sigmoid | softmax
    false_negative_fix: bool = True
    xac_lambda: float = 1.0
    memory_budget_mb: float = 512.0
    # all | local | sample:N over the images whose concepts enter the pool (losses/pool.py)
    negative_pool: str = "sample:1024"
    # fp32 | bf16: operands of XAC's similarity / Gram matmuls (losses/matmul_precision.py); the
    # attention softmax, norms and reductions stay fp32 either way
    matmul_precision: str = "fp32"


@dataclass
class DeglaLossConfig:
    """DeGLA fine-tuning stage (docs/losses.md §4). ``enabled`` swaps the global loss for NegCLIP."""

    enabled: bool = False
    base_weight: float = 1.0
    igc_weight: float = 0.1
    tgc_weight: float = 0.1
    tgc_scale: float = 10.0
    distill_weight: float = 1.0
    # mean: squared L2 averaged per vector (images + captions + valid negatives); sum: summed over the
    # global batch, the released recipe's reduction (F.mse_loss(reduction="sum"), weighted 0.005)
    distill_reduction: str = "mean"
    ema_decay: float = 0.9996
    # EMA teacher weights: fp32, or bf16 (half the memory; stochastic rounding keeps the updates)
    ema_dtype: str = "fp32"
    # all | local | sample:N: samples whose hard negatives enter every image's NegCLIP columns (each
    # image's own negatives always do; losses/pool.py); the paper's batch 256 is far below the default
    negative_pool: str = "sample:4096"
    # presets set this: a DeGLA stage fine-tunes trained weights, so a missing model.pretrained is an
    # error (False lets tests run the losses on random weights)
    require_pretrained: bool = False


@dataclass
class LossConfig:
    global_loss: str = "clip"  # clip | siglip
    global_weight: float = 1.0
    powerset: PowersetLossConfig = field(default_factory=PowersetLossConfig)
    concept: ConceptLossConfig = field(default_factory=ConceptLossConfig)
    degla: DeglaLossConfig = field(default_factory=DeglaLossConfig)


# ------------------------------------------------------------------------------- optimisation
@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    # torch's fused AdamW kernel (CPU and CUDA): one kernel over all parameters instead of the
    # per-parameter loop that torch.optim.AdamW (and so open_clip_train) runs by default, same update
    # up to rounding (tools/bench_train.py measures both)
    fused: bool = True


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 | fp16
    zero_stage: int = 2
    # Feature-caching gradient accumulation (open_clip's method): the loss of every micro-batch sees
    # the features of all accum_steps micro-batches, so the negative pool is the whole global batch.
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    # Resuming on another number of ranks: keep the checkpoint's global batch (data.batch_size per
    # rank becomes global / (ranks x accum_steps), logged) or, when false, train on with
    # data.batch_size x ranks x accum_steps as configured.
    keep_global_batch: bool = True
    # CPU runs only: glibc keeps freed memory mapped between steps instead of returning it to the
    # kernel and page-faulting it back in (powerclip/train/host_memory.py; tools/bench_train.py measures the cost)
    keep_freed_host_memory: bool = True
    # Timeout of the process group: the rendezvous and every collective. A rank that cannot reach
    # MASTER_ADDR:MASTER_PORT, or a peer that died, fails the job after this long instead of hanging
    # it. Raise it when one rank alone does slow work between collectives (a checkpoint save to slow
    # storage, a long periodic evaluation).
    dist_timeout_s: float = 1800.0
    # DeepSpeed settings a GPU run wants (train.deepspeed below still overrides any of them):
    # gradients accumulated over micro-batches in fp32 under bf16 (ZeRO >= 1; DeepSpeed's ZeRO-0 bf16
    # path accumulates in bf16), and reduced across ranks in reduce_dtype (not in bf16)
    grad_accum_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    overlap_comm: bool = True  # ZeRO >= 1: reduce gradient buckets while backward still runs
    contiguous_gradients: bool = True  # ZeRO >= 1: copy gradients into one buffer (less fragmentation)
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 500_000_000  # ZeRO 1/2: elements per parameter all-gather bucket
    prefetch_bucket_size: int = 50_000_000  # ZeRO-3: elements of parameters fetched ahead
    # torch.compile the image and text towers (ZeRO 0/1/2); compile_backend is torch.compile's backend
    compile: bool = False
    compile_backend: str = "inductor"
    # Value checks inside the losses (concept owners in range, every caption has a phrase) read device
    # tensors, one host synchronisation each: off by default, on to diagnose a bad batch (powerclip/checks.py)
    debug_checks: bool = False
    # Extra DeepSpeed config merged over what powerclip derives (advanced; e.g. offload settings).
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0 disables
    every_minutes: float = 0.0  # 0 disables
    # this run's complete checkpoints kept, across restarts and requeues (checkpoints.ownership:
    # another run's, or one holding a file its manifest does not list, is never deleted)
    keep_last: int = 3
    resume: str = "latest"  # latest | none | /path/to/checkpoint/dir
    # prune also complete checkpoints older than the one resumed from that carry no run id (written
    # by a powerclip before run ids); off: only checkpoints provably of this run are deleted
    prune_inherited: bool = False


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 disables periodic evaluation
    # "TASK:ROOT" entries, e.g. "synthetic:data/synth", "sugar_crepe:/data/sugarcrepe" (powerclip.eval.api)
    tasks: list[str] = field(default_factory=list)
    batch_size: int = 64
    workers: int = 0  # image decoding processes per rank during evaluation


@dataclass
class SlurmConfig:
    """``powerclip submit`` (powerclip/launch): one task per GPU, requeue on timeout/preemption."""

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU tasks with gloo
    tasks_per_node: int = 1  # used when gpus_per_node == 0
    cpus_per_task: int = 0  # 0: data.workers + 1 (the loader workers + the trainer) with GPUs, else 1
    time_minutes: int = 60
    max_requeues: int = 3  # resubmissions after a timeout/preemption signal (counted in RUN/slurm/)
    signal_delay_s: int = 120  # USR2 this many seconds before the time limit (checkpoint + requeue)
    mem_gb: float | None = None  # per node; None: the cluster's default
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    job_name: str = "powerclip"
    master_port: int = 0  # 0: derived from the job id (20000 + id % 20000), same as dist_env
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ...)
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {mail-type: END}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# ------------------------------------------------------------------------------------ loading
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.region_source": ("random", "precomputed", "patches"),
    "data.phrase_unit": ("tree", "token"),
    "loss.global_loss": ("clip", "siglip"),
    "loss.powerset.phrase_pool": ("mean", "sum"),
    "loss.powerset.matmul_precision": ("fp32", "bf16"),
    "loss.concept.matmul_precision": ("fp32", "bf16"),
    "loss.concept.form": ("auto", "sigmoid", "softmax"),
    "loss.degla.distill_reduction": ("mean", "sum"),
    "model.pool": ("default", "mean"),
    "optim.schedule": ("cosine", "constant"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "loss.degla.ema_dtype": ("fp32", "bf16"),
    "train.grad_accum_dtype": ("fp32", "bf16"),
    "train.reduce_dtype": ("fp32", "bf16", "fp16"),
}


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Range and cross-field checks that the type system cannot express."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {choices}")
    positive = ["data.batch_size", "data.context_length", "data.num_regions", "data.max_phrases",
                "train.steps", "train.accum_steps", "train.dist_timeout_s", "optim.lr", "loss.powerset.tau",
                "loss.powerset.memory_budget_mb", "loss.concept.memory_budget_mb", "data.prefetch_factor",
                "train.reduce_bucket_size", "train.allgather_bucket_size", "train.prefetch_bucket_size"]
    for key in positive:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)!r}")
    nonneg = ["data.workers", "data.shuffle_buffer", "data.num_negatives", "optim.warmup_steps",
              "optim.weight_decay", "optim.grad_clip", "checkpoint.every_steps",
              "checkpoint.every_minutes", "loss.global_weight", "loss.powerset.weight",
              "loss.concept.npc_weight", "loss.concept.xac_weight", "loss.degla.base_weight",
              "loss.degla.igc_weight", "loss.degla.tgc_weight", "loss.degla.distill_weight"]
    for key in dict.fromkeys(nonneg + _extension_weight_keys(cfg.loss)):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)!r}")
    if cfg.train.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {cfg.train.zero_stage}")
    if not 0.0 <= cfg.loss.powerset.zeta <= 1.0:
        raise ConfigError(f"loss.powerset.zeta must be in [0, 1], got {cfg.loss.powerset.zeta}")
    if not 0.0 <= cfg.loss.degla.ema_decay <= 1.0:
        raise ConfigError(f"loss.degla.ema_decay must be in [0, 1], got {cfg.loss.degla.ema_decay}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
    if cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    if (cfg.model.name is None) == (cfg.model.config is None):
        raise ConfigError("exactly one of model.name and model.config must be set")
    if cfg.loss.powerset.exact and cfg.data.num_regions > 12:
        raise ConfigError(f"loss.powerset.exact needs data.num_regions <= 12, got {cfg.data.num_regions}")
    if cfg.loss.degla.enabled and cfg.data.num_negatives < 1:
        raise ConfigError("loss.degla.enabled needs data.num_negatives >= 1")
    if cfg.loss.degla.enabled and cfg.loss.degla.require_pretrained and not cfg.model.pretrained:
        raise ConfigError("model.pretrained is not set: this DeGLA fine-tuning stage starts from trained "
                          "weights (an open_clip tag, export folder, weights file or run folder); pass "
                          "model.pretrained=... (or set loss.degla.require_pretrained=false)")
    if cfg.loss.degla.tgc_scale <= 0:
        raise ConfigError(f"loss.degla.tgc_scale must be > 0, got {cfg.loss.degla.tgc_scale}")
    if cfg.data.region_grid is not None and cfg.data.region_grid < 1:
        raise ConfigError(f"data.region_grid must be >= 1 or null, got {cfg.data.region_grid}")
    for i, src in enumerate(cfg.data.sources):
        if src.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight must be > 0, got {src.weight}")
    for i, spec in enumerate(cfg.eval.tasks):
        task, _, root = spec.partition(":")
        if not task or not root:
            raise ConfigError(f"eval.tasks[{i}]={spec!r} must be 'TASK:ROOT' (e.g. 'synthetic:data/synth')")
    if cfg.eval.batch_size < 1 or cfg.eval.workers < 0 or cfg.eval.every_steps < 0:
        raise ConfigError("eval.batch_size must be >= 1, eval.workers and eval.every_steps >= 0")
    validate_ranges(cfg)
    return cfg


def _numbers(obj: Any, prefix: str) -> list[tuple[str, float]]:
    """Every int/float leaf of the typed config tree, by dotted key (free-form dicts excluded)."""
    out: list[tuple[str, float]] = []
    for f in fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            out += _numbers(value, key + ".")
        elif isinstance(value, list):
            out += [(f"{key}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float))
                    and not isinstance(v, bool)]
            out += [x for i, v in enumerate(value) if is_dataclass(v) for x in _numbers(v, f"{key}[{i}].")]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((key, value))
    return out


def model_context_length(cfg: Config) -> int | None:
    """The text context length of the configured model (None when it has no text tower we can read)."""
    if cfg.model.config is not None:
        text = cfg.model.config.get("text_cfg") or {}
        return int(text.get("context_length", 77)) if isinstance(text, dict) else None
    if cfg.model.name:
        import open_clip

        mc = open_clip.get_model_config(cfg.model.name)
        text = (mc or {}).get("text_cfg") or {}
        return int(text["context_length"]) if "context_length" in text else None
    return None


def validate_ranges(cfg: Config) -> None:
    """Every numeric field finite, plus the ranges a run would otherwise fail on later (or worse,
    train on silently): the logging period, Adam's betas, the crop scales, the context length.
    (``slurm.*`` is checked by ``powerclip submit``, the only command that uses it.)"""
    for key, value in _numbers(cfg, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    if cfg.train.log_every < 1:
        raise ConfigError(f"train.log_every must be > 0, got {cfg.train.log_every}")
    if cfg.train.steps < 1 or cfg.data.batch_size < 1:
        raise ConfigError("train.steps and data.batch_size must be > 0")
    for i, b in enumerate(cfg.optim.betas):
        if not 0.0 <= b < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {b}")
    if not cfg.optim.eps > 0:
        raise ConfigError(f"optim.eps must be > 0, got {cfg.optim.eps}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {cfg.optim.min_lr_ratio}")
    scale = cfg.data.augment_scale
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"data.augment_scale must be [min, max] with 0 < min <= max <= 1, got {scale}")
    if cfg.data.max_concepts_per_caption is not None and cfg.data.max_concepts_per_caption < 1:
        raise ConfigError(f"data.max_concepts_per_caption must be >= 1 (or null), got "
                          f"{cfg.data.max_concepts_per_caption}")
    if cfg.model.logit_scale_max <= 0 or cfg.model.init_logit_scale > cfg.model.logit_scale_max:
        raise ConfigError(f"model.init_logit_scale ({cfg.model.init_logit_scale}) must be <= "
                          f"model.logit_scale_max ({cfg.model.logit_scale_max}), which must be > 0")
    if cfg.loss.powerset.margin < 0 or (cfg.loss.powerset.region_scale is not None
                                        and cfg.loss.powerset.region_scale <= 0):
        raise ConfigError("loss.powerset.margin must be >= 0 and loss.powerset.region_scale > 0 (or null)")
    if cfg.loss.concept.xac_lambda < 0:
        raise ConfigError(f"loss.concept.xac_lambda must be >= 0, got {cfg.loss.concept.xac_lambda}")
    n_ctx = model_context_length(cfg)
    if n_ctx is not None and cfg.data.context_length != n_ctx:
        raise ConfigError(f"data.context_length={cfg.data.context_length} differs from the model's text "
                          f"context length {n_ctx} (model.config.text_cfg.context_length or model.name)")


def _to_dataclass(conf: DictConfig) -> Config:
    obj = OmegaConf.to_object(conf)
    assert isinstance(obj, Config)
    return obj


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or the defaults) and apply dotted ``key=value`` overrides.

    Values of overrides are parsed as YAML, so ``optim.lr=1e-4``, ``data.sources=[{shards: x}]`` and
    ``model.pretrained=null`` work. Every failure names the key.
    """
    schema = OmegaConf.structured(_default_config())
    try:
        layers = [schema]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                with open(path, "rb") as f:
                    data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:  # the problem's own line names the position
                mark = getattr(e, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: top level must be a mapping")
            layers.append(OmegaConf.create(data))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            if OmegaConf.select(schema, key, default="__missing__") == "__missing__" and not _prefix_ok(key):
                raise ConfigError(f"unknown config key {key!r}")
            override = OmegaConf.create()
            OmegaConf.update(override, key, yaml.safe_load(value), force_add=True)
            layers.append(override)
        merged = OmegaConf.merge(*layers)
        cfg = _to_dataclass(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    return validate(cfg)


def _default_config() -> Config:
    """The defaults, with a ``loss.<section>`` for every registered loss term that brings its own."""
    return Config(loss=loss_config_type()())


# Loss-term modules declare their terms in powerclip.losses.registry, which sits above this module; a
# term that brings a config section of its own (or weights config.py does not list) hands them down
# here when it registers, so the loader can type and check them without importing anything above it.
# term name -> (its own section and dataclass, or None; the dotted keys of its weights)
_LOSS_EXTENSIONS: dict[str, tuple[tuple[str, type] | None, tuple[str, ...]]] = {}


def register_loss_extension(term: str, section: tuple[str, type] | None, weight_keys: tuple[str, ...]) -> None:
    """Record a loss term's own section and weight keys (the loss-term registry calls this)."""
    _LOSS_EXTENSIONS[term] = (section, weight_keys)
    loss_config_type.cache_clear()


def unregister_loss_extension(term: str) -> None:
    if _LOSS_EXTENSIONS.pop(term, None) is not None:
        loss_config_type.cache_clear()


def _extension_weight_keys(lc: LossConfig) -> list[str]:
    """Weight keys of registered terms whose section this config holds (each must be >= 0)."""
    return [key for _, keys in _LOSS_EXTENSIONS.values() for key in keys
            if key.count(".") == 1 or hasattr(lc, key.split(".")[1])]


@functools.cache
def loss_config_type() -> type:
    """``LossConfig``, extended by a field for every registered term that brings its own section.

    The config loader builds its schema from this, so ``loss.<section>.*`` of such a term is a typed,
    checked key like any other; with only the package's terms it is ``LossConfig`` itself.
    """
    own = {f.name for f in fields(LossConfig)}
    extra = [(name, cls, field(default_factory=cls)) for section, _ in _LOSS_EXTENSIONS.values()
             if section is not None for name, cls in [section] if name not in own]
    if not extra:
        return LossConfig
    # a module-level name, so configs holding it pickle in any process that registered the same terms
    name = "LossConfig_" + "_".join(section for section, _, _ in extra)
    cls = make_dataclass(name, extra, bases=(LossConfig,), namespace={"__module__": __name__})
    globals()[name] = cls
    return cls


def _prefix_ok(key: str) -> bool:
    """Keys inside free-form dicts (model.config.*, train.deepspeed.*) are allowed."""
    return any(key.startswith(p + ".") for p in ("model.config", "train.deepspeed", "slurm.extra"))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: Config) -> str:
    """Stable hash of the resolved config, stored in checkpoints."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, to_yaml(cfg))
