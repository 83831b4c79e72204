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
    """INFO from powerclip on rank 0, warnings only elsewhere (DeepSpeed's: ``mute_deepspeed``)."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", stream=sys.stderr)
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def mute_deepspeed() -> None:
    """DeepSpeed's INFO chatter muted. Its logger resets its level when DeepSpeed is imported, so this
    imports it: called once the checks have passed, so a config or data mistake is reported without
    waiting seconds for torch and DeepSpeed to load."""
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


def main(args: argparse.Namespace) -> int:
    from powerclip.config import load_config
    from powerclip.errors import describe, is_expected

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    setup_logging(rank)
    debug = getattr(args, "debug", False) or os.environ.get("POWERCLIP_DEBUG", "") not in ("", "0")
    try:
        cfg = load_config(args.config, _launcher_args([*args.overrides, *getattr(args, "extra", [])]))
    except Exception as e:  # noqa: BLE001 - a config error in one line (the others are bugs: traceback)
        if debug or not is_expected(e):
            raise
        print(f"powerclip train: {describe(e)}", file=sys.stderr)
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

    mute_deepspeed()
    from powerclip import distributed as pdist
    from powerclip.train.loop import train

    try:
        result = train(cfg)
    except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback, then exit this rank
        if debug or not is_expected(e):
            raise
        print(f"powerclip train: error (rank {rank}): {describe(e)}", file=sys.stderr, flush=True)
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
