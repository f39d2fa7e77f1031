"""``geodite-sim evaluate FILE...``: energies, forces and stress of structures (single points)."""

from __future__ import annotations

import argparse
import json

import numpy as np


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="single-point energies/forces/stress",
        description="Evaluate structures with a Geodite model and print a table (or write JSON).",
        epilog="example:\n  geodite-sim evaluate examples/structures/*.cif --json out.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="structure files (anything ASE reads)")
    p.add_argument("--model", default=None, help="checkpoint path or packaged model name (default: packaged default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import geodite_sim as gs

    model = gs.load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    results = gs.evaluate(args.inputs, model)
    rows = []
    print(f"{'structure':40s} {'atoms':>5s} {'E (eV)':>14s} {'E/atom':>10s} {'max|F|':>9s} {'P (GPa)':>9s}")
    for path, r in zip(args.inputs, results):
        n = len(r["forces"])
        pressure = -np.trace(r["stress"]) / 3 * 160.21766
        fmax = float(np.linalg.norm(r["forces"], axis=1).max())
        print(f"{path[-40:]:40s} {n:5d} {r['energy']:14.6f} {r['energy'] / n:10.5f} {fmax:9.4f} {pressure:9.3f}")
        rows.append({"structure": path, "energy": r["energy"], "forces": r["forces"].tolist(),
                     "stress": r["stress"].tolist()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return 0
