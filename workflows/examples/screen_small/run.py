"""Run the small stability screen (38 candidates in Li-O, Na-Cl, Li-S, Li-Cl, Na-O, Mg-O-Si).

    python workflows/examples/screen_small/run.py                       # default model, out/ next to this file
    python workflows/examples/screen_small/run.py --max-steps 100 --threads 2 --out /tmp/screen_small

Equivalent command line (after ``generate.py`` has written the inputs)::

    geodite-sim screen workflows/examples/screen_small/candidates \\
        --references workflows/examples/screen_small/references \\
        --out workflows/examples/screen_small/out --max-steps 200

References are self-consistent (elements + known binaries relaxed with the same model), so MP2020
corrections are off. Re-running resumes from ``out/relaxations.jsonl``; ``--restart`` starts over.
The packaged default model (geodite-mini, a small model distilled from CHGNet) makes the numbers
exercise the workflow; they are not predictions. Known phases among the candidates are placed on their
references (``StructureMatcher``; docs/screening.md), so they are called stable whatever the relaxation
noise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    ap.add_argument("--model", default=None, help="checkpoint or packaged model name (default: packaged default)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--fmax", type=float, default=0.05)
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--max-atoms", type=int, default=None, help="atoms per batch (default: engine's choice)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: fastest on a shared 2-core machine; 0 = torch's choice)")
    ap.add_argument("--regenerate", action="store_true", help="rewrite candidates/ and references/ first")
    ap.add_argument("--restart", action="store_true", help="discard earlier relaxations in --out")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--no-plots", action="store_true", help="no hull plots")
    args = ap.parse_args()

    import torch
    from geodite_sim.workflows.stability import SCREENED, screen

    import geodite_sim as gs

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cdir, rdir = HERE / "candidates", HERE / "references"
    if args.regenerate or not cdir.exists() or not rdir.exists():
        from generate import generate

        generate(HERE)
    model = gs.load_model(args.model, dtype=getattr(torch, args.dtype))
    t0 = time.perf_counter()
    res = screen(cdir, rdir, out=args.out, model=model, fmax=args.fmax, max_steps=args.max_steps,
                 restart=args.restart, progress=not args.quiet, plots=not args.no_plots,
                 relax_kwargs={"max_atoms": args.max_atoms} if args.max_atoms else None)
    wall = time.perf_counter() - t0

    print(f"{'id':28s} {'formula':9s} {'E_form':>9s} {'E_hull':>9s} {'stable':>6s} {'steps':>5s}  status")
    for r in res.rows:
        if r["status"] == SCREENED:
            status = "screened" + ("" if r.get("converged") else " (not converged)")
            if r.get("matches_reference"):
                status += f" (= reference {r['matches_reference']})"
            print(f"{r['id'][:28]:28s} {r['reduced_formula'][:9]:9s} {r['e_form_per_atom']:9.5f} "
                  f"{r['e_above_hull']:9.5f} {'yes' if r['stable'] else 'no':>6s} {r['n_steps']:5d}  {status}")
        else:
            print(f"{r['id'][:28]:28s} {str(r.get('reduced_formula') or '')[:9]:9s} {'-':>9s} {'-':>9s} {'-':>6s} "
                  f"{'-':>5s}  {r['status']}: {r['error']}")
    for w in res.warnings:
        print(f"warning: {w}")
    t = res.timings
    n_cand = len(res.rows)
    analysis = t["hull_s"] + t["plot_s"] + t["metrics_s"]
    busy = t["relax_s"] + analysis
    summary = {
        "device": str(model.device), "threads": torch.get_num_threads(), "dtype": args.dtype,
        "max_steps": args.max_steps, "fmax": args.fmax,
        "n_candidates": n_cand, "n_screened": res.settings["n_screened"],
        "n_references": res.settings["n_references"],
        "n_relaxed_this_run": t["n_relaxed_this_run"], "n_resumed": t["n_resumed"],
        "relax_s": t["relax_s"], "hull_s": t["hull_s"], "plot_s": t["plot_s"], "wall_s": wall,
        "relax_fraction": t["relax_s"] / busy if busy else math.nan,
        "analysis_fraction": analysis / busy if busy else math.nan,
        "candidates_per_hour": n_cand / wall * 3600 if not t["n_resumed"] else None,
        "relaxations_per_hour": t["relaxations_per_hour"],
    }
    (args.out / "throughput.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{res.settings['n_screened']}/{n_cand} screened, {res.settings['n_stable']} predicted stable; "
          f"relax {t['relax_s']:.1f} s ({t['n_relaxed_this_run']} relaxations incl. references, "
          f"{t['n_resumed']} resumed), hull {t['hull_s']:.1f} s, plots {t['plot_s']:.1f} s, wall {wall:.1f} s")
    if summary["candidates_per_hour"]:
        print(f"throughput: {summary['candidates_per_hour']:.0f} candidates/hour end to end; "
              f"{100 * summary['relax_fraction']:.1f}% of the time in relaxation, "
              f"{100 * summary['analysis_fraction']:.1f}% in hull analysis + plots")
    print(f"outputs in {args.out}/: results.csv, results.json, references.csv, {len(res.plots)} hull plots, run.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
