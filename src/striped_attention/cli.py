"""The `striped-attention` command: one subcommand per module, each adding its own parser."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

# Each module has add_parser(subparsers), which registers its subcommand and sets func(args) -> exit code.
COMMANDS = ("demo", "train", "bench", "simulate", "plan", "env")


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
