"""``geodite-sim bench speed``: the paper's speed protocol (see geodite_sim/speed_protocol.py)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (speed protocol)",
        description="Run a benchmark. 'speed': cubic-Si MD step cost vs size for several engines.",
        epilog="example:\n  geodite-sim bench speed --sizes 1 2 3 --out benchmarks/results/speed_scaling",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=["speed"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help there)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geodite_sim.speed_protocol import main

    return main(args.rest)
