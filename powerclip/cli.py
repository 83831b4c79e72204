"""``powerclip`` command line: one subcommand per job, each owned by the module that does the work.

Each subcommand module exposes ``add_arguments(parser)`` and ``main(args) -> int``; they are imported
lazily so that ``powerclip --help`` stays fast and a broken optional module cannot break the others.
A failure the user can fix (bad config, missing file, damaged checkpoint, full disk) is printed as
one line; ``--debug`` (or ``POWERCLIP_DEBUG=1``) shows its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("powerclip.train.cli", "train (or fine-tune) from a YAML config with dotted overrides"),
    "export": ("powerclip.export", "export a run or checkpoint to an open_clip folder"),
    "eval": ("powerclip.eval_io.cli", "zero-shot, retrieval and compositional evaluation"),
    "submit": ("powerclip.launch.cli", "submit a training run to Slurm through submitit"),
    "check": ("powerclip.launch.check", "check a config, its data, eval sets and run folder in seconds"),
    "config": ("powerclip.config_cli", "print the resolved config (config show -c CONFIG [overrides])"),
}


class _DropCpuFallbackWarning(logging.Filter):
    """DeepSpeed warns on every CPU machine that it fell back to the CPU accelerator; powerclip logs
    the device it trains on itself, so the warning only adds noise to every command's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


def quiet_deepspeed() -> None:
    """Install the filter before DeepSpeed is imported (its logger keeps the filters it finds)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropCpuFallbackWarning) for f in logger.filters):
        logger.addFilter(_DropCpuFallbackWarning())


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from powerclip import __version__

    parser = argparse.ArgumentParser(prog="powerclip", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"powerclip {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of any failure")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of any failure")
        # only import the chosen subcommand's module: its arguments are added below
        if name in argv[:1] or (argv[:1] == ["--debug"] and name in argv[1:2]):
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_deepspeed()
    parser = build_parser(argv)
    args, rest = parser.parse_known_args(argv)
    debug = args.debug or os.environ.get("POWERCLIP_DEBUG", "") not in ("", "0")
    try:
        mod = importlib.import_module(SUBCOMMANDS[args.command][0])
        if rest and not getattr(mod, "ACCEPTS_EXTRA", False):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.extra = rest
        return int(mod.main(args) or 0)
    except Exception as e:  # noqa: BLE001 - the user's mistakes in one line, bugs with their traceback
        from powerclip.errors import describe, is_expected

        if debug or not is_expected(e):
            raise
        print(f"powerclip {args.command}: error: {describe(e)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
