"""The training loop, top to bottom: set-up, resume, step, log, checkpoint.

Read ``train`` first; every helper below it does one job. The same code runs a single CPU process,
2 gloo ranks in CI and hundreds of GPUs under Slurm (see ``dist_env``).

One optimiser step = ``train.accum_steps`` micro-batches of ``data.batch_size`` per rank:

* feature-caching accumulation (``accum.py``) so the contrastive negative pool is the whole global
  batch;
* a non-finite loss (checked on every rank and all-reduced) skips the step on ALL ranks before any
  backward, so no NaN reaches the weights; skipped steps still consume their data and are counted;
* fp16 overflow steps are skipped by DeepSpeed's loss scaler and counted as ``overflow``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from powerclip.config import Config, config_hash, save_config
from powerclip.data.batch import Batch
from powerclip.train import checkpoint as ckpt
from powerclip.train import elastic
from powerclip.train.accum import concat_batches, splice_features
from powerclip.train.dist_env import DistEnv, init_distributed
from powerclip.train.engine import PRECISION_DTYPES, build_engine, features_of
from powerclip.train.host_memory import keep_freed_host_memory
from powerclip.train.logging import RunLogger, peak_memory_mb

log = logging.getLogger(__name__)

LoaderFactory = Callable[..., Iterable[Batch]]  # build_loader(cfg, rank, world_size, state=None)


def train(cfg: Config, build_loader: LoaderFactory | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the final metrics.

    ``build_loader`` defaults to ``powerclip.data.build_loader``; any factory with the same signature
    (an iterable of Batch with optional ``state_dict()``/``counters()``) can replace it.
    """
    from powerclip.losses.composer import compose_losses, needs_dense, needs_teacher
    from powerclip.model.factory import create_model

    if build_loader is None:
        from powerclip.data import build_loader
    env = init_distributed()
    if env.device.type == "cpu" and cfg.train.keep_freed_host_memory:
        keep_freed_host_memory()  # before the model and the loader workers exist: they inherit it
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    cfg = elastic_config(cfg, ckpt_dir, env)  # another world size: the global batch is kept
    if env.is_main:
        save_config(cfg, run_dir)

    # ---- model, teacher, engine (same seed on every rank: identical initial weights)
    seed_all(cfg.train.seed)
    model = create_model(cfg.model)  # starting weights (model.pretrained) and grad checkpointing too
    model.to(env.device)
    teacher = None
    if needs_teacher(cfg.loss):
        from powerclip.train.ema import EmaTeacher

        teacher = EmaTeacher(model, cfg.loss.degla.ema_decay)  # from the student's starting weights
    engine, scheduler = build_engine(cfg, model, env.world_size)
    ckpt.install_safe_checkpoint_engine(engine)
    engine.train()

    # ---- resume (default: this run's latest complete checkpoint)
    resumed = load_resume(cfg, engine, ckpt_dir, env, teacher, scheduler)
    step = resumed["step"] if resumed else 0
    samples_seen = resumed["samples_seen"] if resumed else 0
    skipped_steps = resumed["skipped_steps"] if resumed else 0
    rank_state = resumed["rank_state"] if resumed else None
    loader = build_loader(cfg, env.rank, env.world_size, state=rank_state["data"] if rank_state else None)
    logger = RunLogger(run_dir, env.is_main, resume_step=step if resumed else None)
    if rank_state and rank_state["rng"] is not None:
        ckpt.set_rng_state(rank_state["rng"])
    else:
        seed_all(cfg.train.seed + 1 + env.rank)  # distinct per-rank streams for anything random

    # ---- the loop
    dense = needs_dense(cfg.loss)
    dtype = PRECISION_DTYPES[cfg.train.precision]
    accum = cfg.train.accum_steps
    global_batch = cfg.data.batch_size * accum * env.world_size
    batches = _forever(loader)
    last_save = time.time()
    losses: list[float] = []
    result: StepResult | None = None
    if env.is_main:
        log.info("training %s from step %d to %d (global batch %d, ZeRO-%d, %s)", run_dir, step,
                 cfg.train.steps, global_batch, cfg.train.zero_stage, cfg.train.precision)
    while step < cfg.train.steps:
        t0 = time.perf_counter()
        micro = [next(batches).to(env.device, dtype) for _ in range(accum)]
        t_data = time.perf_counter() - t0
        lr = float(scheduler.get_last_lr()[0])
        result = train_step(engine, micro, cfg, compose_losses, dense, teacher, dtype)
        if result.applied and teacher is not None and engine.was_step_applied():  # not on fp16 overflow
            teacher.update(engine)
        step += 1
        samples_seen += global_batch
        skipped_steps += 0 if result.applied else 1
        t_step = time.perf_counter() - t0
        losses.append(result.loss)

        rec = {"loss": result.loss, **{f"loss/{k}": v for k, v in result.terms.items()}, "lr": lr,
               "skipped": not result.applied}
        logger.record(step, rec)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            values = step_metrics(engine, loader, env, result, lr, t_step, t_data, global_batch,
                                  skipped_steps)
            logger.scalars(step, values)
            logger.console(step, cfg.train.steps, values)

        if checkpoint_due(cfg, step, last_save, env):
            save_checkpoint(engine, ckpt_dir, cfg, env, loader, teacher, step, samples_seen, skipped_steps)
            last_save = time.time()
        if cfg.eval.tasks and cfg.eval.every_steps > 0 and step % cfg.eval.every_steps == 0:
            periodic_eval(engine, cfg, step, logger)

    batches.close()  # stops the loader's worker processes
    if result is None:  # resumed at or past the last step: nothing ran
        log.info("run %s is already at step %d >= train.steps", run_dir, step)
    logger.close()
    if dist.is_initialized():
        dist.barrier()
    return {"step": step, "samples_seen": samples_seen, "skipped_steps": skipped_steps,
            "loss": losses[-1] if losses else None, "losses": losses, "run_dir": str(run_dir)}


