"""``powerclip config show -c CONFIG [key=value ...]``: the config a run would use, fully resolved.

Prints the YAML that ``powerclip train`` would write to ``RUN/config.yaml`` (every key, defaults
included, after the overrides and the checks), so a preset and its overrides can be read before
anything is launched. Reads no data and imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

import argparse

ACCEPTS_EXTRA = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("action", choices=["show"], help="show: print the resolved config as YAML")
    parser.add_argument("-c", "--config", required=True, help="YAML preset (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")


def main(args: argparse.Namespace) -> int:
    from powerclip.config import load_config, to_yaml

    cfg = load_config(args.config, [*args.overrides, *getattr(args, "extra", [])])
    print(to_yaml(cfg), end="")
    return 0
