"""``geodite-sim evaluate FILE...``: energies, forces and stress of structures (single points)."""

from __future__ import annotations

import argparse
import json

import geodite_sim as gs
from geodite_sim.commands import EXIT_HELP, add_device_argument, exit_code, positive_int, resolve_device

EV_PER_A3_TO_GPA = 160.21766208


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="single-point energies/forces/stress",
        description="Evaluate structures (the last frame of each file) with a Geodite model and print one line per "
                    "input (or write JSON). A missing or bad file gets its own failed line; the others run.",
        epilog="example:\n  geodite-sim evaluate examples/structures/*.cif --json out.json\n\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", help="structure files (anything ASE reads)")
    p.add_argument("--model", default=None, help="checkpoint path or packaged model name (default: packaged default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_device_argument(p)
    p.add_argument("--max-atoms", type=positive_int, default=None,
                       help="atoms per batch (default: the engine's capacity policy for the model and device)")
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run, interrupt_hint="evaluate keeps nothing of an interrupted run (--json is written at "
                                            "the end): re-run it")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    model = gs.load_model(args.model, device=resolve_device(args.device), dtype=getattr(torch, args.dtype))
    results = gs.evaluate(args.inputs, model, max_atoms=args.max_atoms, progress=not args.no_progress)
    rows = []
    print(f"{'structure':40s} {'atoms':>5s} {'E (eV)':>14s} {'E/atom':>10s} {'max|F|':>9s} {'P (GPa)':>9s}  status")
    for path, r in zip(args.inputs, results):
        shown = path if len(path) <= 40 else "…" + path[-39:]
        if r["error"] is None:
            n = len(r["forces"])
            pressure = float(-np.trace(r["stress"]) / 3 * EV_PER_A3_TO_GPA)
            fmax = float(np.linalg.norm(r["forces"], axis=1).max())
            print(f"{shown:40s} {n:5d} {r['energy']:14.6f} {r['energy'] / n:10.5f} {fmax:9.4f} {pressure:9.3f}  "
                  f"{r['status']}")
            rows.append({"structure": path, "status": str(r["status"]), "error": None, "energy": r["energy"],
                         "forces": r["forces"].tolist(), "stress": r["stress"].tolist()})
        else:
            print(f"{shown:40s} {'-':>5s} {'-':>14s} {'-':>10s} {'-':>9s} {'-':>9s}  {r['status']}: {r['error']}")
            rows.append({"structure": path, "status": str(r["status"]), "error": r["error"], "energy": None,
                         "forces": None, "stress": None})
    n_bad = sum(r["error"] is not None for r in results)
    print(f"{len(results)} input(s): {len(results) - n_bad} evaluated, {n_bad} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return exit_code(r["status"] for r in results)
