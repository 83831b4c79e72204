"""``powerclip`` command line: one subcommand per job, each owned by the module that does the work.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``; they are imported
lazily so that ``powerclip --help`` stays fast and a broken optional module cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("powerclip.train.cli", "train (or fine-tune) from a YAML config with dotted overrides"),
    "export": ("powerclip.export", "export a run or checkpoint to an open_clip folder"),
    "eval": ("powerclip.eval.cli", "zero-shot, retrieval and compositional evaluation"),
    "submit": ("powerclip.launch.cli", "submit a training run to Slurm through submitit"),
    "check": ("powerclip.launch.check", "check a config, its data, eval sets and run folder in seconds"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="powerclip", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # only import the chosen subcommand's module: its arguments are added below
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args, rest = parser.parse_known_args(argv)
    mod = importlib.import_module(SUBCOMMANDS[args.command][0])
    if rest and not getattr(mod, "ACCEPTS_EXTRA", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.extra = rest
    return int(mod.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
