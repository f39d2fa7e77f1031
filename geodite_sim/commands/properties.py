"""``geodite-sim phonons|eos|elastic|diatomics``: the batched property workflows, resumable.

Each material's result goes to ``DIR/<name>.json`` as soon as its workflow stage is done (``<name>`` is
the input file's stem, with ``@<frame>`` for later frames of a multi-frame file); re-running the same
command skips every input whose JSON already exists (``--retry-failed`` re-runs failed ones). A table
of all results in ``DIR`` is rebuilt at the end (``summary.json``, ``summary.md``). ``diatomics`` takes
element symbols instead of structures (default: every element the model supports) and writes
``<El>.json`` per element plus ``diatomics.json`` / ``diatomics.md`` / ``diatomics.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import geodite_sim as gs
from geodite_sim.commands import (
    EXIT_HELP,
    RegistryNames,
    add_device_argument,
    exit_code,
    positive_float,
    positive_int,
    print_status_table,
    resolve_device,
)
from geodite_sim.interrupt import RESUME_HINT

EXAMPLES = {
    "phonons": """examples:
  geodite-sim phonons examples/properties/Si_diamond.cif examples/properties/NaCl_rocksalt.cif --out out/ph
  geodite-sim phonons structures/ --out out/ph --supercell 2 2 2 --temperature 300 --no-plots
  geodite-sim phonons structures/ --out out/ph          # again: skips materials already done
""",
    "eos": """examples:
  geodite-sim eos examples/properties/Si_diamond.cif --out out/eos
  geodite-sim eos structures/ --out out/eos --volume-range 0.1 --points 11 --eos vinet
""",
    "elastic": """examples:
  geodite-sim elastic examples/properties/MgO_rocksalt.cif --out out/elastic
  geodite-sim elastic structures/ --out out/elastic --strain 0.005 --no-relax-ions   # clamped-ion only
""",
    "diatomics": """examples:
  geodite-sim diatomics --out out/diatomics                 # every element the model supports
  geodite-sim diatomics H C N O Si --out out/diatomics --points 200
