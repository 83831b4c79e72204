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
from powerclip.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the offending dotted key."""


# --------------------------------------------------------------------------------------- data
@dataclass
class DataSourceConfig:
    """One shard set. ``shards`` is a brace pattern (``/data/cc12m/{00000..01242}.tar``); several may be
    joined with '::' as in open_clip's ``--train-data``. How sources mix: ``powerclip.data.mixing``."""

    shards: str = "???"
    # probability of drawing from this source, normalised over sources (null counts as 1.0); in epoch
    # mode realised by repeating shards a whole number of times per epoch
    weight: float | None = None
    # open_clip's --train-data-upsampling-factors for this source's '::' patterns ("1::2", or one
    # number): the weight of each shard, so a source's share grows with its shard count. Set on every
    # source or none, never together with weight
    upsampling_factors: str | None = None


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
    # the index of the grid's first patch in samcat: 0, or 1 when the indices count the ViT's tokens
    # with CLS at 0. ``powerclip check`` reads the first samples and refuses a base they contradict
    region_index_base: int = 0
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
    # JPEGs decoded at a reduced scale (PIL's Image.draft: libjpeg's 1/2, 1/4 or 1/8 DCT scaling) when
    # the image stays large enough that the transform never upsamples: 2-4x less decode work on
    # CC12M-sized sources. Deterministic (exact resume holds) but not the same pixels as a full decode
    # followed by the resize, hence off by default and on in the GPU presets (docs/data.md)
    jpeg_draft: bool = False
    # training JPEGs decoded on the training device (torchvision's nvJPEG decode, in one call per
    # batch) instead of in the loader workers: the workers read the header, draw the crop and ship
    # the bytes; other formats are decoded in the worker as usual. Needs the crop to be the only
    # pixel-level augmentation (no aug colour jitter or grayscale) and data.jpeg_draft off (docs/data.md)
    decode_on_device: bool = False


# ---------------------------------------------------------------------------------------- aug
AUG_INTERPOLATIONS = ("bicubic", "bilinear", "random")
AUG_RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass
class AugConfig:
    """open_clip's ``--aug-cfg`` keys and its ``--image-*`` preprocessing flags, with its meanings.

    Only what runs identically in the uint8 loader is accepted (``validate_aug``): open_clip's own
    train transform (random resized crop, colour jitter, grayscale) runs in the worker on the PIL image
    with every random choice drawn from the sample's seed; timm's transform (``use_timm``, and the keys
    only it reads: ``ratio``, ``re_prob``, ``re_count``) is refused at config load."""

    scale: list[float] | None = None  # crop area range; null: data.augment_scale
    ratio: list[float] | None = None  # timm only: refused
    # [brightness, contrast, saturation, hue], applied with probability color_jitter_prob
    color_jitter: list[float] | None = None
    color_jitter_prob: float | None = None
    gray_scale_prob: float | None = None
    re_prob: float | None = None  # timm only: refused
    re_count: int | None = None  # timm only: refused
    use_timm: bool = False  # refused
    # preprocessing (open_clip's --image-mean/std/interpolation/resize-mode); null: the model's preprocess_cfg
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None  # bicubic | bilinear | random (evaluation resize; training crops bicubic)
    resize_mode: str | None = None  # shortest | longest | squash (evaluation transform)


def aug_scale(cfg: Config) -> list[float]:
    """The crop scale in force: ``aug.scale``, or its alias ``data.augment_scale``."""
    return list(cfg.aug.scale) if cfg.aug.scale is not None else list(cfg.data.augment_scale)


def aug_cfg_dict(cfg: Config) -> dict[str, Any]:
    """open_clip's ``aug_cfg`` for the training transform (the keys validate_aug accepts)."""
    a = cfg.aug
    out: dict[str, Any] = {"scale": tuple(aug_scale(cfg))}
    if a.color_jitter_prob:
        out["color_jitter"] = tuple(a.color_jitter or ())
        out["color_jitter_prob"] = float(a.color_jitter_prob)
    if a.gray_scale_prob:
        out["gray_scale_prob"] = float(a.gray_scale_prob)
    return out


