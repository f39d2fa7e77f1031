"""``geodite-sim`` command line: evaluate, relax, md, screen, campaign, properties, train, distill, models, demo.

Each sub-command lives in ``geodite_sim/commands/<name>.py`` (``add_parser``).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

from geodite_sim.commands import device_arg, positive_int
from geodite_sim.interrupt import EXIT_INTERRUPTED, interrupt_message
from geodite_sim.threads import set_threads

#: Sub-command modules, in the order ``--help`` lists them.
COMMAND_MODULES = ["evaluate", "relax", "md", "screen", "campaign", "properties", "train", "distill", "models",
                   "demo"]

EPILOG = """examples:
  geodite-sim evaluate examples/structures/Si_diamond.cif examples/structures/NaCl_rocksalt.cif
  geodite-sim relax examples/structures/*.cif --out out/relax      # re-run the same line to resume
  geodite-sim md run examples/structures/NaCl_rocksalt_2x2x2.cif --temperature 600 --steps 2000 --trajectory run.h5
  geodite-sim md export run.h5 --format extxyz
  geodite-sim campaign workflows/sse/short.toml

Every sub-command takes many inputs and reports each one: a missing or bad input gets its own
failed line (status and message) and the others run. --device defaults to auto (CUDA when
available, else CPU) everywhere.
exit status: 0 every input succeeded; 1 at least one input failed (the others ran and are
reported); 2 bad arguments (nothing ran).
"""

#: Conventions every sub-command's arguments share, checked after parsing (a safety net for sub-commands
#: whose parser does not type-check them itself): attribute -> (test, what it must be).
COMMON_CHECKS = {
    "fmax": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0 (eV/Å)"),
    "max_steps": (lambda v: v >= 0, "an integer >= 0"),
    "steps": (lambda v: v >= 1, "an integer >= 1"),
    "max_atoms": (lambda v: v >= 1, "an integer >= 1"),
    "timestep": (lambda v: v > 0 and math.isfinite(v), "a finite number > 0 (fs)"),
}


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the sub-command that was run (for its usage line in error messages)."""
    own = getattr(args, "subparser", None) or getattr(args, "_leaf_parser", None)
    if own is not None:
        return own
    sub = getattr(parser, "_geodite_sub", None)
    return sub.choices.get(args.command, parser) if sub is not None else parser


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values that break the shared conventions with a usage message (exit 2)."""
    sp = _subparser(parser, args)
    for name, (ok, what) in COMMON_CHECKS.items():
        value = getattr(args, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            sp.error(f"argument --{name.replace('_', '-')}: must be {what}, got {value}")
    device = getattr(args, "device", None)
    if isinstance(device, str):
        try:
            device_arg(device)
        except argparse.ArgumentTypeError as exc:
            sp.error(f"argument --device: {exc}")


THREADS_HELP = ("CPU threads (default: OMP_NUM_THREADS when set, else one per core; 1 is often much faster on a "
                "machine where other work runs; a warning says when the machine is oversubscribed)")


def _finish_parsers(parser: argparse.ArgumentParser) -> None:
    """Shared conventions of every (sub-)parser: no abbreviated options (``--temp`` is not ``--temperature``);
    every leaf sub-command takes ``--threads`` and knows its own parser (for usage messages)."""
    parser.allow_abbrev = False
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            _finish_parsers(child)
    if not subs and parser.prog != "geodite-sim":
        if "--threads" not in parser._option_string_actions:
            parser.add_argument("--threads", type=positive_int, default=None, metavar="N", help=THREADS_HELP)
        parser.set_defaults(_leaf_parser=parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geodite-sim",
        description="Batched simulation engine for the Geodite interatomic potential.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser._geodite_sub = sub  # type: ignore[attr-defined]  # for check_common_arguments
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"geodite_sim.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"geodite_sim.commands.{name}":
                continue  # sub-command not part of this build
            raise
        module.add_parser(sub)
    _finish_parsers(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # a typo such as --fmx: the sub-command's own usage, not the top-level one
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    check_common_arguments(parser, args)

    if getattr(args, "_leaf_parser", None) is not None and args.command != "train":  # train applies its own
        set_threads(getattr(args, "threads", None))
    from geodite_sim.progress import Progress

    Progress.latest = None
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # one line, no traceback; results stored so far stay (store, checkpoint, JSON files)
        hint = getattr(args, "interrupt_hint", None)
        hint = hint(args) if callable(hint) else hint
        bar = Progress.latest
        print(interrupt_message(*(bar.position() if bar is not None else (None, None, "")), hint=hint),
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:  # e.g. --model pointing nowhere
        _subparser(parser, args).error(str(exc))
    except Exception as exc:
        if type(exc).__name__ != "CheckpointError":  # a bad --model file: a usage error, not a traceback
            raise
        _subparser(parser, args).error(str(exc))
    return 2


if __name__ == "__main__":
    sys.exit(main())
