"""The argparse conventions every ``convdescent`` command follows.

``CommandParser`` is the parser class of the top-level command; argparse hands the same class to every
subcommand (``add_subparsers`` uses the parent's type), so each one refuses abbreviated flags, shows its
defaults in ``--help`` and reports a bad argument as one ``convdescent: error: ...`` line with exit status 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

EXIT_USAGE = 2


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help lines end with ``(default: X)`` unless the help already says its default or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or "%(default)" in text:
            return text
        default = action.default
        if default is None or default is argparse.SUPPRESS or isinstance(default, bool) or default in ([], ()):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})" if text else f"(default: {shown.replace('%', '%%')})"


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings]


def _looks_like_flag(token: str) -> bool:
    if not token.startswith("-") or token == "-":
        return False
    try:
        float(token)
    except ValueError:
        return True
    return False  # a negative number is a value, not a flag


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser with the command line's conventions (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        # Subcommands are parsed with parse_known_args; an unknown flag is reported here, by the parser that
        # knows which flags would have been right, instead of as a bare list by the top-level parser.
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = [t for t in extras if _looks_like_flag(t)]
        if unknown:
            flag = unknown[0].split("=", 1)[0]
            close = difflib.get_close_matches(flag, _option_strings(self), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; '{self.prog} --help' lists the flags"
            self.error(f"unrecognized argument {flag}{hint}")
        return namespace, extras

    def error(self, message: str):
        """Print one line, ``convdescent: error: <command>: <message>``, and exit with status 2."""
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            options = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.6)
            message = f"{message.split(':')[0]}: invalid choice {choice.group(1)!r}; " + (
                f"did you mean {close[0]!r}?" if close else f"choose from {', '.join(options)}")
        ranged = re.fullmatch(r"argument ([^:]+): (\S+ is out of range: .*)", message)
        if ranged:  # "--momentum 1.5 is out of range: momentum must be in [0, 1)"
            message = f"{ranged.group(1).split('/')[-1]} {ranged.group(2)}"
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"{command}: " if command else ""
        tail = "" if "--help" in message else f" (see '{self.prog} --help')"
        sys.stderr.write(f"convdescent: error: {where}{message}{tail}\n")
        raise SystemExit(EXIT_USAGE)


def walk_parsers(parser: argparse.ArgumentParser, path: tuple = ()):
    """Yield (command path, parser) for a parser and every subcommand below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if sub is not parser:
                    yield from walk_parsers(sub, path + (name,))


def hidden_alias(parser_or_group, flag: str, dest: str, **kwargs) -> None:
    """An old spelling of a flag that still works but is not shown in --help."""
    parser_or_group.add_argument(flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def command_name() -> str:
    """How to run ``convdescent`` from the user's shell as it is now, for commands printed to be run.

    Returns:
        ``convdescent`` when that name on PATH is this installation's script, else the script's full path
        (shell-quoted), else ``python -m convdescent`` with this interpreter.
    """
    script = None
    if sys.argv and sys.argv[0] and Path(sys.argv[0]).name == "convdescent" and Path(sys.argv[0]).is_file():
        script = Path(sys.argv[0]).absolute()
    else:
        beside = Path(sys.executable).parent / "convdescent"
        if beside.is_file():
            script = beside.absolute()
    on_path = shutil.which("convdescent")
    if script is None:
        return "convdescent" if on_path else f"{shlex.quote(sys.executable)} -m convdescent"
    if on_path and os.path.samefile(on_path, script):
        return "convdescent"
    return shlex.quote(str(script))