def aug_preprocess(cfg: Config) -> dict[str, Any]:
    """The open_clip preprocess_cfg entries the ``aug`` section sets (mean, std, interpolation,
    resize_mode): they override the model's, in the loader and in the exported open_clip config."""
    a = cfg.aug
    out = {"mean": a.mean, "std": a.std, "interpolation": a.interpolation, "resize_mode": a.resize_mode}
    return {k: ([float(x) for x in v] if isinstance(v, (list, tuple)) else v) for k, v in out.items() if v is not None}


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
class TowerOptimConfig:
    """What of one tower trains, and how (``optim.image`` / ``optim.text``; docs/training_options.md).

    Locking is open_clip's own ``lock_image_tower`` / ``lock_text_tower``: the locked parameters get
    ``requires_grad=False`` before DeepSpeed is set up, so they take no gradient and no optimizer state.
    """

    lock: bool = False
    # with lock: this many trailing groups stay trainable (open_clip's --lock-image-unlocked-groups for
    # the image tower, --lock-text-unlocked-layers for the text tower; 0 = the whole tower locked)
    unlocked_groups: int = 0
    # image tower with lock: batch-norm running statistics frozen too (--lock-image-freeze-bn-stats;
    # only towers with BatchNorm, e.g. ModifiedResNet / timm convnets, have any)
    freeze_bn_stats: bool = False
    lr: float | None = None  # null: optim.lr
    weight_decay: float | None = None  # null: optim.weight_decay (gains, biases, 1-D: always 0)
    # layer-wise lr decay (EVA-CLIP): lr x layer_decay^(depth + 1 - layer_id), layer_id 0 = the
    # embeddings, i + 1 = block i, depth + 1 = the final norm and projection; 1.0 = off
    layer_decay: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant | const-cooldown
    min_lr_ratio: float = 0.0
    # const-cooldown (open_clip's): constant after warm-up, then over the last cooldown_steps the lr
    # falls as (1 - progress)^cooldown_power from lr to cooldown_end_lr (each group in proportion)
    cooldown_steps: int = 0
    cooldown_power: float = 1.0
    cooldown_end_lr: float = 0.0
    image: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    text: TowerOptimConfig = field(default_factory=TowerOptimConfig)
    grad_clip: float = 1.0  # 0 disables
    # torch's fused AdamW kernel (CPU and CUDA): one kernel over all parameters instead of the
    # per-parameter loop that torch.optim.AdamW (and so open_clip_train) runs by default, same update
    # up to rounding (tools/bench_train.py measures both)
    fused: bool = True


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    # fp32 | bf16 | fp16: the weights in that dtype, fp32 masters in DeepSpeed's optimiser wrapper
    # (ZeRO >= 1 only: at ZeRO-0 DeepSpeed steps a torch optimiser one tensor at a time, with a host
    # read each, and the run is refused); amp_bf16 | amp_fp16: open_clip's recipe, fp32 weights and
    # torch autocast, the torch optimiser unwrapped at ZeRO-0 (amp_fp16 with torch's GradScaler)
    precision: str = "fp32"
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
    # GPU kernel choices open_clip_train makes too: cuDNN autotuning of convolutions, and TF32 for
    # fp32 matmuls and convolutions (the loss's score matmuls stay full fp32 in the forward)
    cudnn_benchmark: bool = True
    tf32: bool = True
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
    # checkpoints (and exports of this run) readable by the owner only: folders 0700, files 0600;
    # off: they follow the process umask like every other file, so a team on shared storage can read them
    private: bool = False


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 disables periodic evaluation; > 0 needs eval.tasks
    # "TASK:ROOT" entries, e.g. "synthetic:data/synth", "sugar_crepe:/data/sugarcrepe"; TASK is one of
    # EVAL_TASKS, optionally with /<part> (EVAL_TASK_PARTS)
    tasks: list[str] = field(default_factory=list)
    batch_size: int = 64
    workers: int = 0  # image decoding processes per rank during evaluation


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard: every scalar TensorBoard gets, from rank 0. Needs the
    optional extra (``pip install 'powerclip[wandb]'``); nothing of wandb is imported while off."""

    enabled: bool = False
    project: str | None = None
    entity: str | None = None
    name: str | None = None  # null: the run folder's name
    tags: list[str] = field(default_factory=list)
    # the wandb run to continue (resume by id); null: the id this run folder recorded on its first
    # start (RUN/wandb_run_id), so a resumed or requeued run logs into the same wandb run
    id: str | None = None
    mode: str | None = None  # online | offline | disabled; null: wandb's default (WANDB_MODE)


@dataclass
class LogConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


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
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


# Evaluation task names (``eval.tasks``, ``powerclip eval --task``): the closed list the evaluator
# dispatches on (powerclip.eval.api), checked when a config loads so a typo fails before training.
EVAL_TASKS: tuple[str, ...] = ("zeroshot_classification", "zeroshot_retrieval", "wds", "sugar_crepe", "aro",
                               "valse", "winoground", "synthetic")
# the parts a compositional task accepts after "/" (VALSE's are its json files' names: not listed)
EVAL_TASK_PARTS: dict[str, tuple[str, ...]] = {
    "sugar_crepe": ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj"),
    "aro": ("vg_relation", "vg_attribution", "coco_order", "flickr30k_order"),
    "valse": (),
}


def eval_task_error(task: str) -> str | None:
    """Why ``task`` (``NAME`` or ``NAME/PART``) is not an evaluation task, listing the valid names;
    None when it is one."""
    base, sep, part = task.partition("/")
    if base not in EVAL_TASKS:
        return f"unknown eval task {base!r}; valid tasks: {', '.join(EVAL_TASKS)}"
    if sep and base not in EVAL_TASK_PARTS:
        return f"eval task {base!r} has no parts (got {task!r})"
    parts = EVAL_TASK_PARTS.get(base, ())
    if sep and (not part or (parts and part not in parts)):
        return f"unknown part {part!r} of eval task {base!r}; valid parts: {', '.join(parts) or 'a VALSE json name'}"
    return None


# ------------------------------------------------------------------------------------ loading
PRECISION_MODES = ("fp32", "bf16", "fp16", "amp_bf16", "amp_fp16")
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
    "optim.schedule": ("cosine", "constant", "const-cooldown"),
    "train.precision": PRECISION_MODES,
    "loss.degla.ema_dtype": ("fp32", "bf16"),
    "train.grad_accum_dtype": ("fp32", "bf16"),
    "train.reduce_dtype": ("fp32", "bf16", "fp16"),
}


def choices(key: str) -> tuple[str, ...]:
    """The values a choice-valued config key accepts (``train.precision`` ...): tools that iterate over
    every mode read them here, so a mode added to the config is picked up without editing them."""
    if key not in _CHOICES:
        raise KeyError(f"{key} is not a choice-valued config key; those are {sorted(_CHOICES)}")
    return _CHOICES[key]


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
        if src.weight is not None and not src.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight must be > 0 or null, got {src.weight}")
        if src.weight is not None and src.upsampling_factors is not None:
            raise ConfigError(f"data.sources[{i}] sets both weight and upsampling_factors; keep one (weight: "
                              "the source's probability, upsampling_factors: open_clip's per-shard factors)")
    check_eval_tasks(cfg.eval)
    if cfg.data.region_index_base not in (0, 1):
        raise ConfigError(f"data.region_index_base must be 0 or 1, got {cfg.data.region_index_base}")
    if cfg.eval.batch_size < 1 or cfg.eval.workers < 0 or cfg.eval.every_steps < 0:
        raise ConfigError("eval.batch_size must be >= 1, eval.workers and eval.every_steps >= 0")
    validate_combinations(cfg)
    validate_ranges(cfg)
    return cfg


def check_eval_tasks(ev: EvalConfig) -> None:
    """``eval.tasks`` entries are ``TASK:ROOT`` with a known TASK, and periodic evaluation has tasks."""
    for i, spec in enumerate(ev.tasks):
        task, _, root = spec.partition(":")
        if not task or not root:
            raise ConfigError(f"eval.tasks[{i}]={spec!r} must be 'TASK:ROOT' (e.g. 'synthetic:data/synth')")
        problem = eval_task_error(task)
        if problem:
            raise ConfigError(f"eval.tasks[{i}]={spec!r}: {problem}")
    if ev.every_steps > 0 and not ev.tasks:
        raise ConfigError(f"eval.every_steps={ev.every_steps} but eval.tasks is empty, so nothing would be "
                          "evaluated; list tasks (eval.tasks='[\"zeroshot_classification:/data/wds/imagenet1k\"]') "
                          "or set eval.every_steps=0")

def validate_combinations(cfg: Config) -> None:
    """Keys that are each valid but cannot work together, refused at load rather than after launch."""
    validate_decode_on_device(cfg)
    if cfg.train.compile and cfg.train.zero_stage == 3:
        raise ConfigError("train.compile=true does not work with train.zero_stage=3 (ZeRO-3 gathers each "
                          "parameter on use, which torch.compile cannot trace); set train.compile=false or "
                          "train.zero_stage <= 2")
    concept_on = cfg.loss.concept.npc_weight > 0 or cfg.loss.concept.xac_weight > 0
    sigmoid = cfg.loss.global_loss == "siglip" or (concept_on and cfg.loss.concept.form == "sigmoid")
    if sigmoid and model_logit_bias(cfg) is None:
        which = ("loss.global_loss=siglip" if cfg.loss.global_loss == "siglip"
                 else "loss.concept.form=sigmoid")
        raise ConfigError(f"{which} needs a logit bias, but model.init_logit_bias is not set and the model's "
                          f"open_clip config has none; set model.init_logit_bias (e.g. -10)")


def model_logit_bias(cfg: Config) -> float | None:
    """``init_logit_bias`` the model will be built with: the key, else its open_clip config's (read
    from open_clip's model_configs file, without importing open_clip)."""
    if cfg.model.init_logit_bias is not None:
        return cfg.model.init_logit_bias
    if cfg.model.config is not None:
        return cfg.model.config.get("init_logit_bias")
    return _builtin_model_cfg(cfg.model.name or "").get("init_logit_bias")


