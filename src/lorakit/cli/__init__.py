"""The ``lorakit`` command: subcommands as a name -> (add_arguments, run) map.

Each module in this package contributes a ``COMMANDS`` dict; ``main`` builds one argparse
parser from them, so adding a subcommand touches only the module that implements it.

Building the parser imports no transformers and no training code: each ``run`` function
imports what it needs, so ``lorakit --help`` and ``lorakit train --help`` answer at once.

Flags are matched whole (``allow_abbrev=False``: ``--dat`` is not ``--data``), and a
mistyped flag is named with the closest valid one before argparse could report only that a
required flag is missing. Bad input never shows a traceback: a ``LoraError``, or an ``OSError`` on a path (missing,
unreadable, a folder, a full disk), prints one line and exits with 2; Ctrl-C exits with 130.
``--debug`` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import sys
import traceback
from collections.abc import Callable, Sequence

from ..errors import LoraError

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _commands() -> dict[str, Command]:
    from . import adapters, export, lowrank, serve, train, tune

    commands: dict[str, Command] = {}
    for module in (train, tune, lowrank, adapters, serve, export):
        commands.update(module.COMMANDS)
    return commands


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help, unless the help says it already or there is no
    X (None, or an empty list for a repeatable flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default == [] or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The full parser: one subparser per command, each documenting its options and defaults."""
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning and low-rank tools. Run a command with --help for details.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_arguments, run) in _commands().items():
        doc = (run.__doc__ or "").strip().splitlines()
        p = sub.add_parser(
            name,
            help=doc[0] if doc else None,
            description=(run.__doc__ or "").strip(),
            formatter_class=_HelpFormatter,
            allow_abbrev=False,  # a prefix (--dat) would silently stand for a flag (--data)
        )
        add_arguments(p)
        # SUPPRESS: given before the command, --debug is not reset by the subcommand's default.
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the traceback of an error",
        )
        p.set_defaults(run=run, parser=p)
    return parser


def _did_you_mean(word: str, choices: Sequence[str], command: str | None) -> str:
    """`` (did you mean X?)`` for a mistyped flag or command, or ``""``."""
    suggestion = None
    if command == "train" and word.startswith("--"):
        from ..training.config import config_fields, suggest_key

        key = suggest_key(word[2:], [f.name for f in config_fields()])
        suggestion = "--" + key.replace("_", "-") if key else None
    if suggestion is None or suggestion not in choices:
        close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
        suggestion = close[0] if close else None
    return f" (did you mean {suggestion}?)" if suggestion else ""


def _refuse_unknown(parser: argparse.ArgumentParser, command: str, extras: list[str]) -> None:
    """Exit with one line per unknown argument, each with its closest valid flag."""
    flags = sorted(o for action in parser._actions for o in action.option_strings)
    problems = []
    for extra in extras:
        word = extra.split("=", 1)[0]
        if word.startswith("-"):
            problems.append(f"unknown flag {word}{_did_you_mean(word, flags, command)}")
        else:
            problems.append(f"unexpected argument {extra!r}")
    parser.error("; ".join(problems) + f". See lorakit {command} --help.")


def _unknown_flags(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """The ``--flags`` in ``args`` that ``parser`` does not define, found before parsing.

    argparse checks required flags first, so ``--daata x`` alone would get "the following
    arguments are required: --data" and no word about the typo. As argparse does, a word after
    ``--`` or with a space in it (a value such as ``--system "--- terse"``) is no flag.
    """
    flags = {o for action in parser._actions for o in action.option_strings}
    unknown = []
    for arg in args:
        if arg == "--":
            break
        word = arg.split("=", 1)[0]
        if word.startswith("--") and " " not in arg and word not in flags:
            unknown.append(arg)
    return unknown


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``command``."""
    (action,) = parser._subparsers._group_actions  # type: ignore[union-attr]
    return action.choices[command]  # type: ignore[index]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["train"]  # the embedded default: fine-tune the bundled model on the demo task
    parser = build_parser()
    commands = list(_commands())
    # The command: the first word that is not a flag (lorakit's own flags take no value).
    at = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if at is not None and args[at] not in commands:
        parser.error(
            f"unknown command {args[at]!r}{_did_you_mean(args[at], commands, None)}; "
            f"choose one of {', '.join(commands)}"
        )
    if at is not None:
        sub = _subparser(parser, args[at])
        if unknown := _unknown_flags(sub, args[at + 1 :]):
            _refuse_unknown(sub, args[at], unknown)
    ns, extras = parser.parse_known_args(args)
    if ns.command is None:
        parser.print_help()
        return 2
    if extras:
        _refuse_unknown(ns.parser, ns.command, extras)
    from ..progress import quiet_transformers

    quiet_transformers()  # lorakit says what it loads and writes; transformers' bars are noise
    try:
        return ns.run(ns)
    except (LoraError, OSError, KeyboardInterrupt) as err:
        if ns.debug:
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):
            print(f"\nlorakit {ns.command}: interrupted", file=sys.stderr)
            return 130
        if isinstance(err, OSError) and not isinstance(err, LoraError):
            err = _os_error(err)  # a path the user gave, not a bug: no traceback either
        print(f"lorakit {ns.command}: error: {err}", file=sys.stderr)
        return 2


def _os_error(error: OSError) -> str:
    """What an ``OSError`` that reached the CLI means for the user, and the fix."""
    where = f"{error.filename}: " if error.filename else ""
    reason = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        return f"{where}{reason}: the disk is full. Free some space (or write elsewhere) and rerun."
    if isinstance(error, PermissionError):
        return f"{where}{reason}. Check the path's permissions, or pass another path."
    return f"{where}{reason}. Check the path and pass a readable file or writable folder."
