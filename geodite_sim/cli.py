"""``geodite-sim`` command line: relax, md, screen, campaign, train, bench, evaluate.

Each sub-command lives in ``geodite_sim/commands/<name>.py`` (``add_parser``).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = ["evaluate", "relax", "md", "screen", "campaign", "train", "bench", "demo"]

EPILOG = """examples:
  geodite-sim relax examples/*.cif --out relaxed/
  geodite-sim md run structures.extxyz --temperature 600 --steps 2000 --trajectory run.h5
  geodite-sim md export run.h5 --format extxyz
  geodite-sim campaign workflows/sse/short.toml
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodite-sim",
        description="Batched simulation engine for the Geodite interatomic potential.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"geodite_sim.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"geodite_sim.commands.{name}":
                continue  # sub-command not part of this build
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
