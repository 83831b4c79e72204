"""``powerclip train -c CONFIG [key=value ...]``: load, override, validate, train.

Dotted overrides may also follow as plain extra arguments (``ACCEPTS_EXTRA``)::

    powerclip train -c configs/tiny_cpu.yaml optim.lr=1e-4 train.steps=50

Launch it under any launcher: ``torchrun --nproc_per_node 2 -m powerclip train ...``,
``deepspeed --num_gpus 8 -m powerclip train ...`` (or ``deepspeed powerclip/__main__.py``), ``srun``,
or plainly (one process). The resolved config is written to ``RUN/config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ACCEPTS_EXTRA = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")


def setup_logging(rank: int) -> None:
    """INFO from powerclip on rank 0, warnings only elsewhere; DeepSpeed's INFO chatter muted."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", stream=sys.stderr)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


def _launcher_args(extra: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` (the ``deepspeed`` launcher appends it; LOCAL_RANK is in the env too)."""
    out, skip = [], False
    for item in extra:
        if skip:
            skip = False
            continue
        if item.startswith("--local_rank") or item.startswith("--local-rank"):
            name, _, value = item.partition("=")
            if not value:
                skip = True  # "--local_rank 0"
            continue
        out.append(item)
    return out


def _CLEAR_ERRORS() -> tuple[type[BaseException], ...]:
    """Errors whose message already says what is wrong and where (key, file, shard, holder)."""
    from powerclip.checkpoints.discovery import CheckpointError
    from powerclip.checkpoints.integrity import CheckpointIntegrityError
    from powerclip.checkpoints.safe_load import CheckpointReadError
    from powerclip.config import ConfigError
    from powerclip.data.loader import DataError
    from powerclip.model.factory import ModelLoadError
    from powerclip.train.peers import PeerLostError
    from powerclip.train.run_lock import RunLockError

    return (ConfigError, DataError, CheckpointError, ModelLoadError, CheckpointIntegrityError, RunLockError,
            CheckpointReadError, PeerLostError, FileNotFoundError, PermissionError)


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; for an error re-raised from a DataLoader worker (whose
    message embeds the worker's traceback) the original error's own line."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in lines[1]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(lines)


def main(args: argparse.Namespace) -> int:
    import yaml

    from powerclip.config import ConfigError, load_config

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    setup_logging(rank)
    try:
        cfg = load_config(args.config, _launcher_args([*args.overrides, *getattr(args, "extra", [])]))
    except (ConfigError, yaml.YAMLError) as e:
        print(f"powerclip train: {e}", file=sys.stderr)
        return 2
    # before distributed init and the model: a wrong path or missing annotation costs seconds. Every
    # rank checks (reads a few samples) so none waits on a peer that gave up; local rank 0 reports
    from powerclip.train.preflight import CheckError, preflight

    try:
        report = preflight(cfg)
    except CheckError as e:
        if int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0:
            print(f"powerclip train: error: {e}", file=sys.stderr, flush=True)
        return 2
    for warning in report.warnings:  # e.g. some of the first samples skipped: said once, by rank 0
        if rank == 0:
            logging.getLogger("powerclip.train.preflight").warning("%s", warning)

    from powerclip import distributed as pdist
    from powerclip.train.loop import train

    try:
        result = train(cfg)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback, then exit this rank
        if not isinstance(e, _CLEAR_ERRORS()):
            raise
        print(f"powerclip train: error (rank {rank}): {one_line(e)}", file=sys.stderr, flush=True)
        os._exit(2)  # the other ranks may be waiting in a collective; do not hang in destructors
    if rank == 0:
        loss = result["loss"]
        print(f"finished at step {result['step']}: loss {loss if loss is None else round(loss, 4)}, "
              f"{result['skipped_steps']} skipped steps, run folder {result['run_dir']}", flush=True)
    if pdist.is_initialized():
        pdist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        # gloo/NCCL sometimes abort in their destructors at interpreter exit; all work is on disk
        os._exit(0)
    return 0