# ------------------------------------------------------------------------------------ one step
@dataclass
class StepResult:
    loss: float  # mean over ranks of the local total loss
    terms: dict[str, float]  # every composer term, mean over ranks
    logit_scale: float
    applied: bool  # False when a non-finite loss made every rank skip the step


def train_step(engine, micro: list[Batch], cfg: Config, compose_losses, dense: bool, teacher,
               dtype: torch.dtype | None = None) -> StepResult:
    """Forward, loss, backward and optimiser step over ``accum_steps`` micro-batches.

    accum 1: the plain path. accum A > 1: feature caching (see ``powerclip.train.accum``); every pass
    computes the same loss value, so the finiteness check on pass 0 decides for the whole step.
    """
    accum = len(micro)
    full = concat_batches(micro)
    teacher_feats = None
    if teacher is not None:
        with torch.no_grad():
            # fp32 EMA weights under the run's autocast dtype; the DeGLA terms need no dense outputs
            teacher_feats = teacher.features(full, PRECISION_DTYPES[cfg.train.precision])
    cached = None
    if accum > 1:
        with torch.no_grad():
            cached = [features_of(engine(b, dense=dense)) for b in micro]
    result: StepResult | None = None
    for j, b in enumerate(micro):
        live = features_of(engine(b, dense=dense))
        feats = live if cached is None else splice_features(cached, live, j)
        loss, terms = _compose(compose_losses, feats, full, cfg, teacher_feats)
        if j == 0:
            result = _reduce_step_values(loss, terms, feats.logit_scale)
            if not result.applied:
                return result  # no backward on any rank: the step is skipped everywhere
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    assert result is not None
    return result


def _compose(compose_losses, feats, batch, cfg: Config, teacher_feats):
    if teacher_feats is None:
        return compose_losses(feats, batch, cfg.loss)
    return compose_losses(feats, batch, cfg.loss, teacher_features=teacher_feats)


def _reduce_step_values(loss: torch.Tensor, terms: dict[str, torch.Tensor],
                        logit_scale: torch.Tensor) -> StepResult:
    """One all-reduce: the non-finite flag, the loss and every term, averaged over ranks."""
    names = sorted(terms)
    local = torch.stack([loss.detach().float().reshape(())]
                        + [terms[n].detach().float().reshape(()) for n in names])
    bad = (~torch.isfinite(local[:1])).float()
    packed = torch.cat([bad, local])
    world = 1
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        dist.all_reduce(packed)
    values = (packed[1:] / world).tolist()
    return StepResult(loss=values[0], terms=dict(zip(names, values[1:])),
                      logit_scale=float(logit_scale.detach().float()), applied=bool(packed[0].item() == 0))


# ----------------------------------------------------------------------------------- metrics
def step_metrics(engine, loader, env: DistEnv, result: StepResult, lr: float, t_step: float, t_data: float,
                 global_batch: int, skipped_steps: int) -> dict[str, float]:
    """Everything TensorBoard shows for this step, reduced over ranks (collective)."""
    values: dict[str, float] = {"loss/total": result.loss, "optim/lr": lr,
                                "train/logit_scale": result.logit_scale,
                                "train/skipped_steps": float(skipped_steps),
                                "train/overflow_steps": float(getattr(engine, "skipped_steps", 0)),
                                "perf/step_time_s": t_step,
                                "perf/samples_per_s": global_batch / t_step,
                                "perf/samples_per_s_per_rank": global_batch / t_step / env.world_size}
    for name, v in result.terms.items():
        values[f"loss/{name}"] = v
    norm = engine.get_global_grad_norm()
    if norm is not None:
        values["optim/grad_norm"] = float(norm)
    stats = torch.tensor([t_data / max(t_step, 1e-9), peak_memory_mb(env.device)], dtype=torch.float64)
    per_rank = [stats]
    counters: dict[str, int] = dict(loader.counters()) if hasattr(loader, "counters") else {}
    if dist.is_initialized() and env.world_size > 1:
        per_rank = [torch.zeros_like(stats) for _ in range(env.world_size)]
        dist.all_gather(per_rank, stats)
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, counters)
        counters = {}
        for c in gathered:
            for k, v in c.items():
                counters[k] = counters.get(k, 0) + int(v)
    stacked = torch.stack(per_rank)
    values["perf/data_wait_frac"] = float(stacked[:, 0].mean())
    values["perf/data_wait_frac_max"] = float(stacked[:, 0].max())
    values["perf/peak_mem_mb"] = float(stacked[:, 1].max())
    values["data/skipped_samples"] = float(sum(counters.values()))  # all reasons, all ranks
    for k, v in counters.items():
        values[f"data/skipped_{k}"] = float(v)
    return values


