"""Resume a DeepSpeed checkpoint on another number of ranks or another ZeRO stage.

DeepSpeed's ``load_checkpoint`` needs the saving layout (its universal-checkpoint converter,
``ds_to_universal``, unpickles every file with ``weights_only=False``, which powerclip never does).
This module does the equivalent conversion with ``weights_only`` loads only:

1. ``read_full_state``: every saving rank's files are read (``checkpoints.safe_load``) and
   the fp32 master weight and Adam moments of every parameter are put together whole, by name:
   stage 0 keeps them whole already, stages 1/2 from each rank's slice of a flat group (DeepSpeed's
   ``param_slice_mappings``), stage 3 from each rank's 1/W of every parameter (the layout
   ``zero_to_fp32`` reads).
2. ``load_full_state``: the new engine's optimiser state is created and its own partitions are
   filled through DeepSpeed's ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
   (stage 0: the parameters and torch's optimiser state directly); the module weights are set from
   the fp32 masters; the LR schedule and DeepSpeed's step counters are restored.

The values are copied, never recomputed, so the loaded masters and moments equal the saved ones
bit for bit. Each new rank reads the whole state (three fp32 copies of the model) once at resume.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from powerclip.checkpoints.layout import model_states_file
from powerclip.checkpoints.safe_load import safe_load
from powerclip.config import OptimConfig
from powerclip.errors import UserError

log = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")
_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


class ElasticError(UserError, RuntimeError):
    """The checkpoint cannot be loaded on this layout (message names the file and the cause)."""


@dataclass
class FullState:
    """A checkpoint's training state, whole and by parameter name."""

    fp32: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> exp_avg, exp_avg_sq
    step: float | None = None  # Adam's step count (None: the optimiser has not stepped yet)
    model_states: dict[str, Any] = field(default_factory=dict)  # rank 0's model-states file
    zero_stage: int = 0
    world_size: int = 1
    loss_scale: float | None = None


def _load(path: Path) -> Any:
    if not path.is_file():
        raise ElasticError(f"{path}: missing (incomplete checkpoint?)")
    return safe_load(path)


def _optim_files(tag_dir: Path) -> list[Path]:
    files = sorted(tag_dir.glob("*_optim_states.pt"), key=lambda p: int(_RANK_RE.search(p.name).group(1)))
    ranks = [int(_RANK_RE.search(p.name).group(1)) for p in files]
    if ranks != list(range(len(ranks))):
        raise ElasticError(f"{tag_dir}: optimizer state files of ranks {ranks}; expected 0..{len(ranks) - 1}")
    return files