""",
}

HELP = {
    "phonons": "harmonic phonons (phonopy; all displaced supercells batched), resumable",
    "eos": "equations of state (strained cells batched, ions relaxed), resumable",
    "elastic": "elastic tensors (strained cells batched, ions relaxed and clamped), resumable",
    "diatomics": "homonuclear-diatomics smoothness suite (MLIP Arena metrics), resumable",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    for name in ("phonons", "eos", "elastic", "diatomics"):
        p = sub.add_parser(name, help=HELP[name], description=HELP[name][0].upper() + HELP[name][1:] + ".",
                           epilog=EXAMPLES[name] + "\n" + EXIT_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "diatomics":
            p.add_argument("elements", nargs="*", metavar="ELEMENT",
                           help="element symbols (default: every element the model supports)")
            p.add_argument("--points", type=positive_int, default=200, help="distances 0.01-6.1 Å (default 200)")
        else:
            p.add_argument("inputs", nargs="+", metavar="STRUCTURE",
                           help="structure files or directories (anything ASE reads)")
            p.add_argument("--fmax", type=positive_float, default=0.001 if name == "elastic" else 0.01,
                           help="relaxation force threshold, eV/Å (default %(default)s)")
            p.add_argument("--max-steps", type=positive_int, default=500, help="optimiser steps at most (default 500)")
            p.add_argument("--optimizer", choices=RegistryNames("optimizer"), metavar="OPTIMIZER", default="fire",
                           help="relaxation optimiser, %(choices)s: ASE's FIRE (default), LBFGS or BFGS "
                                "(docs/optimizers.md)")
            p.add_argument("--no-relax", action="store_true", help="use the structures as given (no relaxation)")
            p.add_argument("--retry-failed", action="store_true", help="re-run inputs whose stored result failed")
        p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
        p.add_argument("--model", default=None, help="checkpoint path or packaged model name (default: packaged)")
        p.add_argument("--dtype", choices=["float32", "float64"], default="float64",
                       help="model precision (default float64: finite differences need it)")
        add_device_argument(p)
        p.add_argument("--max-atoms", type=positive_int, default=None,
                       help="atoms per batch (default: the engine's capacity policy for the model and device)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        if name == "phonons":
            p.add_argument("--supercell", nargs="+", default=["auto"],
                           help="'auto' (widths >= --min-length) or three integers (default auto)")
            p.add_argument("--min-length", type=positive_float, default=10.0,
                           help="supercell width for 'auto', Å (default 10)")
            p.add_argument("--displacement", type=positive_float, default=0.01, help="Å (default 0.01)")
            p.add_argument("--mesh", nargs="+", default=["40"],
                           help="q-mesh: three integers, or one length in Å (phonopy's rule; default 40)")
            p.add_argument("--temperature", type=positive_float, default=300.0, help="K (default 300)")
        if name == "eos":
            p.add_argument("--volume-range", type=positive_float, default=0.08, help="± volume strain (default 0.08)")
            p.add_argument("--points", type=positive_int, default=9, help="volumes (default 9, at least 5)")
            p.add_argument("--eos", default="birchmurnaghan", help="ASE EOS form (default birchmurnaghan)")
        if name == "elastic":
            p.add_argument("--strain", type=positive_float, default=0.01, help="largest strain (default 0.01)")
            p.add_argument("--ion-fmax", type=positive_float, default=None, help="eV/Å for strained cells "
                           "(default --fmax)")
        if name in ("eos", "elastic"):
            p.add_argument("--no-relax-ions", action="store_true", help="do not relax ions in strained cells")
        if name in ("phonons", "eos", "diatomics"):
            p.add_argument("--no-plots", action="store_true", help="no PNG plots")
        p.set_defaults(func=run, workflow=name, interrupt_hint=RESUME_HINT)


# ---------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by ``inputs`` (directories expanded to their files, sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            files.extend(sorted(str(p) for p in Path(item).iterdir() if p.is_file() and not p.name.startswith(".")))
        else:
            files.append(item)
    return files


def read_inputs(files: list[str]) -> list[tuple[str, str, object]]:
    """(name, label, structure) per frame of every file; an unreadable file yields its path (reported later)."""
    from ase.io import iread

    from geodite_sim.workflows.properties.common import safe_name

    out, seen = [], set()
    for path in files:
        stem = safe_name(Path(path).stem)
        try:
            frames = list(iread(path, index=":"))
        except Exception:  # noqa: BLE001 - the workflow reports the reason
            frames = []
        items = [(f"{stem}@{k}" if k else stem, f"{path}@{k}" if k else path, a) for k, a in enumerate(frames)]
        if not items:
            items = [(stem, path, path)]
        for name, label, s in items:
            base, n = name, 1
            while name in seen:  # same stem in two directories
                name, n = f"{base}_{n}", n + 1
            seen.add(name)
            out.append((name, label, s))
    return out


def _is_done(path: Path, retry_failed: bool) -> bool:
    if not path.exists():
        return False
    if not retry_failed:
        return True
    try:
        return json.loads(path.read_text()).get("status") == "done"
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = gs.load_model(args.model, device=resolve_device(args.device), dtype=getattr(torch, args.dtype))
    progress = not args.no_progress
    if args.workflow == "diatomics":
        return _diatomics(args, model, out, progress)

    items = read_inputs(expand_inputs(args.inputs))
    todo = [t for t in items if not _is_done(out / f"{t[0]}.json", args.retry_failed)]
    n_skipped = len(items) - len(todo)
    if todo:
        names = [t[0] for t in todo]
        common = dict(model=model, relax=not args.no_relax, fmax=args.fmax, max_steps=args.max_steps,
                      optimizer=args.optimizer, out_dir=out,
                      names=names, labels=[t[1] for t in todo], max_atoms=args.max_atoms, progress=progress)
        structures = [t[2] for t in todo]
        if args.workflow == "phonons":
            from geodite_sim.workflows.properties import run_phonons

            sc = args.supercell
            supercell = "auto" if sc == ["auto"] else [int(v) for v in " ".join(sc).replace(",", " ").split()]
            mesh_vals = [float(v) for v in " ".join(args.mesh).replace(",", " ").split()]
            mesh = mesh_vals[0] if len(mesh_vals) == 1 else [int(v) for v in mesh_vals]
            run_phonons(structures, supercell=supercell, auto_min_length=args.min_length,
                        displacement=args.displacement, mesh=mesh, temperature=args.temperature,
                        plots=not args.no_plots, **common)
        elif args.workflow == "eos":
            from geodite_sim.workflows.properties import run_eos

            run_eos(structures, volume_range=args.volume_range, n_points=args.points, relax_ions=not args.no_relax_ions,
                    eos=args.eos, plots=not args.no_plots, **common)
        else:
            from geodite_sim.workflows.properties import run_elastic

            run_elastic(structures, strain=args.strain, relax_ions=not args.no_relax_ions, ion_fmax=args.ion_fmax,
                        **common)
    rows = _summary(out, args.workflow)
    print(f"{args.workflow}: {len(todo)} new input(s)" + (f", skipped {n_skipped} already done" if n_skipped else ""))

    print_status_table([(r.get("label", r["_name"]), r.get("status", "failed"), _detail(args.workflow, r))
                        for r in rows])
    print(f"results: {out}/<name>.json, {out / 'summary.json'}, {out / 'summary.md'}")
    return exit_code(r.get("status", "failed") for r in rows)


SUMMARY_KEYS = {
    "phonons": ["omega_max_THz", "min_frequency_THz", "imaginary_modes", "entropy_J_per_K_mol",
                "free_energy_kJ_per_mol", "cv_J_per_K_mol"],
    "eos": ["v0_A3", "e0_eV", "b0_GPa", "b0_prime"],
    "elastic": ["bulk_hill_GPa", "shear_hill_GPa", "born_stable", "bulk_hill_clamped_GPa", "shear_hill_clamped_GPa"],
}


def _summary(out: Path, workflow: str) -> list[dict]:
    """All result JSONs in ``out`` (this run's and earlier ones) as summary.json + summary.md."""
    rows = []
    for path in sorted(out.glob("*.json")):
        if path.name in ("summary.json",):
            continue
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or "status" not in rec or "label" not in rec:
            continue
        rec["_name"] = path.stem
        rows.append(rec)
    keys = SUMMARY_KEYS[workflow]
    table = [{k: r.get(k) for k in ["_name", "label", "formula", "n_atoms", "status", "error", *keys]} for r in rows]
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    lines = ["| name | formula | status | " + " | ".join(keys) + " |", "|" + "---|" * (3 + len(keys))]
    for r in table:
        vals = [_num(r.get(k)) for k in keys]
        status = r["status"] if not r.get("error") else f"failed: {r['error']}"
        lines.append(f"| {r['_name']} | {r.get('formula') or ''} | {status} | " + " | ".join(vals) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def _num(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _detail(workflow: str, r: dict) -> str:
    if r.get("error"):
        return r["error"]
    return ", ".join(f"{k}={_num(r.get(k))}" for k in SUMMARY_KEYS[workflow][:4])


def _diatomics(args: argparse.Namespace, model, out: Path, progress: bool) -> int:
    from geodite_sim.workflows.properties.diatomics import (
        DiatomicResult,
        DiatomicsReport,
        means,
        model_elements,
        run_diatomics,
        write_report,
    )

    elements = args.elements or None
    done = {p.stem for p in out.glob("*.json") if p.name != "diatomics.json"}
    if args.elements:
        requested = list(args.elements)
    else:
        from ase.data import chemical_symbols

        requested = [chemical_symbols[z] for z in model_elements(model)]
    skip = [e for e in requested if e in done]
    report = run_diatomics(model, elements=elements, n=args.points, skip=skip, max_atoms=args.max_atoms,
                           progress=progress, plots=False)
    previous = []
    for e in skip:
        try:
            previous.append(DiatomicResult(**json.loads((out / f"{e}.json").read_text())))
        except (OSError, ValueError, TypeError) as exc:
            print(f"warning: could not reload {e}.json ({exc}); re-run with that file removed", file=sys.stderr)
    order = {e: k for k, e in enumerate(requested)}
    results = sorted(previous + report.results, key=lambda r: order.get(r.element, len(order)))
    for r in results:  # JSON null -> NaN for reloaded records
        for k, v in vars(r).items():
            if v is None and k not in ("error",):
                setattr(r, k, float("nan"))
    full = DiatomicsReport(results, means(results))
    write_report(full, out, plots=not args.no_plots)
    print(f"diatomics: {len(report.results)} new element(s)" + (f", skipped {len(skip)} already done" if skip else ""))
    print_status_table([(r.element, r.status, r.error or f"flips F {r.force_flips:.0f}, ΔE {r.energy_diff_flips:.0f}, "
                         f"tortuosity {r.tortuosity:.3f}") for r in results])
    print(f"means over {full.means['n_elements']:.0f} elements: force flips {full.means['force_flips']:.3f}, "
          f"energy-difference flips {full.means['energy_diff_flips']:.3f}, tortuosity {full.means['tortuosity']:.3f}, "
          f"energy jump {full.means['energy_jump']:.4f}")
    print(f"results: {out / 'diatomics.json'}, {out / 'diatomics.md'}" + ("" if args.no_plots else
                                                                          f", {out / 'diatomics.png'}"))
    return exit_code(r.status for r in results)