# -------------------------------------------------------------------------------- checkpoints
def checkpoint_due(cfg: Config, step: int, last_save: float, env: DistEnv) -> bool:
    """Every N steps, every M minutes (rank 0's clock decides for all) and at the last step."""
    c = cfg.checkpoint
    due = step == cfg.train.steps or (c.every_steps > 0 and step % c.every_steps == 0)
    if c.every_minutes > 0:
        flag = torch.tensor([float(due or (time.time() - last_save) >= 60.0 * c.every_minutes)])
        if dist.is_initialized() and env.world_size > 1:
            if env.backend == "nccl":
                flag = flag.to(env.device)
            dist.broadcast(flag, src=0)
        due = bool(flag.item())
    return due


def save_checkpoint(engine, ckpt_dir: Path, cfg: Config, env: DistEnv, loader, teacher, step: int,
                    samples_seen: int, skipped_steps: int) -> str:
    """Collective. Client state: primitives and tensors only; each rank's cursor and RNG by rank."""
    local = {"data": loader.state_dict() if hasattr(loader, "state_dict") else None,
             "rng": ckpt.rng_state()}
    client_state = {"powerclip": {"step": step, "samples_seen": samples_seen,
                                  "skipped_steps": skipped_steps, "config_hash": config_hash(cfg),
                                  "world_size": env.world_size, "zero_stage": cfg.train.zero_stage,
                                  "global_batch": cfg.data.batch_size * cfg.train.accum_steps * env.world_size,
                                  "ranks": ckpt.gather_rank_states(local)}}
    before_latest = None
    if teacher is not None and env.is_main:
        def before_latest(tag_dir: Path) -> None:
            teacher.save(tag_dir / "ema_teacher.pt")
    tag = ckpt.save(engine, ckpt_dir, step, client_state, cfg.checkpoint.keep_last, env.is_main,
                    before_latest=before_latest)
    if env.is_main:
        log.info("saved checkpoint %s", ckpt_dir / tag)
    return tag


def elastic_config(cfg: Config, ckpt_dir: Path, env: DistEnv) -> Config:
    """``cfg`` with the batch adjusted for a resume on another number of ranks (see ``elastic``)."""
    target = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_dir)
    if target is None:
        return cfg
    client = elastic.read_client_state(target[0] / target[1])
    return elastic.adjust_global_batch(cfg, client, env.world_size, env.is_main)


def load_resume(cfg: Config, engine, ckpt_dir: Path, env: DistEnv, teacher, scheduler=None) -> dict[str, Any] | None:
    """Load the checkpoint ``checkpoint.resume`` names; None for a fresh start.

    Another world size or ZeRO stage than the checkpoint's goes through ``elastic`` (the data
    cursor is then remapped, not restored exactly)."""
    target = ckpt.resolve_resume(cfg.checkpoint.resume, ckpt_dir)
    if target is None:
        return None
    load_dir, tag = target
    saved = elastic.read_client_state(load_dir / tag)
    rank_state = None
    if elastic.needs_conversion(load_dir / tag, saved, env.world_size, cfg.train.zero_stage):
        rank_state = elastic.resume(engine, scheduler, load_dir / tag, saved, cfg.optim.weight_decay, env.rank)
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
    if teacher is not None:
        teacher.load(load_dir / tag / "ema_teacher.pt")
    if env.is_main:
        log.info("resumed from %s at step %d", load_dir / tag, state["step"])
    return {"step": int(state["step"]), "samples_seen": int(state["samples_seen"]),
            "skipped_steps": int(state["skipped_steps"]),
            "rank_state": rank_state if rank_state is not None else state["ranks"][env.rank]}


# ------------------------------------------------------------------------------------- eval
def periodic_eval(engine, cfg: Config, step: int, logger: RunLogger) -> None:
    """``eval.tasks`` every ``eval.every_steps`` (collective; powerclip.eval.periodic does the work)."""
    from powerclip.eval.periodic import run_periodic_eval

    engine.eval()
    try:
        with torch.no_grad():
            run_periodic_eval(engine, cfg, step, writer=logger.writer)
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