def saved_zero_stage(tag_dir: Path) -> int:
    """The ZeRO stage a checkpoint was written with, from its files."""
    if (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").is_file():
        return 3
    files = list(tag_dir.glob("*_optim_states.pt"))
    if not files:
        return 0
    osd = _load(files[0])["optimizer_state_dict"]
    if "zero_stage" not in osd and "single_partition_of_fp32_groups" in osd:
        return 1  # DeepSpeed's BF16_Optimizer (bf16 weights at ZeRO-1): the stage-1 partition layout
    return int(osd["zero_stage"])


_COUNTERS = ("step", "samples_seen", "skipped_steps", "world_size")


def _client_problem(client: Any) -> str | None:
    """What is wrong with a ``powerclip`` client state's shape, or None (schema: the counters and
    ``world_size`` non-negative ints, ``zero_stage``/``global_batch`` ints or absent, ``config_hash``
    a string, ``ranks`` one ``{data, rng}`` object per saving rank)."""
    if not isinstance(client, dict):
        return f"the client state is a {type(client).__name__}, not a mapping"
    for key in _COUNTERS:
        v = client.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{key!r} is {v!r}, not a non-negative integer"
    for key in ("zero_stage", "global_batch"):
        v = client.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            return f"{key!r} is {v!r}, not an integer"
    if not isinstance(client.get("config_hash"), str):
        return "'config_hash' is not a string"
    ranks = client.get("ranks")
    if (not isinstance(ranks, list) or len(ranks) != client["world_size"]
            or not all(isinstance(r, dict) and "data" in r and "rng" in r for r in ranks)):
        return f"'ranks' is not a list of {client['world_size']} {{data, rng}} entries (one per saving rank)"
    return None


def read_client_state(tag_dir: Path) -> dict[str, Any]:
    """The ``powerclip`` client state of a checkpoint (step, counters, per-rank cursors), checked
    against its schema: a file that passed its checksums but holds another shape was written by
    something else, and is refused naming it."""
    from powerclip.checkpoints.discovery import CheckpointError

    path = model_states_file(tag_dir)
    if not path.is_file():
        raise ElasticError(f"{path}: missing (incomplete checkpoint?)")
    sd = safe_load(path, mmap=True)  # mapped: only the small client state is read, not the weights beside it
    if not isinstance(sd, dict) or "powerclip" not in sd:
        raise CheckpointError(f"{path}: not a powerclip checkpoint (no client state)")
    problem = _client_problem(sd["powerclip"])
    if problem:
        raise CheckpointError(f"{path}: malformed powerclip client state: {problem}; resume from another "
                              "checkpoint (checkpoint.resume=PATH)")
    return sd["powerclip"]


def saved_param_shapes(tag_dir: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model a checkpoint holds (read without its weights):
    DeepSpeed's ``param_shapes`` (ZeRO 1-3) and ``frozen_param_shapes``, or the module's own
    non-buffer tensors (stage 0)."""
    ms = safe_load(model_states_file(tag_dir), mmap=True)
    shapes: dict[str, tuple[int, ...]] = {}
    groups = ms.get("param_shapes")
    if groups:
        for group in groups if isinstance(groups, list) else [groups]:
            shapes.update({n: tuple(int(x) for x in s) for n, s in group.items()})
    else:
        buffers = set(ms.get("buffer_names") or ())
        shapes.update({n: tuple(t.shape) for n, t in (ms.get("module") or {}).items()
                       if n not in buffers and isinstance(t, torch.Tensor)})
    shapes.update({n: tuple(int(x) for x in s) for n, s in (ms.get("frozen_param_shapes") or {}).items()})
    return shapes


def _adam_state(state: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    missing = [k for k in MOMENTS if k not in state]
    if missing:
        raise ElasticError(f"{where}: optimizer state has no {missing} (only Adam/AdamW states convert)")
    return state


def _step_of(state: dict[str, Any]) -> float | None:
    s = state.get("step")
    return None if s is None else float(s)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def read_full_state(tag_dir: Path, model: nn.Module, optim: OptimConfig) -> FullState:
    """Whole fp32 weights and Adam moments of a checkpoint written at any stage and world size.

    ``model``/``optim`` give the parameter order of a stage-0 (unpartitioned) optimiser (its
    parameter groups), which torch's state dict keys by index only."""
    stage = saved_zero_stage(tag_dir)
    ms = _load(model_states_file(tag_dir))
    out = FullState(model_states=ms, zero_stage=stage)
    if stage == 0:
        _read_stage0(ms, model, optim, out, tag_dir)
    elif stage in (1, 2):
        _read_stage12(tag_dir, out)
    else:
        _read_stage3(tag_dir, out)
    return out


def _read_stage0(ms: dict, model: nn.Module, optim: OptimConfig, out: FullState, tag_dir: Path) -> None:
    from powerclip.train.param_groups import optimizer_groups

    opt = ms.get("optimizer")
    if not opt or "state" not in opt:
        raise ElasticError(f"{tag_dir}: a stage-0 checkpoint without torch optimizer state (a mixed-precision "
                           "stage-0 optimiser does not convert; resume on the saving layout)")
    ids = _param_names(model)
    names = [ids[id(p)] for g in optimizer_groups(model, optim) for p in g["params"]]
    index = [i for g in opt["param_groups"] for i in g["params"]]
    if len(index) != len(names):
        raise ElasticError(f"{tag_dir}: the optimizer holds {len(index)} parameters, this model {len(names)}")
    module = ms["module"]
    for i, name in zip(index, names):
        out.fp32[name] = module[name].float()
        if i in opt["state"]:
            st = _adam_state(opt["state"][i], f"{tag_dir} ({name})")
            out.moments[name] = {k: st[k] for k in MOMENTS}
            out.step = _step_of(st)
    out.world_size = 1


def _read_stage12(tag_dir: Path, out: FullState) -> None:
    files = _optim_files(tag_dir)
    out.world_size = len(files)
    frags: dict[str, dict[str, list[torch.Tensor]]] = {}
    shapes = {n: s for group in out.model_states["param_shapes"] for n, s in group.items()}
    for path in files:
        osd = _load(path)["optimizer_state_dict"]
        base = osd["base_optimizer_state"]
        states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
        if out.loss_scale is None and hasattr(osd.get("loss_scaler"), "cur_scale"):
            out.loss_scale = float(osd["loss_scaler"].cur_scale)
        for g, mapping in enumerate(osd["param_slice_mappings"]):
            flat = {"fp32": osd["single_partition_of_fp32_groups"][g]}
            if g in states and states[g]:
                st = _adam_state(states[g], str(path))
                flat.update({k: st[k] for k in MOMENTS})
                out.step = _step_of(st)
            for name, addr in mapping.items():
                for key, t in flat.items():
                    frags.setdefault(name, {}).setdefault(key, []).append(t.narrow(0, addr.start, addr.numel))
    for name, shape in shapes.items():
        parts = frags.get(name)
        if parts is None:
            raise ElasticError(f"{tag_dir}: parameter {name} is in param_shapes but in no rank's partition")
        whole = {k: torch.cat(v).view(shape).clone() for k, v in parts.items()}
        out.fp32[name] = whole.pop("fp32")
        if whole:
            out.moments[name] = whole


def _read_stage3(tag_dir: Path, out: FullState) -> None:
    files = _optim_files(tag_dir)
    world = out.world_size = len(files)
    flats: dict[str, list[torch.Tensor]] = {"fp32": []}
    for path in files:
        osd = _load(path)["optimizer_state_dict"]
        flats["fp32"].append(torch.cat([t.flatten() for t in osd["fp32_flat_groups"]]))
        inner = osd["optimizer_state_dict"]["state"]
        if inner:
            subs = [_adam_state(inner[j], str(path)) for j in sorted(inner)]
            for k in MOMENTS:
                flats.setdefault(k, []).append(torch.cat([s[k].flatten() for s in subs]))
            out.step = _step_of(subs[0])
        if out.loss_scale is None and hasattr(osd.get("loss_scaler"), "cur_scale"):
            out.loss_scale = float(osd["loss_scaler"].cur_scale)
    offset = 0
    for group in out.model_states["param_shapes"]:
        for name, shape in group.items():
            numel = int(torch.Size(shape).numel())
            part = -(-numel // world)  # each rank holds ceil(numel / W) elements of every parameter
            whole = {k: torch.cat([f.narrow(0, offset, part) for f in v])[:numel].view(shape).clone()
                     for k, v in flats.items()}
            out.fp32[name] = whole.pop("fp32")
            if whole:
                out.moments[name] = whole
            offset += part


# ------------------------------------------------------------------------------ loading
def _step_tensor(step: float, like: torch.Tensor | None, flat: torch.Tensor, group: dict) -> torch.Tensor:
    dtype = like.dtype if like is not None else torch.float32
    t = torch.tensor(step, dtype=dtype)
    return t.to(flat.device) if group.get("fused") or group.get("capturable") else t


def link_optimizer_state(engine) -> None:
    """Point the ZeRO-1/2 parameter fragments at the optimizer state as it is now.

    DeepSpeed links them once, before the first step creates Adam's state, so
    ``safe_*_optimizer_state`` would find no moments; relinking is cheap (views only)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def load_full_state(engine, state: FullState, scheduler) -> None:
    """Put ``state`` into a freshly built engine of any stage and world size (collective-free)."""
    model: nn.Module = engine.module
    # frozen parameters never change in training: the new run's own (same seed, same pretrained
    # weights) are the saved ones, and DeepSpeed keeps no fp32 master of them
    names = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(names) - set(state.fp32))
    if missing:
        raise ElasticError(f"the checkpoint has no weights for {missing[:3]} ({len(missing)} parameters): "
                           "was it written by another model.config?")
    stage = int(engine.zero_optimization_stage())
    opt = engine.optimizer
    if stage == 0:
        if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "fp32_groups"):
            raise ElasticError(f"elastic resume into ZeRO stage 0 needs the plain fp32 torch optimizer, this run "
                               f"uses {type(opt).__name__}; use train.zero_stage >= 1 or the saving layout")
        ids = _param_names(model)
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    name = ids[id(p)]
                    if name not in names:
                        continue
                    p.copy_(state.fp32[name].to(p.dtype))
                    if name in state.moments and state.step is not None:
                        m = state.moments[name]
                        opt.state[p] = {"step": _step_tensor(state.step, None, p, group),
                                        **{k: m[k].to(p.device, torch.float32).clone() for k in MOMENTS}}
    else:
        base = opt.optimizer
        if state.step is not None and state.moments:
            flats = [p for g in base.param_groups for p in g["params"]]
            groups = [g for g in base.param_groups for _ in g["params"]]
            if stage == 3:  # its state is keyed by the fp32 sub-group partitions
                flats = list(opt.fp32_partitioned_groups_flat)
                groups = [base.param_groups[0]] * len(flats)
            for flat, group in zip(flats, groups):
                prev = base.state.get(flat, {})
                base.state[flat] = {**prev, "step": _step_tensor(state.step, None, flat, group),
                                    **{k: torch.zeros_like(flat) for k in MOMENTS}}
            link_optimizer_state(engine)
        setter = _set_stage3 if stage == 3 else _set_stage12
        for name, p in names.items():
            setter(p, state.fp32[name].to(p.device), None)
            if name in state.moments and state.step is not None:
                for k in MOMENTS:
                    setter(p, state.moments[name][k].to(p.device), k)
        with torch.no_grad():
            if stage == 3:  # the working (low-precision) partitions from the fp32 masters
                for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                    lp.copy_(hp.to(lp.dtype))
            else:
                for name, p in names.items():
                    p.copy_(state.fp32[name].to(p.device, p.dtype))
        if state.loss_scale is not None and hasattr(getattr(opt, "loss_scaler", None), "cur_scale"):
            opt.loss_scaler.cur_scale = state.loss_scale
    _load_buffers(model, state.model_states.get("module") or {})
    ms = state.model_states
    if scheduler is not None and ms.get("lr_scheduler") is not None:
        scheduler.load_state_dict(ms["lr_scheduler"])
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in ms:
            setattr(engine, key, ms[key])


def _set_stage12(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def _set_stage3(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's 1/W of a whole parameter (or moment) into ZeRO-3's fp32 partition.

    DeepSpeed's own ``set_full_hp_param`` reads past the end of a parameter whose size W does not
    divide (the last partition is padded), so the value is padded here first."""
    if not param.requires_grad:
        return
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), opt._get_param_partition_rank(param)
    flat = value.flatten()
    padded = torch.zeros(max(flat.numel(), n * (rank + 1)), dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    part.data.copy_(padded.narrow(0, n * rank, n))


def _load_buffers(model: nn.Module, module_sd: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in module_sd and isinstance(module_sd[name], torch.Tensor):
                buf.copy_(module_sd[name].to(buf.device, buf.dtype))


# ------------------------------------------------------------------------------ the resume
def saved_layout(client: dict[str, Any], tag_dir: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) a checkpoint was written with."""
    stage = client.get("zero_stage")
    return int(client["world_size"]), int(stage) if stage is not None else saved_zero_stage(tag_dir)


def needs_conversion(tag_dir: Path, client: dict[str, Any], world_size: int, zero_stage: int,
                     precision: str | None = None) -> bool:
    """Another world size or ZeRO stage, or (ZeRO >= 1) weights of another dtype than the saving
    run's: DeepSpeed's optimiser wrappers for bf16/fp16 weights and for fp32 weights (the amp modes,
    fp32) save different layouts. A checkpoint that does not name its precision is taken as this run's."""
    if saved_layout(client, tag_dir) != (world_size, zero_stage):
        return True
    saved = client.get("precision")
    return zero_stage > 0 and saved is not None and precision is not None and _weights(saved) != _weights(precision)


def _weights(precision: str) -> str:
    """The dtype of the working weights of a ``train.precision`` mode (the amp modes keep fp32)."""
    return precision if precision in ("bf16", "fp16") else "fp32"


def adjust_global_batch(cfg, client: dict[str, Any], world_size: int, is_main: bool):
    """The config to resume with on ``world_size`` ranks: the checkpoint's global batch is kept
    (``data.batch_size`` per rank recomputed, logged) unless ``train.keep_global_batch`` is false."""
    import copy

    from powerclip.config import ConfigError

    saved_world = int(client["world_size"])
    accum, b = cfg.train.accum_steps, cfg.data.batch_size
    saved = int(client.get("global_batch") or b * accum * saved_world)
    now = b * accum * world_size
    if saved_world == world_size or now == saved:
        return cfg
    if not cfg.train.keep_global_batch:
        if is_main:
            log.info("elastic resume on %d ranks (checkpoint: %d): global batch changes from %d to %d "
                     "(train.keep_global_batch=false)", world_size, saved_world, saved, now)
        return cfg
    if saved % (accum * world_size):
        raise ConfigError(f"cannot keep the global batch of {saved} on {world_size} ranks: it is not divisible by "
                          f"ranks x train.accum_steps = {world_size} x {accum}; resume on a number of ranks "
                          "that divides it, change train.accum_steps, or set train.keep_global_batch=false "
                          "to train on with data.batch_size x ranks x train.accum_steps")
    out = copy.deepcopy(cfg)
    out.data.batch_size = saved // (accum * world_size)
    if is_main:
        log.info("elastic resume on %d ranks (checkpoint: %d): global batch %d kept, data.batch_size %d -> %d "
                 "per rank (train.accum_steps %d)", world_size, saved_world, saved, b, out.data.batch_size, accum)
    return out


def resume(engine, scheduler, tag_dir: Path, client: dict[str, Any], optim: OptimConfig, rank: int) -> dict:
    """Load ``tag_dir`` into an engine of another layout; this rank's resume state for the loop:
    the data state maps every old rank's cursor (``powerclip.data.remap``), the RNG state is the old
    rank's of the same number (None for a rank that did not exist: it is seeded afresh)."""
    load_full_state(engine, read_full_state(tag_dir, engine.module, optim), scheduler)
    ranks = client["ranks"]
    data = [r.get("data") for r in ranks]
    return {"data": None if any(d is None for d in data) else
            {"elastic_from": data, "salt": int(client["step"]) + 1},
            "rng": ranks[rank]["rng"] if rank < len(ranks) else None}
