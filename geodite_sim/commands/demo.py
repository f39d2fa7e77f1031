"""``geodite-sim demo`` (what ``make demo`` runs): relax the example structures with the default model."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def examples_dir() -> Path:
    """The repository's ``examples/structures`` (next to the package in a source checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        d = base / "examples" / "structures"
        if d.is_dir():
            return d
    raise FileNotFoundError("examples/structures not found: run the demo from a source checkout")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="relax the example structures with the default model and print the table",
        description="The main job on the embedded default model: relax every structure in "
                    "examples/structures (batched FIRE with the cell) and print the results table.",
        epilog="example:\n  geodite-sim demo --out out/demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="out/demo", help="output directory (default out/demo; re-running resumes)")
    p.add_argument("--model", default=None, help="checkpoint or packaged name (default: packaged default)")
    p.add_argument("--fresh", action="store_true", help="ignore earlier results in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-steps", type=int, default=None,
                   help="FIRE steps per structure (default 500; 20 for the random-weight reference model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geodite_sim.cli import main
    from geodite_sim.model.registry import DEFAULT_MODEL

    name = args.model or DEFAULT_MODEL
    print(f"geodite_sim demo: relaxing the example structures with model '{name}'")
    max_steps = args.max_steps
    if name == "geodite-mini":
        print("NOTE: geodite-mini is a small Geodite distilled from CHGNet 0.3.0 for demonstration (not Geodite-MP, "
              "not DFT); see docs/default-model.md for its measured errors.")
    if name == "geodite-reference-random":
        print("NOTE: this model is the official-format conformance checkpoint with RANDOM weights; "
              "its energies are not physical. It exercises the engine end to end.")
        if max_steps is None:
            max_steps = 20
            print("      With random weights a full relaxation is meaningless and slow on a CPU, so the demo "
                  "stops after 20 FIRE steps (--max-steps to change).")
    files = sorted(str(p) for p in examples_dir().iterdir() if p.suffix in (".cif", ".extxyz", ".xyz", ".vasp"))
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    argv = ["relax", *files, "--out", args.out]
    if args.model:
        argv += ["--model", args.model]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    if args.no_progress:
        argv.append("--no-progress")
    return main(argv)