@functools.cache
def _builtin_model_cfg(name: str) -> dict[str, Any]:
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return {}
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model_configs" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return {}


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
        mc = _builtin_model_config(cfg.model.name)
        if mc is None:  # not one of open_clip's shipped json configs: ask open_clip itself
            import open_clip

            mc = open_clip.get_model_config(cfg.model.name)
        text = (mc or {}).get("text_cfg") or {}
        return int(text["context_length"]) if "context_length" in text else None
    return None


def _builtin_model_config(name: str) -> dict[str, Any] | None:
    """open_clip's shipped ``model_configs/NAME.json``, read without importing open_clip (and torch):
    loading a config stays fast, so a mistake in it is reported in well under a second."""
    import importlib.util
    import json

    spec = importlib.util.find_spec("open_clip")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "model_configs" / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
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
    validate_optim(cfg)
    validate_patch_dropout(cfg)
    if cfg.log.wandb.mode not in (None, "online", "offline", "disabled"):
        raise ConfigError(f"log.wandb.mode={cfg.log.wandb.mode!r} is not one of online, offline, disabled (or null)")
    scale = cfg.data.augment_scale
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ConfigError(f"data.augment_scale must be [min, max] with 0 < min <= max <= 1, got {scale}")
    validate_aug(cfg)
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


