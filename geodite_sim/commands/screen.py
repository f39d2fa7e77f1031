"""``geodite-sim screen CANDIDATES... --references REFS... --out DIR``: stability screening.

Relax candidates (streamed, resumable), place them against a convex hull of reference
phases, write a results table, hull plots and, with DFT labels, discovery metrics.
The workflow lives in :mod:`geodite_sim.workflows.stability`; see docs/screening.md.
"""

from __future__ import annotations

import argparse
import math

import geodite_sim as gs
from geodite_sim.commands import RegistryNames
from geodite_sim.interrupt import RESUME_HINT

EPILOG = """examples:
  # self-consistent references (elements + known phases relaxed with the same model)
  geodite-sim screen candidates/ --references refs/ --out screen_out

  # Materials Project entries as references (MP2020 corrections switch on automatically
  # when the entries carry MP-style parameters), with DFT labels for metrics
  geodite-sim screen candidates.extxyz --references mp_entries.json.gz --out screen_out \\
      --labels dft_e_above_hull.csv --dft-structures dft_relaxed/

  # a killed run resumes where it stopped: re-run the same command
  geodite-sim screen candidates/ --references refs/ --out screen_out

outputs (in --out): results.csv, results.json, references.csv, relaxed.extxyz,
hull_<chemsys>.png, metrics.json (with --labels), run.json; the result store: relaxations.jsonl,
relaxations.extxyz, store.json (docs/store.md)

  # on a Ray cluster (docs/ray.md)
  geodite-sim screen candidates/ --references refs/ --out screen_out --ray auto --workers 4
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "screen",
        help="stability screening: relax -> convex hull -> metrics",
        description=(
            "Relax candidate structures, compute formation energies and distances to the convex hull "
            "of reference phases (pymatgen PhaseDiagram built from the references only), and report "
            "stability calls, hull plots and, given DFT labels, precision/recall/F1/DAF/MAE/R2/RMSD."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("candidates", nargs="+",
                   help="candidate structure files or directories (anything ASE reads; multi-frame files "
                        "give one candidate per frame; monty JSON of Structures)")
    p.add_argument("--references", nargs="+", required=True,
                   help="a monty JSON file of pymatgen ComputedEntry/ComputedStructureEntry objects (e.g. an MP "
                        "export), or structure files/directories of elements and known phases to relax with the "
                        "same model (self-consistent references)")
    p.add_argument("--out", required=True, help="output directory (also holds the resume log)")
    p.add_argument("--model", default=None, help="checkpoint path or packaged model name (default: packaged default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence criterion, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="optimiser steps per structure at most (default 500)")
    p.add_argument("--optimizer", choices=RegistryNames("optimizer"), metavar="OPTIMIZER", default="fire",
                   help="%(choices)s: ASE's FIRE (default), LBFGS or BFGS, with the Fréchet cell filter "
                        "(docs/optimizers.md)")
    p.add_argument("--no-relax-cell", dest="relax_cell", action="store_false", help="keep cells fixed")
    p.add_argument("--max-atoms", type=int, default=None, help="atoms per batch (default: engine's choice)")
    p.add_argument("--threshold", type=float, default=0.0,
                   help="stable <=> E_above_hull <= threshold + tolerance, eV/atom (default 0)")
    p.add_argument("--stable-tolerance", type=float, default=None,
                   help="eV/atom added to the threshold so that relaxation noise cannot decide a call on the hull "
                        "(default: tied to --fmax, fmax^2 / (2 x 1 eV/Å^2), 1.25 meV/atom at 0.05; recorded in "
                        "run.json). Candidates matching a reference structure are placed on it (docs/screening.md)")
    mp = p.add_mutually_exclusive_group()
    mp.add_argument("--mp2020", dest="mp2020", action="store_true", default=None,
                    help="apply MP2020 compatibility corrections to references and candidates")
    mp.add_argument("--no-mp2020", dest="mp2020", action="store_false",
                    help="never apply MP2020 corrections (default: auto, on when every reference entry carries "
                         "MP-style parameters run_type/hubbards)")
    p.add_argument("--require-converged", action="store_true",
                   help="report candidates that hit --max-steps as not_converged instead of screening them")
    p.add_argument("--labels", default=None,
                   help="DFT E_above_hull per candidate id (CSV with id + e_above_hull columns, or JSON {id: value})")
    p.add_argument("--dft-structures", default=None,
                   help="DFT-relaxed structures per candidate id (directory of <id>.<ext>, or JSON) for the RMSD")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw hull plots")
    p.add_argument("--max-plots", type=int, default=50, help="hull plots at most (default 50)")
    p.add_argument("--restart", action="store_true", help="discard earlier relaxations in --out and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", dest="no_progress", action="store_true", help=argparse.SUPPRESS)  # the old name
    from geodite_sim.executors import add_executor_arguments

    add_executor_arguments(p)
    p.set_defaults(func=run, interrupt_hint=RESUME_HINT)


def run(args: argparse.Namespace) -> int:
    import torch

    from geodite_sim.workflows.stability import SCREENED, ScreenError, screen

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = gs.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    relax_kwargs = {"max_atoms": args.max_atoms} if args.max_atoms else {}
    from geodite_sim.executors import make_executor

    try:
        executor = make_executor(args.ray, args.workers, shard_size=args.shard_size)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    try:
        res = screen(
            args.candidates, args.references, out=args.out, model=model, fmax=args.fmax, max_steps=args.max_steps,
            relax_cell=args.relax_cell, optimizer=args.optimizer, threshold=args.threshold,
            stable_tolerance=args.stable_tolerance,
            executor=executor, mp2020=args.mp2020, labels=args.labels,
            dft_structures=args.dft_structures, require_converged=args.require_converged, plots=args.plots,
            max_plots=args.max_plots, restart=args.restart, progress=not args.no_progress, relax_kwargs=relax_kwargs,
        )
    except ScreenError as exc:
        print(f"error: {exc}")
        return 2
    finally:
        executor.shutdown()

    def fmt(v, spec=".3f"):
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    print(f"{'id':28s} {'formula':12s} {'E/atom':>9s} {'E_form':>9s} {'E_hull':>9s} {'stable':>6s} "
          f"{'steps':>5s}  status")
    for r in res.rows:
        stable = "-" if r.get("stable") is None else ("yes" if r["stable"] else "no")
        status = r["status"] if r["status"] == SCREENED else f"{r['status']}: {r.get('error')}"
        if r["status"] == SCREENED and not r.get("converged", True):
            status += " (not converged)"
        if r.get("matches_reference"):
            status += f" (= reference {r['matches_reference']}; own E_hull {r['e_above_hull_raw']:+.5f})"
        formula = str(r.get("reduced_formula") or "")[:12]
        print(f"{r['id'][:28]:28s} {formula:12s} {fmt(r.get('energy_per_atom'), '.4f'):>9s} "
              f"{fmt(r.get('e_form_per_atom'), '.5f'):>9s} {fmt(r.get('e_above_hull'), '.5f'):>9s} {stable:>6s} "
              f"{fmt(r.get('n_steps'), 'd'):>5s}  {status}")
    for w in res.warnings:
        print(f"warning: {w}")
    s, t = res.settings, res.timings
    print(f"\n{s['n_screened']}/{s['n_candidates']} candidates screened, {s['n_stable']} predicted stable "
          f"(E_above_hull <= {s['threshold']:g} + {s['stable_tolerance']:.3g} eV/atom; "
          f"{s.get('n_matching_references', 0)} matching a reference structure); "
          f"references: {s['reference_mode']} ({s['n_references']}), "
          f"MP2020: {'on' if s['mp2020'] else 'off'} ({s['mp2020_reason']})")
    print(f"time: relax {t['relax_s']:.1f} s ({t['n_relaxed_this_run']} relaxed, {t['n_resumed']} resumed), "
          f"hull {t['hull_s']:.1f} s, plots {t['plot_s']:.1f} s, total {t['total_s']:.1f} s")
    if res.metrics is not None:
        m = res.metrics["summary"]
        print("metrics: " + ", ".join(f"{k} {fmt(v)}" for k, v in m.items()))
        for note in res.metrics["classification"]["notes"] + res.metrics["e_above_hull"]["notes"]:
            print(f"note: {note}")
    print(f"results in {res.out}/ (results.csv, results.json{', metrics.json' if res.metrics else ''}, "
          f"{len(res.plots)} hull plot(s))")
    return 0
