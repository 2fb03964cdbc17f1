"""The `striped-attention` command: one subcommand per module, each adding its own parser."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module has add_parser(subparsers), which registers its subcommand and sets func(args) -> exit code.
COMMANDS = ("demo", "train", "bench", "simulate", "plan", "env")


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
