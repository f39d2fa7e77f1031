"""``geodite-sim md``: run batched MD (``md run``); inspect, export and analyse (``md analyse``) trajectories."""

from __future__ import annotations

import argparse
import json
import os
import sys

from geodite_sim.commands import (
    EXIT_HELP,
    RegistryNames,
    add_device_argument,
    exit_code,
    nonnegative_float,
    positive_float,
    positive_int,
    resolve_device,
)
from geodite_sim.commands.md_analyse import add_analyse_parser
from geodite_sim.md_presets import get_preset
from geodite_sim.settings import MDSettings
from geodite_sim.status import Status

EXAMPLES = """examples:
  geodite-sim md run CuI.extxyz --temperature 500 700 900 --steps 20000 --timestep 1.5 --trajectory run.h5
  geodite-sim md run a.cif b.cif --ensemble nve --temperature 300 --steps 1000 --trajectory nve.h5
  geodite-sim md run inputs/*.cif --temperature 600 --steps 700000 --trajectory sse.h5 \\
      --checkpoint-every 5000 --restart          # re-run the same command to continue after a crash
  geodite-sim md info run.h5
  geodite-sim md export run.h5 --format extxyz --system 2 -o system2.extxyz
  geodite-sim md analyse run.h5 --species Li --discard-fs 5000    # RDF, MSD, D per species, conductivity

md run prints one line per input structure (a missing or bad file gets its own failed line; the
others run). """ + EXIT_HELP + "\n"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("md", help="molecular dynamics (run, info, export, analyse)", epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="md_command", metavar="ACTION")

    r = sub.add_parser("run", help="run MD on many structures at once", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.set_defaults(subparser=r)
    r.add_argument("inputs", nargs="+", help="structure files (every frame of each file is one structure)")
    r.add_argument("--temperature", type=nonnegative_float, nargs="+", default=None,
                   help="K; one value for all, one per structure (in input order), or several for one structure "
                        "(a sweep: N values x 1 structure = N runs); required for NVT")
    r.add_argument("--steps", type=positive_int, required=True, help="steps per structure")
    r.add_argument("--timestep", type=positive_float, default=1.5, help="fs (default 1.5)")
    r.add_argument("--ensemble", choices=RegistryNames("md"), metavar="ENSEMBLE", default="nvt_nhc",
                   help="a registered MD ensemble (default nvt_nhc): %(choices)s (docs/md.md)")
    r.add_argument("--trajectory", default=None, help="HDF5 output file")
    r.add_argument("--frame-every", type=positive_int, default=10, help="steps between frames (default 10)")
    r.add_argument("--tdamp", type=positive_float, default=None, help="NHC damping time, fs (default 100 x timestep)")
    r.add_argument("--chain-length", type=positive_int, default=None,
                   help="thermostats per chain (default 10 for nvt_nhc, ASE's 3 for NPT)")
    r.add_argument("--pressure", type=float, nargs="+", default=None,
                   help="NPT target pressure, GPa (one value, or one per structure; default 0)")
    r.add_argument("--pdamp", type=positive_float, default=None, help="NPT barostat damping, fs (default 1000 x dt)")
    r.add_argument("--preset", default=None,
                   help="a named protocol (geodite_sim.md_presets: sse_nvt, sse_npt, ms25_npt, ms25_npt_iso); "
                        "sets ensemble, timestep, damping and chains "
                        "(over --ensemble/--timestep/--tdamp/--chain-length)")
    r.add_argument("--friction", type=nonnegative_float, default=0.01,
                   help="Langevin friction, 1/fs (default 0.01)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ensemble-param", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the chosen registry entry by its run_md keyword (JSON value, e.g. "
                        "barostat_chain_length=5 or pressure=[0.1,1.0]); repeat for several")
    r.add_argument("--model", default=None, help="checkpoint file or packaged model name (default: packaged model)")
    add_device_argument(r)
    r.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    r.add_argument("--max-atoms", type=positive_int, default=None,
                   help="atoms per packed batch (default: the engine's capacity policy for the model and device)")
    r.add_argument("--checkpoint", default=None, help="checkpoint file (default <trajectory>.ckpt)")
    r.add_argument("--checkpoint-every", type=positive_int, default=None, help="steps between checkpoints")
    r.add_argument("--restart", action="store_true", help="continue from the checkpoint if it exists")
    r.add_argument("--no-monitors", action="store_true", help="disable the stability monitors")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=run_command, interrupt_hint=_interrupt_hint)

    i = sub.add_parser("info", help="list the systems of a trajectory file")
    i.add_argument("trajectory")
    i.set_defaults(func=info_command)

    e = sub.add_parser("export", help="convert trajectory frames to another format")
    e.add_argument("trajectory")
    e.add_argument("--format", choices=("extxyz",), default="extxyz")
    e.add_argument("--system", type=int, default=None, help="input index of the system (default: all)")
    e.add_argument("-o", "--output", default=None, help="output file (default <trajectory>[.<system>].extxyz)")
    e.set_defaults(func=export_command)

    add_analyse_parser(sub)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _interrupt_hint(args) -> str:
    """What to do after Ctrl-C: resume from the checkpoint (written on Ctrl-C too) or, without one, nothing."""
    if args.checkpoint_every is None:
        kept = f" (frames so far are in {args.trajectory})" if args.trajectory else ""
        return f"this run had no checkpoint (--checkpoint-every N) and cannot be resumed{kept}"
    if args.restart:
        return "re-run the same command to resume from the checkpoint"
    return "re-run the same command with --restart to resume from the checkpoint"


def _frames(paths: list[str]):
    """Every frame of every file, lazily, labelled ``path`` / ``path@frame`` (the names messages and results
    carry); a file that cannot be read (or holds no frame) yields its path, so that the engine's admission
    reports it as this input's failure."""
    from ase.io import iread

    from geodite_sim.io.structures import Labeled

    for path in paths:
        frame = 0
        if os.path.isfile(path) and os.access(path, os.R_OK) and os.path.getsize(path) > 0:
            try:
                for atoms in iread(path, index=":"):
                    label = path if frame == 0 else f"{path}@{frame}"
                    frame += 1
                    yield Labeled(atoms, label)
            except Exception as exc:  # noqa: BLE001 - reported per input
                if frame:
                    print(f"warning: {path}: unreadable after frame {frame - 1} ({type(exc).__name__}: {exc})",
                          file=sys.stderr)
                    continue
        if frame == 0:
            yield path


def _key_value(text: str) -> tuple[str, object]:
    """argparse type of ``--ensemble-param``: ``KEY=VALUE``, the value read as JSON (else kept as text)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _ok(status) -> bool:
    try:
        return Status(status).ok
    except ValueError:
        return False


def run_command(args) -> int:
    from geodite_sim.runner.registry import get_integrator, names  # torch: not while the parsers are built

    parser = args.subparser
    extra = {}
    if args.preset is not None:
        try:
            preset = get_preset(args.preset)
        except ValueError as exc:
            parser.error(str(exc))
        kw = preset.run_md_kwargs()
        kw.pop("steps", None)  # the run length stays the user's (--steps)
        args.ensemble, args.timestep = kw.pop("ensemble"), kw.pop("timestep")
        args.tdamp, args.chain_length = kw.pop("tdamp"), kw.pop("chain_length")
        if args.pressure is None and "pressure" in kw:
            args.pressure = [kw.pop("pressure")]
        kw.pop("pressure", None)
        extra.update(kw)
    extra.update(dict(args.ensemble_param))
    entry = get_integrator(args.ensemble)
    if args.pressure is not None or args.pdamp is not None:
        if not entry.variable_cell:
            npt = ", ".join(n for n in names("md") if get_integrator(n).variable_cell)
            parser.error(f"--pressure/--pdamp need an NPT ensemble ({npt}), not {args.ensemble}")
        if args.pressure is not None:
            extra["pressure"] = args.pressure[0] if len(args.pressure) == 1 else args.pressure
        if args.pdamp is not None:
            extra["pdamp"] = args.pdamp
    if entry.needs_temperature and args.temperature is None:  # a thermostat (run_md's rule, from the registry)
        parser.error(f"--temperature is required for --ensemble {args.ensemble} (K; one value, or one per structure)")

    import torch

    from geodite_sim.io.runs import match_runs
    from geodite_sim.md import run_md_settings
    from geodite_sim.model import load_model

    temperature = args.temperature
    if temperature is not None and len(temperature) == 1:
        temperature = temperature[0]
    # every frame read first (the progress bar's total, systems x steps); per-run lists match the structures one to
    # one, or sweep one structure, else they are refused before anything runs
    try:
        structures, _ = match_runs(list(_frames(args.inputs)), {"temperature": temperature, **extra})
    except ValueError as exc:
        parser.error(str(exc))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    model = load_model(args.model, device=resolve_device(args.device), dtype=dtype)
    try:
        # from_kwargs: a preset's or --ensemble-param's keyword that is a settings field (e.g. the preset's tloop)
        # becomes that field, the others the entry's ensemble_params
        given = dict(
            ensemble=args.ensemble, temperature=temperature, timestep=args.timestep, steps=args.steps,
            trajectory=args.trajectory, frame_every=args.frame_every, tdamp=args.tdamp, chain_length=args.chain_length,
            friction=args.friction, seed=args.seed, max_atoms=args.max_atoms, monitors=not args.no_monitors,
            checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every, restart=args.restart)
        settings = MDSettings.from_kwargs(**{**given, **extra})
        results = run_md_settings(structures, model, settings, progress=not args.no_progress)
    except ValueError as exc:  # settings that do not fit the inputs (e.g. too few temperatures)
        parser.error(str(exc))
    statuses = []
    for r in results:
        status = getattr(r, "status", None) or ("done" if r.error is None else "failed")
        statuses.append(status)
        label = r.label
        temp = "" if r.temperature is None else f" T={r.temperature:.1f} K"
        detail = "" if r.error is None else f"\t{r.error}"
        print(f"{r.index}\t{label}\t{r.n_steps} steps{temp}\t{status}{detail}")
    n_bad = sum(not _ok(s) for s in statuses)
    print(f"{len(results)} input(s): {len(results) - n_bad} done, {n_bad} failed")
    return exit_code(statuses)


def info_command(args) -> int:
    from geodite_sim.trajectory import read_metadata, trajectory_systems

    meta = read_metadata(args.trajectory)
    print(f"{args.trajectory}: ensemble {meta.get('ensemble')}, timestep {meta.get('timestep_fs')} fs, "
          f"model {meta.get('model_name')} {meta.get('model_checksum')}")
    for d in trajectory_systems(args.trajectory):
        status, steps = d.get("status", ""), int(d.get("n_steps", 0) or 0)
        if status in ("running", "interrupted"):  # not finished: its last step, at least that of its last frame
            steps = max(steps, d["last_step"])
            if status == "running":
                status = "running (or killed)"
        name = " ".join(x for x in (d.get("label", ""), f"({d['formula']})" if d.get("formula") else "") if x)
        print(f"{d['index']}\t{name}\t{d['frames']} frames\t{steps} steps"
              f"\t{d.get('temperature_K', 0):.1f} K\t{status}\t{d.get('error', '')}")
    return 0


def export_command(args) -> int:
    from geodite_sim.trajectory import export_extxyz

    out = args.output
    if out is None:
        stem = args.trajectory.rsplit(".", 1)[0]
        out = f"{stem}.{args.system}.extxyz" if args.system is not None else f"{stem}.extxyz"
    n = export_extxyz(args.trajectory, out, system=args.system)
    print(f"wrote {n} frames to {out}", file=sys.stderr)
    return 0