def validate_decode_on_device(cfg: Config) -> None:
    """``data.decode_on_device`` leaves the workers without pixels: every pixel-level step of the
    training transform but the crop and resize (colour jitter, grayscale) would need them, and a
    draft decode draws the crop on the reduced image the device never sees."""
    if not cfg.data.decode_on_device:
        return
    for key in ("color_jitter_prob", "gray_scale_prob"):
        if getattr(cfg.aug, key):
            raise ConfigError(f"data.decode_on_device=true cannot run aug.{key}={getattr(cfg.aug, key)} (it needs "
                              f"the pixels in the loader worker); set aug.{key}=0 or data.decode_on_device=false")
    if cfg.data.jpeg_draft:
        raise ConfigError("data.decode_on_device=true cannot run with data.jpeg_draft=true (the draft decode "
                          "is a worker-side saving; the device decodes in full); set data.jpeg_draft=false")


def validate_aug(cfg: Config) -> None:
    """The ``aug`` section: ranges, and a refusal for what the uint8 loader cannot run as open_clip does.

    timm's transform (``use_timm``) ends in random erasing with per-pixel normal noise drawn in the
    normalised space, after Normalize: on uint8 pixels that noise would be clipped and quantised, and
    on the device it would need each sample's rectangles and noise seed shipped with the batch, so it
    is refused; ``ratio``, ``re_prob`` and ``re_count`` are read by timm's transform only (open_clip's
    own ignores them with a warning), so setting them without it is a mistake."""
    a = cfg.aug
    if a.use_timm:
        raise ConfigError("aug.use_timm=true is not supported: timm's transform erases after Normalize with "
                          "normal noise the uint8 loader cannot reproduce; use open_clip's own aug keys")
    for key in ("ratio", "re_prob", "re_count"):
        if getattr(a, key) is not None:
            raise ConfigError(f"aug.{key} is read only by timm's transform (aug.use_timm), which powerclip does "
                              f"not support; remove aug.{key} (open_clip would ignore it)")
    if a.scale is not None:
        if list(cfg.data.augment_scale) != [0.9, 1.0]:
            raise ConfigError("aug.scale and data.augment_scale are both set; set only aug.scale (the other is "
                              "its alias)")
        if len(a.scale) != 2 or not 0.0 < a.scale[0] <= a.scale[1] <= 1.0:
            raise ConfigError(f"aug.scale must be [min, max] with 0 < min <= max <= 1, got {a.scale}")
    for key in ("color_jitter_prob", "gray_scale_prob"):
        p = getattr(a, key)
        if p is not None and not 0.0 <= p <= 1.0:
            raise ConfigError(f"aug.{key} must be in [0, 1] (or null), got {p}")
    if a.color_jitter_prob:
        cj = a.color_jitter
        if cj is None or len(cj) != 4 or min(cj) < 0 or cj[3] > 0.5:
            raise ConfigError(f"aug.color_jitter must be [brightness, contrast, saturation, hue] (each >= 0, hue "
                              f"<= 0.5) when aug.color_jitter_prob is set, got {cj}")
    elif a.color_jitter is not None and a.color_jitter_prob is None:
        raise ConfigError("aug.color_jitter is applied by open_clip only with aug.color_jitter_prob > 0; set "
                          "aug.color_jitter_prob (e.g. 0.8) or remove aug.color_jitter")
    for key in ("mean", "std"):
        v = getattr(a, key)
        if v is not None and (len(v) != 3 or (key == "std" and min(v) <= 0)):
            raise ConfigError(f"aug.{key} must be 3 numbers (one per RGB channel{', each > 0' * (key == 'std')}), "
                              f"got {v}")
    if a.interpolation is not None and a.interpolation not in AUG_INTERPOLATIONS:
        raise ConfigError(f"aug.interpolation={a.interpolation!r} is not one of {', '.join(AUG_INTERPOLATIONS)}")
    if a.resize_mode is not None and a.resize_mode not in AUG_RESIZE_MODES:
        raise ConfigError(f"aug.resize_mode={a.resize_mode!r} is not one of {', '.join(AUG_RESIZE_MODES)}")


