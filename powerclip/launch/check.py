"""``powerclip check -c CONFIG [key=value ...]``: everything a run needs, checked in seconds.

Runs ``powerclip.train.preflight`` (config, shards and their first samples, the annotations the
enabled losses need, evaluation roots, tokenizer, starting weights, run folder and disk) and, where
Slurm's tools are installed, that ``slurm.partition`` and ``slurm.account`` exist. Prints one line
per passed check and exits 0, or one line naming the key and the fix and exits 2::

    powerclip check -c configs/powerclip_vitb16_cc12m.yaml data.sources='[{shards: "/data/x/{0000..0009}.tar"}]'
"""

from __future__ import annotations

import argparse
import getpass
import shutil
import subprocess
import sys
import time

from powerclip.config import Config

ACCEPTS_EXTRA = True


class SlurmCheckError(ValueError):
    """``slurm.partition`` or ``slurm.account`` unknown to the cluster; the message names the key."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.run_dir=runs/x")


def _ask(cmd: list[str]) -> list[str] | None:
    """Output lines of a Slurm query, or None when the tool is absent or cannot answer."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return [x.strip() for x in proc.stdout.splitlines() if x.strip()]


def check_slurm(cfg: Config) -> list[str]:
    """``slurm.partition`` in ``sinfo``'s list and ``slurm.account`` among the user's associations
    in ``sacctmgr`` (clusters without accounting cannot tell: then skipped, and said so)."""
    s, out = cfg.slurm, []
    if s.partition:
        parts = _ask(["sinfo", "-h", "-o", "%R"])
        if parts is None:
            out.append(f"slurm.partition={s.partition}: not checked (no sinfo here)")
        elif s.partition not in parts:
            raise SlurmCheckError(f"slurm.partition={s.partition!r} is not a partition of this cluster "
                                  f"(sinfo lists {', '.join(sorted(set(parts)))}); pass --partition or set "
                                  "slurm.partition")
        else:
            out.append(f"slurm.partition={s.partition} exists")
    if s.account:
        accounts = _ask(["sacctmgr", "-n", "-P", "show", "associations", f"user={getpass.getuser()}",
                         "format=Account"])
        if accounts is None:
            out.append(f"slurm.account={s.account}: not checked (no Slurm accounting answers here)")
        elif s.account.lower() not in {a.lower() for a in accounts}:  # sacctmgr keeps names in lower case
            raise SlurmCheckError(f"slurm.account={s.account!r} is not one of your Slurm accounts "
                                  f"({', '.join(sorted(set(accounts))) or 'none'}); pass --account or set "
                                  "slurm.account")
        else:
            out.append(f"slurm.account={s.account} is yours")
    return out


def main(args: argparse.Namespace) -> int:
    import yaml

    from powerclip.config import ConfigError, load_config
    from powerclip.train.preflight import CheckError, preflight

    start = time.perf_counter()
    try:
        cfg = load_config(args.config, [*args.overrides, *getattr(args, "extra", [])])
        report = preflight(cfg, say=lambda line: print(f"ok: {line}", flush=True))
        for line in check_slurm(cfg):
            print(f"ok: {line}", flush=True)
    except (ConfigError, CheckError, SlurmCheckError, yaml.YAMLError) as e:
        print(f"powerclip check: error: {e}", file=sys.stderr)
        return 2
    for line in report.warnings:
        print(f"powerclip check: warning: {line}", file=sys.stderr)
    print(f"powerclip check: all checks passed in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
