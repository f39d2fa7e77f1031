"""``geodite-sim md analyse``: RDF, MSD, tracer D per species (with intervals, or "not determined" and why),
Nernst–Einstein conductivity and Haven ratio of HDF5 trajectories written by ``md run`` / ``run_md``.

Registered by :mod:`geodite_sim.commands.md`; frames are streamed from the file
(:mod:`geodite_sim.analysis.transport`), so a long run is never loaded whole.
"""

from __future__ import annotations

import argparse
import json
import sys

from geodite_sim.commands import add_device_argument, nonnegative_float, positive_float, positive_int, resolve_device

EXAMPLES = """examples:
  geodite-sim md analyse run.h5 --species Li --discard-fs 5000
  geodite-sim md analyse run.h5 --system 0 2 --species Li --charges Li=1 N=-3 --json analysis.json
  geodite-sim md analyse run.h5 --fit-window-fs 2000 20000 --drift framework --species Cu

D comes from the all-origins MSD, a line weighted by 1/t over the fit window (default 10-50 % of the
analysed span; pymatgen-analysis-diffusion's estimator); its interval from the spread of the per-atom
slopes (Student t). D is "not determined" (with the reason) for a non-positive slope or R^2 < --r2-min.
Prints one block per system; exit status 0 when every system was analysed, 1 when one failed (the others
are reported), 2 for bad arguments.
"""


def _charge(text: str) -> tuple[str, float]:
    from ase.data import chemical_symbols

    el, sep, value = text.partition("=")
    try:
        if not sep or el not in chemical_symbols[1:]:
            raise ValueError
        return el, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ELEMENT=CHARGE (e.g. Li=1), got {text!r}") from None


def _element(text: str) -> str:
    from ase.data import chemical_symbols

    if text not in chemical_symbols[1:]:
        raise argparse.ArgumentTypeError(f"not an element symbol: {text!r}")
    return text


