"""``geodite-sim bench speed``: the paper's speed protocol (see geodite_sim/speed_protocol.py)."""

from __future__ import annotations

import argparse

from geodite_sim.commands import device_arg, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks (speed protocol)",
        description="Run a benchmark. 'speed': cubic-Si MD step cost vs size for several engines.",
        epilog="example:\n  geodite-sim bench speed --sizes 1 2 3 --out benchmarks/results/speed_scaling\n\n"
               "--device defaults to auto (CUDA when available, else CPU), as in every sub-command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("which", choices=["speed"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (see --help there)")
    p.set_defaults(func=run, subparser=p)


def run(args: argparse.Namespace) -> int:
    from geodite_sim.speed_protocol import main

    rest = list(args.rest)
    if getattr(args, "threads", None) and not any(a == "--threads" or a.startswith("--threads=") for a in rest):
        rest += ["--threads", str(args.threads)]
    given = [a for a in rest if a == "--device" or a.startswith("--device=")]
    if not given:  # the shared default: CUDA when available, else CPU
        rest += ["--device", resolve_device("auto")]
    else:
        i = next(k for k, a in enumerate(rest) if a in given)
        value = rest[i].split("=", 1)[1] if "=" in rest[i] else (rest[i + 1] if i + 1 < len(rest) else "")
        try:
            value = resolve_device(device_arg(value))
        except argparse.ArgumentTypeError as exc:
            args.subparser.error(f"argument --device: {exc}")
        rest[i:i + (1 if "=" in rest[i] else 2)] = ["--device", value]
    return main(rest)