def model_vision_cfg(cfg: Config) -> tuple[str, dict[str, Any]]:
    """(where it comes from, the open_clip ``vision_cfg``) of the configured model; ({}) when unknown."""
    if cfg.model.config is not None:
        vision = cfg.model.config.get("vision_cfg")
        return "model.config.vision_cfg", vision if isinstance(vision, dict) else {}
    if cfg.model.name:
        import open_clip

        vision = (open_clip.get_model_config(cfg.model.name) or {}).get("vision_cfg")
        return f"model.name={cfg.model.name}'s vision_cfg", vision if isinstance(vision, dict) else {}
    return "model", {}


def validate_patch_dropout(cfg: Config) -> None:
    """Patch dropout with a dense term is refused: open_clip drops a random subset of patch tokens
    inside the tower, so the dense patch outputs no longer line up with the region masks (defined
    on the full patch grid, docs/losses.md §2) that the powerset term pools over, nor with the patch
    grid XAC attends over. Sub-selecting each image's region masks to its kept tokens would need
    the tower's random choice, which open_clip does not expose."""
    where, vision = model_vision_cfg(cfg)
    dropout = float(vision.get("patch_dropout") or 0.0)
    if dropout <= 0:
        return
    dense = [k for k, on in (("loss.powerset.weight", cfg.loss.powerset.weight > 0),
                             ("loss.concept.xac_weight", cfg.loss.concept.xac_weight > 0)) if on]
    if dense:
        raise ConfigError(f"{where}.patch_dropout={dropout} cannot train with {dense[0]} > 0: patch dropout "
                          "removes random patch tokens, so the dense patch outputs no longer match the region "
                          "masks and patch grid that term reads; set patch_dropout to 0 or the term's weight to 0")