def add_analyse_parser(sub) -> None:
    """Register ``md analyse`` on the ``md`` sub-parsers ``sub``."""
    a = sub.add_parser("analyse", help="RDF, MSD, diffusion coefficients, conductivity and Haven ratio",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("trajectories", nargs="+", help="HDF5 trajectory files written by md run / run_md")
    a.add_argument("--system", type=int, nargs="+", default=None, help="input indices to analyse (default: all)")
    a.add_argument("--species", type=_element, nargs="+", default=[],
                   help="mobile species: conductivity, collective D and Haven ratio (D is given for every species)")
    a.add_argument("--discard-fs", type=nonnegative_float, default=0.0, help="equilibration dropped, fs (default 0)")
    a.add_argument("--fit-fraction", type=float, nargs=2, default=(0.1, 0.5), metavar=("START", "END"),
                   help="fit window as fractions of the analysed span (default 0.1 0.5)")
    a.add_argument("--fit-window-fs", type=nonnegative_float, nargs=2, default=None, metavar=("START", "END"),
                   help="fit window as lag times, fs (overrides --fit-fraction)")
    a.add_argument("--drift", choices=("com", "framework", "none"), default="com",
                   help="drift removed: centre of mass (default), mean of the non-mobile atoms, or none")
    a.add_argument("--r2-min", type=float, default=0.5, help="D not determined below this R^2 (default 0.5)")
    a.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    a.add_argument("--charges", type=_charge, nargs="+", default=[], metavar="EL=Q",
                   help="charges for Nernst-Einstein (default: pymatgen's oxidation-state guess)")
    a.add_argument("--max-frames", type=positive_int, default=2000,
                   help="frames kept for the MSD (a stride keeps memory bounded; default 2000)")
    a.add_argument("--rdf-frames", type=positive_int, default=200, help="frames sampled for the RDF (default 200)")
    a.add_argument("--rdf-bin-width", type=positive_float, default=0.05, help="Å (default 0.05)")
    a.add_argument("--json", default=None, help="write every number (RDF, MSD, D, intervals) to this file")
    add_device_argument(a)
    a.set_defaults(func=analyse_command)


def _fmt_ci(ci, spec=".3e") -> str:
    return "–" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _analyse_system(path: str, system: int, settings, args, device: str) -> dict:
    from geodite_sim.analysis import sample_frames
    from geodite_sim.analysis.transport import analyse_transport

    tr = analyse_transport(path, system, settings, device=device)
    rdf = sample_frames(path, system, settings.discard_fs, args.rdf_frames).rdf(bin_width=args.rdf_bin_width,
                                                                                 device=device)
    return {"system": system, "transport": tr.to_dict(), "rdf": rdf.to_dict(),
            "msd": {"t_fs": tr.t_fs, "msd": tr.msd}}


def _print_system(label: str, d: dict) -> None:
    import numpy as np

    t = d["transport"]
    print(f"{label}: {t['n_frames']} frames (stride {t['stride']}, {t['frame_interval_fs']:g} fs apart, "
          f"span {t['span_fs'] / 1000:g} ps), T = {t['temperature_K'] or float('nan'):g} K")
    conf = 100 * next(iter(t["tracer"].values()))["confidence"]
    print(f"  {'species':8s} {'atoms':>5s}  {'D (cm²/s)':>10s}  {f'{conf:g} % interval':26s} {'R²':>5s}  window (ps)")
    for sp, x in t["tracer"].items():
        window = f"{x['window_fs'][0] / 1000:g}–{x['window_fs'][1] / 1000:g}"
        if x["D_cm2_per_s"] is None:
            print(f"  {sp:8s} {x['n_atoms']:5d}  not determined: {x['reason']}  (window {window} ps)")
        else:
            print(f"  {sp:8s} {x['n_atoms']:5d}  {x['D_cm2_per_s']:10.3e}  {_fmt_ci(x['ci_cm2_per_s']):26s} "
                  f"{x['r2']:5.2f}  {window}")
    for sp, c in t["conductivity"].items():
        if c["sigma_mS_per_cm"] is None:
            print(f"  {sp} conductivity (Nernst–Einstein): not determined: {c['reason']}")
        else:
            print(f"  {sp} conductivity (Nernst–Einstein, z = {c['charge']:+g}): {c['sigma_mS_per_cm']:.3g} mS/cm "
                  f"{_fmt_ci(c['ci_mS_per_cm'], '.3g')}")
    for sp, h in t["charge"].items():
        if h["haven_ratio"] is None:
            print(f"  {sp} Haven ratio: not determined: {h['reason']}")
        else:
            print(f"  {sp} Haven ratio: {h['haven_ratio']:.2f} {_fmt_ci(h['haven_ci'], '.2f')} "
                  f"(collective D {h['D_sigma_cm2_per_s']:.3e} cm²/s, {h['n_blocks']} blocks)")
    peaks = []
    edges = np.asarray(d["rdf"]["edges"])
    centres = 0.5 * (edges[1:] + edges[:-1])
    for pair, g in d["rdf"]["g"].items():
        g = np.asarray(g)
        if g.max() > 0:
            peaks.append(f"{pair} {centres[int(g.argmax())]:.2f} Å")
    print(f"  RDF ({d['rdf']['n_frames']} frames): highest peak " + (", ".join(peaks) or "none in range"))


def analyse_command(args) -> int:
    from geodite_sim.analysis.transport import TransportSettings

    parser = args._leaf_parser
    try:
        settings = TransportSettings(mobile=tuple(args.species), discard_fs=args.discard_fs,
                                     fit_fraction=tuple(args.fit_fraction),
                                     fit_window_fs=tuple(args.fit_window_fs) if args.fit_window_fs else None,
                                     drift=args.drift, r2_min=args.r2_min, confidence=args.confidence,
                                     max_frames=args.max_frames, charges=dict(args.charges) or None)
    except ValueError as exc:
        parser.error(str(exc))
    device = resolve_device(args.device)
    from geodite_sim.trajectory import trajectory_systems

    systems_out: list[dict] = []
    report, n_bad = {"settings": {k: v for k, v in vars(settings).items()}, "systems": systems_out}, 0
    for path in args.trajectories:
        try:
            systems = [d["index"] for d in trajectory_systems(path)]
        except Exception as exc:  # noqa: BLE001 - reported per input
            print(f"{path}: failed: {type(exc).__name__}: {exc}")
            systems_out.append({"file": path, "error": f"{type(exc).__name__}: {exc}"})
            n_bad += 1
            continue
        for system in (args.system if args.system is not None else systems):
            label = f"{path}#{system}"
            try:
                if system not in systems:
                    raise KeyError(f"system {system} not in {path} (systems: {systems})")
                d = _analyse_system(path, system, settings, args, device)
            except (ValueError, KeyError, OSError) as exc:
                print(f"{label}: failed: {exc}")
                systems_out.append({"file": path, "system": system, "error": str(exc)})
                n_bad += 1
                continue
            _print_system(label, d)
            systems_out.append({"file": path, **d})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    n = len(report["systems"])
    print(f"{n} system(s): {n - n_bad} analysed, {n_bad} failed")
    return 1 if n_bad else 0
