"""The training loop, top to bottom: set-up, resume, step, log, checkpoint.

Read ``train`` first; every helper below it does one job. The same code runs a single CPU process,
2 gloo ranks in CI and hundreds of GPUs under Slurm (see ``dist_env``).

One optimiser step = ``train.accum_steps`` micro-batches of ``data.batch_size`` per rank:

* feature-caching accumulation (``accum.py``) so the contrastive negative pool is the whole global
  batch;
* a non-finite loss (checked on every rank and gathered) skips the step on ALL ranks, so no NaN
  reaches the weights: at ZeRO-0 after backward (the gradients are dropped; a non-finite gradient
  norm, when powerclip clips, skips the step too), at ZeRO >= 1 before
  backward (DeepSpeed's buffers hold reduced gradients until its step); skipped steps still consume
  their data and are counted;
* one host synchronisation per step (``step_sync``): the non-finite flag, the loss terms and the
  previous step's perf values and skip counters travel in one small collective;
* fp16 overflow steps are skipped by DeepSpeed's loss scaler and counted as ``overflow``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from powerclip import checks
from powerclip import distributed as pdist
from powerclip.checkpoints import ownership
from powerclip.checkpoints.codec import install_safe_checkpoint_engine
from powerclip.config import Config, config_hash, save_config
from powerclip.data.batch import Batch
from powerclip.data.device import to_device
from powerclip.data.geometry import model_geometry
from powerclip.losses.composer import compose_losses, needs_dense, needs_teacher
from powerclip.losses.pool import set_step as set_pool_step
from powerclip.train import checkpoint as ckpt
from powerclip.train import elastic, peers
from powerclip.train.accum import cached_loss, concat_batches, surrogate_passes
from powerclip.train.build_model import build_model
from powerclip.train.dist_env import DistEnv, init_distributed
from powerclip.train.engine import (
    COMPUTE_DTYPES,
    PRECISION_DTYPES,
    apply_backend_settings,
    build_engine,
    clip_gradients,
    deepspeed_config,
    discard_gradients,
    features_of,
    full_fp32_matmuls,
    grad_scaler_state,
    load_grad_scaler_state,
)
from powerclip.train.host_memory import keep_freed_host_memory
from powerclip.train.logging import RunLogger, peak_memory_mb
from powerclip.train.optim import scheduled_lr
from powerclip.train.param_groups import group_table, optimizer_groups
from powerclip.train.state import TrainState
from powerclip.train.step_sync import HostStats, StepValues, reduce_step

log = logging.getLogger(__name__)

LoaderFactory = Callable[..., Iterable[Batch]]  # build_loader(cfg, rank, world_size, state=None)


def train(cfg: Config, build_loader: LoaderFactory | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the final metrics.

    ``build_loader`` defaults to ``powerclip.data.build_loader``; any factory with the same signature
    (an iterable of Batch with optional ``state_dict()``/``counters()``) can replace it. The run
    folder is locked for the duration (``run_lock``): a second run on it is refused. A runtime error
    that came with the death of another rank is raised as ``peers.PeerLostError`` naming that rank.
    """
    locks: list[Any] = []
    try:
        return _train(cfg, build_loader, locks)
    except RuntimeError as e:
        lost = peers.explain_failure(e)
        if lost is None:
            raise
        raise lost from e
    finally:
        peers.stop_watch()
        for lock in locks:
            lock.release()


def _lock_run_dir(run_dir: Path, env: DistEnv) -> Any:
    """Rank 0 takes the run-folder lock; every rank raises the same error if it is held (collective)."""
    from powerclip.train.run_lock import RunLock, RunLockError

    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except RunLockError as e:
            error = str(e)
    errors = [e for e in ckpt.gather_rank_states({"error": error}) if e["error"]]
    if errors:
        raise RunLockError(errors[0]["error"])
    return lock


def _before_writing(cfg: Config, model, ckpt_dir: Path, target: tuple[Path, str] | None) -> int:
    """Collective. Refuse (on every rank, with the same one-line error) a checkpoint of another model
    shape and a disk without room for a checkpoint; returns the bytes a checkpoint takes."""
    from powerclip.checkpoints.discovery import CheckpointError
    from powerclip.config import ConfigError

    needed, error = 0, None
    try:
        if target is not None:
            tag_dir = target[0] / target[1]
            ckpt.check_model_matches(tag_dir, elastic.saved_param_shapes(tag_dir), model, cfg.model,
                                     elastic.read_client_state(tag_dir).get("model"))
        needed = ckpt.check_space(ckpt_dir, ckpt.estimate_bytes(model, cfg.train.zero_stage,
                                                                cfg.train.precision != "fp32"))
    except (ConfigError, CheckpointError) as e:
        error = e
    errors = [e["error"] for e in ckpt.gather_rank_states({"error": error}) if e["error"] is not None]
    if errors:
        raise errors[0]
    return needed


