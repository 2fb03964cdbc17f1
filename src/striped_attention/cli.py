"""The `striped-attention` command: one subcommand per module, each adding its own parser."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

# Each module has add_parser(subparsers), which registers its subcommand and sets func(args) -> exit code.
COMMANDS = ("demo", "train", "bench", "simulate", "plan", "env")


class UsageError(SystemExit):
    """A bad argument value, found after parsing: exit status 2, as argparse gives its own errors. ``str()`` is
    the message, which :func:`main` prints."""

    def __init__(self, command: str, message) -> None:
        super().__init__(2)
        self.message = f"striped-attention {command}: error: {message}"

    def __str__(self) -> str:
        return self.message


def describe(doc: str) -> str:
    """A module docstring as a subcommand's --help text: without its leading "`striped-attention X`: " and
    without reStructuredText markup (``code``, :func:`name`)."""
    text = re.sub(r"^`striped-attention \w+`: ", "", doc.strip())
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return text[:1].upper() + text[1:]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="striped-attention",
        description="Exact, load-balanced, sequence-parallel attention for causal transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"striped_attention.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UsageError as e:
        print(e, file=sys.stderr)
        raise
    except BrokenPipeError:  # stdout piped into a reader that stopped (`| head`): end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # run as the package's module, whose UsageError the commands raise, not as a copy
    from striped_attention.cli import main as package_main

    sys.exit(package_main())