def validate_optim(cfg: Config) -> None:
    """The schedule's cooldown and the per-tower options (locking, lr, weight decay, layer decay)."""
    o = cfg.optim
    if o.schedule == "const-cooldown":
        if not 0 < o.cooldown_steps <= cfg.train.steps - o.warmup_steps:
            raise ConfigError(f"optim.cooldown_steps={o.cooldown_steps}: optim.schedule=const-cooldown needs "
                              f"0 < cooldown_steps <= train.steps - optim.warmup_steps "
                              f"({cfg.train.steps} - {o.warmup_steps})")
        if o.cooldown_power <= 0 or not 0 <= o.cooldown_end_lr <= o.lr:
            raise ConfigError(f"optim.cooldown_power must be > 0 (got {o.cooldown_power}) and optim.cooldown_end_lr "
                              f"in [0, optim.lr={o.lr}] (got {o.cooldown_end_lr})")
    for tower in ("image", "text"):
        t: TowerOptimConfig = getattr(o, tower)
        key = f"optim.{tower}"
        if t.unlocked_groups < 0 or (t.unlocked_groups and not t.lock):
            raise ConfigError(f"{key}.unlocked_groups={t.unlocked_groups} needs {key}.lock=true and must be >= 0")
        if t.freeze_bn_stats and (tower == "text" or not t.lock):
            raise ConfigError(f"{key}.freeze_bn_stats needs optim.image.lock=true and applies to the image tower "
                              "only (open_clip's text towers have no batch-norm statistics)")
        if t.freeze_bn_stats and cfg.train.zero_stage == 3:
            raise ConfigError("optim.image.freeze_bn_stats is not supported with train.zero_stage=3 (open_clip "
                              "copies the batch-norm weights into frozen modules, which ZeRO-3 has partitioned)")
        if t.lr is not None and not t.lr > 0:
            raise ConfigError(f"{key}.lr must be > 0 or null, got {t.lr} (to train nothing of a tower, "
                              f"set {key}.lock=true)")
        if t.weight_decay is not None and t.weight_decay < 0:
            raise ConfigError(f"{key}.weight_decay must be >= 0 or null, got {t.weight_decay}")
        if not 0 < t.layer_decay <= 1:
            raise ConfigError(f"{key}.layer_decay must be in (0, 1] (1 = off), got {t.layer_decay}")


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
            if path.is_dir():
                raise ConfigError(f"{path}: is a folder; -c takes a YAML file (e.g. configs/tiny_cpu.yaml)")
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                with open(path) as f:
                    data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)}); fix the file (or restore it "
                                  "from the preset it came from)") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{path}: not a text file (YAML expected); fix or restore it") from None
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
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"override {key}: value {value!r} is not valid YAML ({_yaml_problem(e)})") from None
            OmegaConf.update(override, key, parsed, force_add=True)
            layers.append(override)
        merged = OmegaConf.merge(*layers)
        cfg = _to_dataclass(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"bad config key {key!r}: {e.msg if hasattr(e, 'msg') else e}") from None
    return validate(cfg)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML parser error in one line: what and where (line:column)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


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


def dotted_items(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts, the keys as overrides write them (``prefix`` first): for
    messages that name the settings two configs differ in."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(dotted_items(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_hash(cfg: Config) -> str:
    """Stable hash of the resolved config, stored in checkpoints."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, to_yaml(cfg))