def _train(cfg: Config, build_loader: LoaderFactory | None, locks: list[Any]) -> dict[str, Any]:
    from powerclip.model.factory import create_model

    if build_loader is None:
        from powerclip.data import build_loader
    env = init_distributed(timeout_s=cfg.train.dist_timeout_s)
    checks.set_enabled(cfg.train.debug_checks)
    deepspeed_config(cfg, env.world_size)  # a refused precision x ZeRO combination fails before anything is built
    apply_backend_settings(cfg)
    if env.device.type == "cpu" and cfg.train.keep_freed_host_memory:
        keep_freed_host_memory()  # before the model and the loader workers exist: they inherit it
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    lock = _lock_run_dir(run_dir, env)  # before anything is written
    if lock is not None:
        locks.append(lock)
    # the checkpoint to resume from, chosen once (a fallback past a damaged 'latest' is logged once)
    resume_target = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_dir)
    cfg = elastic_config(cfg, resume_target, env)  # another world size: the global batch is kept
    # this run's identity: inherited from a checkpoint of its own folder, so pruning spans restarts
    run_id = ownership.identity(ckpt_dir, None if resume_target is None else resume_target[0] / resume_target[1])

    # ---- model, teacher, engine (same seed on every rank: identical initial weights)
    # nothing in the run folder changes until the checkpoint is loaded: a refused resume (another
    # model shape, a full disk) leaves config.yaml, metrics and checkpoints as they were
    seed_all(cfg.train.seed)
    model = build_model(cfg, env)  # starting weights (model.pretrained); ZeRO-3: built partitioned
    ckpt_bytes = _before_writing(cfg, model, ckpt_dir, resume_target)
    teacher = None
    if needs_teacher(cfg.loss):
        from powerclip.train.ema import EmaTeacher

        # a partitioned student cannot be deep-copied: the teacher is then a fresh module of the same
        # architecture, whose values are overwritten by the gathered student weights
        template = None
        if cfg.train.zero_stage == 3:
            template = create_model(dataclasses.replace(cfg.model, pretrained=None))
        teacher = EmaTeacher(model, cfg.loss.degla.ema_decay, template=template,  # the starting weights
                             dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.loss.degla.ema_dtype])
    if env.is_main:
        log.info("parameter groups:\n%s", group_table(model, optimizer_groups(model, cfg.optim), cfg.optim.lr))
    try:
        engine, scheduler = build_engine(cfg, model, env.world_size)
    except AssertionError as e:  # DeepSpeed validates its config with bare asserts
        from powerclip.config import ConfigError

        raise ConfigError(f"DeepSpeed rejected the engine config derived from train.* / optim.* / "
                          f"train.deepspeed: {e or 'assertion failed'}") from e
    install_safe_checkpoint_engine(engine)
    engine.train()

    # ---- resume (default: this run's latest complete checkpoint)
    state, rank_state = load_resume(cfg, engine, resume_target, env, teacher, scheduler)
    if env.is_main:
        save_config(cfg, run_dir)  # only now: a failed load must not leave the run described otherwise
    loader = build_loader(cfg, env.rank, env.world_size, state=rank_state["data"] if rank_state else None)
    logger = RunLogger(run_dir, env.is_main, resume_step=state.resumed_step, wandb=cfg.log.wandb,
                       config=OmegaConf.to_container(OmegaConf.structured(cfg)) if cfg.log.wandb.enabled else None)
    if rank_state and rank_state["rng"] is not None:
        ckpt.set_rng_state(rank_state["rng"])
    else:
        seed_all(cfg.train.seed + 1 + env.rank)  # distinct per-rank streams for anything random

    # ---- the loop
    geo = model_geometry(cfg)  # the loader ships uint8 pixels; to_device normalises them on the device
    dtype = PRECISION_DTYPES[cfg.train.precision]
    accum = cfg.train.accum_steps
    global_batch = cfg.data.batch_size * accum * env.world_size
    batches = _forever(loader)
    last_save = time.monotonic()  # intervals on a clock that never steps (NTP, a node's clock fixed)
    losses: list[float] = []
    result: StepResult | None = None
    host = HostStats()  # the previous step's host measurements, packed into the next step's sync
    if env.is_main:
        log.info("training %s from step %d to %d (global batch %d, ZeRO-%d, %s)", run_dir, state.step,
                 cfg.train.steps, global_batch, cfg.train.zero_stage, cfg.train.precision)
    while state.step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = [to_device(next(batches), env.device, dtype, geo.mean, geo.std) for _ in range(accum)]
        t_data = time.perf_counter() - t0
        lr = scheduled_lr(scheduler, cfg.optim.lr)
        set_pool_step(state.step)  # sampled negative pools: the same draw on every rank and accumulation pass
        result = train_step(engine, micro, cfg, teacher, host, _time_due(cfg, last_save))
        if result.applied and teacher is not None and engine.was_step_applied():  # not on fp16 overflow
            teacher.update(engine)
        state.advance(global_batch, result.applied)
        t_step = time.perf_counter() - t0
        losses.append(result.loss)
        host = HostStats(data_wait_frac=t_data / max(t_step, 1e-9), peak_mem_mb=peak_memory_mb(env.device),
                         step_time_s=t_step, grad_norm=engine.get_global_grad_norm() if result.applied else None,
                         counters=dict(loader.counters()) if hasattr(loader, "counters") else {}, valid=True)

        rec = {"loss": result.loss, **{f"loss/{k}": v for k, v in result.terms.items()}, "lr": lr,
               "skipped": not result.applied, "step_s": round(t_step, 6)}
        logger.record(state.step, rec)
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            values = step_metrics(engine, env, result, lr, t_step, global_batch, state.skipped_steps)
            logger.scalars(state.step, values)
            logger.console(state.step, cfg.train.steps, values)

        if checkpoint_due(cfg, state.step, last_save, result.checkpoint_time_due):
            save_checkpoint(engine, ckpt_dir, cfg, env, loader, teacher, state, run_id, ckpt_bytes)
            last_save = time.monotonic()
        if cfg.eval.tasks and cfg.eval.every_steps > 0 and state.step % cfg.eval.every_steps == 0:
            periodic_eval(engine, cfg, state.step, logger)

    batches.close()  # stops the loader's worker processes
    if result is None:  # resumed at or past the last step: nothing ran
        log.info("run %s is already at step %d >= train.steps", run_dir, state.step)
    logger.close()
    pdist.barrier()
    return {**state.state_dict(), "loss": losses[-1] if losses else None, "losses": losses, "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------ one step
StepResult = StepValues  # what train_step returns (see powerclip.train.step_sync)


def train_step(engine, micro: list[Batch], cfg: Config, teacher=None, host: HostStats | None = None,
               time_due: bool = False) -> StepResult:
    """Forward, loss, backward and optimiser step over ``accum_steps`` micro-batches.

    accum 1: the plain path. accum A > 1: feature caching with cached gradients (see
    ``powerclip.train.accum``): the loss runs once, so its finiteness check decides for the whole step.
    ``host``/``time_due`` ride along in that check's collective (``step_sync.reduce_step``).
    """
    accum = len(micro)
    dense = needs_dense(cfg.loss)
    full = concat_batches(micro)
    teacher_feats = None
    if teacher is not None:
        with torch.no_grad():
            # fp32 EMA weights under the run's autocast dtype; the DeGLA terms need no dense outputs
            teacher_feats = teacher.features(full, COMPUTE_DTYPES[cfg.train.precision])
    if accum > 1:  # the loss once over all micro-batches' cached features, then one surrogate per pass
        with torch.no_grad():
            cached = [features_of(engine(b, dense=dense)) for b in micro]
        loss, terms, feats, grads = cached_loss(cached, lambda f: _compose(f, full, cfg,
                                                                           teacher_feats))
        result = reduce_step(loss, terms, feats.logit_scale, host, time_due)
        if not result.applied:
            return result  # no backward on any rank: the step is skipped everywhere
        for part in surrogate_passes(micro, lambda b: features_of(engine(b, dense=dense)), grads):
            engine.backward(part, scale_wrt_gas=False)
            engine.step()
        return result
    feats = features_of(engine(micro[0], dense=dense))
    loss, terms = _compose(feats, full, cfg, teacher_feats)
    if engine.zero_optimization_stage() == 0:
        # the gradients live on the parameters and can be dropped: backward runs first, so the one
        # host read waits for a device that has the whole step queued, and this step's gradient
        # norm rides along
        engine.backward(loss, scale_wrt_gas=False)
        norm = clip_gradients(engine, cfg)
        if norm is not None:
            host = dataclasses.replace(host or HostStats(), grad_norm=norm)
        result = reduce_step(loss, terms, feats.logit_scale, host, time_due, norm_gates=norm is not None)
        if not result.applied:
            discard_gradients(engine, cfg)  # a non-finite loss or gradient on some rank: no rank steps
            return result
        engine.step()
        return result
    # ZeRO >= 1 keeps reduced gradients in its own buffers until its step: decide before backward
    result = reduce_step(loss, terms, feats.logit_scale, host, time_due)
    if not result.applied:
        return result  # no backward on any rank: the step is skipped everywhere
    engine.backward(loss, scale_wrt_gas=False)
    engine.step()
    return result


def _compose(feats, batch, cfg: Config, teacher_feats):
    with full_fp32_matmuls():  # train.tf32 is for the model; the losses' scores keep fp32 operands
        if teacher_feats is None:
            return compose_losses(feats, batch, cfg.loss)
        return compose_losses(feats, batch, cfg.loss, teacher_features=teacher_feats)


# ----------------------------------------------------------------------------------- metrics
def step_metrics(engine, env: DistEnv, result: StepResult, lr: float, t_step: float, global_batch: int,
                 skipped_steps: int) -> dict[str, float]:
    """Everything TensorBoard shows for this step. No communication: the values of all ranks came
    with the step's one collective (``result.previous``: the previous step's perf, gradient norm
    and skip counters; ``perf/step_time_s`` is this rank's time of this step)."""
    values: dict[str, float] = {"loss/total": result.loss, "optim/lr": lr,
                                "train/logit_scale": result.logit_scale,
                                "train/skipped_steps": float(skipped_steps),
                                "train/overflow_steps": float(getattr(engine, "skipped_steps", 0)),
                                "perf/step_time_s": t_step,
                                "perf/samples_per_s": global_batch / t_step,
                                "perf/samples_per_s_per_rank": global_batch / t_step / env.world_size}
    for name, v in result.terms.items():
        values[f"loss/{name}"] = v
    values.update(result.previous)
    return values


# -------------------------------------------------------------------------------- checkpoints
def _time_due(cfg: Config, last_save: float) -> bool:
    """This rank's clock says checkpoint.every_minutes have passed since the last save.

    ``last_save`` is a ``time.monotonic()`` reading: the wall clock can step back (NTP, a node's clock
    being fixed), which would postpone every timed checkpoint by the size of the step."""
    minutes = cfg.checkpoint.every_minutes
    return minutes > 0 and (time.monotonic() - last_save) >= 60.0 * minutes


def checkpoint_due(cfg: Config, step: int, last_save: float, time_due: bool | None = None) -> bool:
    """Every N steps, every M minutes (rank 0's clock decides for all) and at the last step.

    ``last_save``: ``time.monotonic()`` at the last save. ``time_due``: rank 0's verdict as it came
    with the step's collective (the training loop);
    without it the clocks are compared here with a broadcast of their own."""
    c = cfg.checkpoint
    due = step == cfg.train.steps or (c.every_steps > 0 and step % c.every_steps == 0)
    if time_due is not None:
        return due or time_due
    if c.every_minutes > 0:
        flag = torch.tensor([float(due or (time.monotonic() - last_save) >= 60.0 * c.every_minutes)])
        due = bool(pdist.broadcast(flag, src=0).item())
    return due


def save_checkpoint(engine, ckpt_dir: Path, cfg: Config, env: DistEnv, loader, teacher, state: TrainState,
                    run_id: str | None = None, needed_bytes: int = 0) -> str:
    """Collective. Client state: primitives and tensors only; each rank's cursor and RNG by rank.
    ``run_id``: the run the checkpoint belongs to (``checkpoints.ownership``); ``needed_bytes``: the
    estimated size of a checkpoint, for the message when the disk fills before one exists to measure."""
    local = {"data": loader.state_dict() if hasattr(loader, "state_dict") else None,
             "rng": ckpt.rng_state()}
    client_state = {"powerclip": {**state.state_dict(), "config_hash": config_hash(cfg),
                                  "world_size": env.world_size, "zero_stage": cfg.train.zero_stage,
                                  "precision": cfg.train.precision,
                                  "model": ckpt.model_settings(cfg.model),
                                  "grad_scaler": grad_scaler_state(engine),
                                  "global_batch": cfg.data.batch_size * cfg.train.accum_steps * env.world_size,
                                  "ranks": ckpt.gather_rank_states(local)}}
    before_latest = None
    if teacher is not None and env.is_main:
        def before_latest(tag_dir: Path) -> None:
            teacher.save(tag_dir / "ema_teacher.pt")
    tag = ckpt.save(engine, ckpt_dir, state, client_state, cfg.checkpoint, env.is_main, before_latest=before_latest,
                    run_id=run_id, needed_bytes=needed_bytes)
    if env.is_main:
        log.info("saved checkpoint %s", ckpt_dir / tag)
    return tag


def elastic_config(cfg: Config, target: tuple[Path, str] | None, env: DistEnv) -> Config:
    """``cfg`` with the batch adjusted for a resume on another number of ranks (see ``elastic``)."""
    if target is None:
        return cfg
    client = elastic.read_client_state(target[0] / target[1])
    return elastic.adjust_global_batch(cfg, client, env.world_size, env.is_main)


def load_resume(cfg: Config, engine, target: tuple[Path, str] | None, env: DistEnv, teacher,
                scheduler=None) -> tuple[TrainState, dict[str, Any] | None]:
    """Load the checkpoint ``checkpoint.resume`` names: the trainer's counters and this rank's own
    state (data cursor, RNG); a fresh state and None for a fresh start.

    Another world size or ZeRO stage than the checkpoint's goes through ``elastic`` (the data
    cursor is then remapped, not restored exactly)."""
    if target is None:
        return TrainState(), None
    load_dir, tag = target
    saved = elastic.read_client_state(load_dir / tag)
    rank_state = None
    if elastic.needs_conversion(load_dir / tag, saved, env.world_size, cfg.train.zero_stage, cfg.train.precision):
        rank_state = elastic.resume(engine, scheduler, load_dir / tag, saved, cfg.optim, env.rank)
        state = saved
        if env.is_main:
            log.info("elastic resume: %s was written by %d ranks at ZeRO-%d, this run has %d ranks at ZeRO-%d",
                     load_dir / tag, *elastic.saved_layout(saved, load_dir / tag), env.world_size,
                     cfg.train.zero_stage)
    else:
        path, client = engine.load_checkpoint(str(load_dir), tag=tag)
        if path is None or not client or "powerclip" not in client:
            raise RuntimeError(f"could not resume from {load_dir / tag}: not a powerclip checkpoint")
        state = client["powerclip"]
    if state["config_hash"] != config_hash(cfg) and env.is_main:
        log.warning("resuming %s with a changed config (hash %s -> %s)", load_dir / tag,
                    state["config_hash"], config_hash(cfg))
    load_grad_scaler_state(engine, state.get("grad_scaler"))
    if teacher is not None:
        teacher.load(load_dir / tag / "ema_teacher.pt")
    if env.is_main:
        log.info("resumed from %s at step %d", load_dir / tag, state["step"])
    resumed = TrainState()
    resumed.load_state_dict(state)
    return resumed, rank_state if rank_state is not None else state["ranks"][env.rank]


# ------------------------------------------------------------------------------------- eval
def periodic_eval(engine, cfg: Config, step: int, logger: RunLogger) -> None:
    """``eval.tasks`` every ``eval.every_steps`` (collective; powerclip.eval.periodic does the work)."""
    from powerclip.eval.periodic import run_periodic_eval

    engine.eval()
    try:
        with torch.no_grad():
            run_periodic_eval(engine, cfg, step, writer=logger if logger.enabled else None)
    finally:
        engine.train()


# ------------------------------------------------------------------------------------- helpers
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _forever(loader: Iterable[Batch]) -> Iterator[Batch]:
    """Batches without end: an epoch-mode loader is re-iterated (its cursor knows the epoch)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError("the data loader produced no batch in a whole epoch (too few samples for "
                               "data.batch_size x ranks x workers?)")
