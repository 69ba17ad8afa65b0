"""The ``lorakit`` command: subcommands as a name -> (add_arguments, run) map.

Each module in this package contributes a ``COMMANDS`` dict; ``main`` builds one argparse
parser from them, so adding a subcommand touches only the module that implements it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ..errors import LoraError

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _commands() -> dict[str, Command]:
    from . import adapters, lowrank, tune

    commands: dict[str, Command] = {}
    for module in (tune, lowrank, adapters):
        commands.update(module.COMMANDS)
    return commands


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one subparser per command, each documenting its options and defaults."""
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning and low-rank tools. Run a command with --help for details.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, run) in _commands().items():
        doc = (run.__doc__ or "").strip().splitlines()
        p = sub.add_parser(
            name,
            help=doc[0] if doc else None,
            description=(run.__doc__ or "").strip(),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["train"]  # the embedded default: fine-tune the bundled model on the demo task
    parser = build_parser()
    ns = parser.parse_args(args)
    try:
        return ns.run(ns)
    except LoraError as err:
        print(f"lorakit {ns.command}: error: {err}", file=sys.stderr)
        return 2
