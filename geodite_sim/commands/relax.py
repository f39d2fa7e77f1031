"""``geodite-sim relax INPUT... --out DIR``: relax structures in batches, resumable.

Every input file is read frame by frame (anything ASE reads: CIF, POSCAR, extxyz, …;
directories are expanded to their files). Input ``i`` is the i-th frame over all files in
the order given (the same file given twice is two inputs). ``DIR`` is a
:class:`~geodite_sim.store.ResultStore` (``docs/store.md``); results go there as they arrive:

- ``relaxed.extxyz``: relaxed structures (energy, forces, stress, ``key`` and ``input`` in the
  frame's info), appended and fsync'ed; failed structures are not written;
- ``results.jsonl``: one :class:`RelaxRecord` per finished input (``kind = "relax"``, ``index`` =
  input position), written and fsync'ed after its structure, with the structure's byte span;
- ``store.json``: the settings (fmax, max steps, cell, dtype) and model fingerprint;
- ``results.csv`` and ``results.json``: the table, rebuilt from the records when a run added any
  (``--rebuild-table`` rebuilds it alone).

Running again with the same ``--out`` resumes: stored input positions are skipped (a finished job
is a no-op that rewrites nothing); other settings or another model are refused, and so are other
inputs at a stored position. A killed job loses at most the systems in flight. ``--ray`` runs the
batches on a Ray cluster (``docs/ray.md``); the results land in the same store.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import geodite_sim as gs
from geodite_sim.commands import RegistryNames, exit_code
from geodite_sim.interrupt import RESUME_HINT
from geodite_sim.settings import RelaxSettings
from geodite_sim.store import ResultStore, StoreError, write_atomic

EXAMPLES = """examples:
  geodite-sim relax examples/structures/* --out out/demo
  geodite-sim relax big.extxyz --out out/big --fmax 0.02 --max-steps 1000 --dtype float64
  geodite-sim relax structures/ --out out/fixed --no-cell --model Geodite-MP.ckpt --device cuda
  geodite-sim relax structures/ --out out/lbfgs --optimizer lbfgs   # ~half the force calls of FIRE (docs/optimizers.md)
  geodite-sim relax structures/ --out out/fixed            # again: resumes, skips finished inputs
"""

#: Columns of results.csv, in order.
COLUMNS = [
    "input", "key", "label", "formula", "n_atoms", "status", "converged", "n_steps", "energy",
    "energy_per_atom", "fmax", "pressure_gpa", "volume", "relax_cell", "error",
]
EV_PER_A3_TO_GPA = 160.21766208


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relax",
        help="relax structures (batched FIRE, L-BFGS or BFGS, with the cell), resumable",
        description="Relax structures with batched FIRE, L-BFGS or BFGS (+ Fréchet cell filter) and write "
                    "relaxed.extxyz and a results table (CSV + JSON) to --out. Re-running with the same --out resumes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="structure files or directories (anything ASE reads)")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence threshold, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="optimiser steps per structure at most (default 500)")
    p.add_argument("--optimizer", choices=RegistryNames("optimizer"), metavar="OPTIMIZER", default="fire",
                   help="%(choices)s: ASE's FIRE (default), LBFGS or BFGS, with the Fréchet cell filter "
                        "(docs/optimizers.md)")
    p.add_argument("--no-cell", action="store_true", help="keep every cell fixed (default: relax the cell)")
    p.add_argument("--model", default=None, help="checkpoint path or packaged model name (default: packaged default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-atoms", type=int, default=None, help="atoms per batch (default: estimated)")
    p.add_argument("--per-structure", action="store_true", help="also write one extxyz per structure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rebuild-table", action="store_true", help="only rebuild results.csv/json from results.jsonl")
    p.add_argument("--table-rows", type=int, default=100, help="rows of the table printed at the end (default 100)")
    from geodite_sim.executors import add_executor_arguments

    add_executor_arguments(p)
    p.set_defaults(func=run, interrupt_hint=RESUME_HINT)


# ---------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: list[str]) -> list[str]:
    """Files named by ``inputs``: directories expanded (sorted), unexpanded globs expanded."""
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            files.extend(sorted(str(p) for p in Path(item).iterdir() if p.is_file() and not p.name.startswith(".")))
        elif not os.path.exists(item) and glob.has_magic(item):
            files.extend(sorted(glob.glob(item)))
        else:
            files.append(item)
    return files


def count_frames(files: list[str]) -> int:
    """Frames over all files (an unreadable file counts one: it is one failed input), for the progress bar's total
    (reading is ~3 ms a file, a small fraction of relaxing)."""
    from ase.io import iread

    n = 0
    for path in files:
        k = 0
        try:
            for _ in iread(path, index=":"):
                k += 1
        except Exception:  # noqa: BLE001 - counted as one input, reported when it is relaxed
            pass
        n += max(k, 1)
    return n


def iter_frames(files: list[str]) -> Iterator[tuple[str, str, int, object]]:
    """(key, path, frame, structure) for every frame of every file, lazily.

    A file that cannot be read yields its path as the structure (``relax_many`` reports why); frames come
    :class:`~geodite_sim.io.structures.Labeled` with their file name (``path``, ``path@frame``), so messages name it.
    """
    from ase.io import iread

    from geodite_sim.io.structures import Labeled

    for path in files:
        real = os.path.realpath(path)
        frame = 0
        try:
            for atoms in iread(path, index=":"):
                yield f"{real}@{frame}", path, frame, Labeled(atoms, path if frame == 0 else f"{path}@{frame}")
                frame += 1
        except Exception:
            if frame == 0:
                yield f"{real}@0", path, 0, path
            else:
                logging.getLogger(__name__).warning("%s: unreadable after frame %d", path, frame - 1)
                yield f"{real}@{frame}", path, frame, path
            continue
        if frame == 0:  # an empty file
            yield f"{real}@0", path, 0, path


# ---------------------------------------------------------------------------------------------- records
@dataclass
class RelaxRecord:
    """One finished input of ``geodite-sim relax`` (a line of results.jsonl; energies eV, fmax eV/Å, GPa, Å³).

    ``index`` is the input position (over all frames of all files, in order); ``key`` is
    ``<real path>@<frame>`` and is checked on resume (the inputs must be the same at every stored position).
    """

    index: int
    key: str
    label: str
    path: str
    frame: int
    formula: str
    n_atoms: int | None
    status: str
    converged: bool
    n_steps: int
    energy: float | None
    energy_per_atom: float | None
    fmax: float | None
    pressure_gpa: float | None
    volume: float | None
    relax_cell: bool
    error: str | None
    time: str = ""

    def row(self) -> dict:
        """The table row (``input`` = index)."""
        return {"input": self.index, **asdict(self)}


#: Store file names of the relax command (kept from the earlier layout).
RECORDS, STRUCTURES = "results.jsonl", "relaxed.extxyz"


def open_store(out: str | os.PathLike, settings: dict | None = None, model=None,
               readonly: bool = False) -> ResultStore[RelaxRecord]:
    """The ``--out`` folder as a :class:`~geodite_sim.store.ResultStore` of :class:`RelaxRecord`."""
    if readonly:
        return ResultStore.open_readonly(out, RelaxRecord, records_name=RECORDS, structures_name=STRUCTURES)
    return ResultStore(out, RelaxRecord, settings, model, records_name=RECORDS, structures_name=STRUCTURES,
                       job="relax")


def write_table(store: ResultStore[RelaxRecord]) -> list[dict]:
    """Rebuild results.csv and results.json from the records (input order), each written atomically."""
    rows = [r.row() for r in store.records("relax")]
    out = store.directory
    _write_atomic(out / "results.json", json.dumps(rows, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    _write_atomic(out / "results.csv", buf.getvalue())
    return rows


def _write_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def make_record(result, key: str, path: str, frame: int, ordinal: int) -> tuple[RelaxRecord, object]:
    """The record of a result and the Atoms to store (None for failures)."""
    import numpy as np
    from ase import Atoms

    atoms = result.structure if isinstance(result.structure, Atoms) else None
    n_atoms = len(atoms) if atoms is not None else None
    formula = atoms.get_chemical_formula() if atoms is not None else ""
    pressure = volume = None
    if result.stress is not None:
        pressure = float(-np.trace(result.stress) / 3 * EV_PER_A3_TO_GPA)
    if atoms is not None and atoms.pbc.all():
        volume = float(atoms.get_volume())

    def num(x):
        return None if x is None or not np.isfinite(x) else float(x)

    record = RelaxRecord(
        index=ordinal, key=key, label=path if frame == 0 else f"{path}@{frame}", path=path, frame=frame,
        formula=formula, n_atoms=n_atoms, status=str(getattr(result.status, "value", result.status)),
        converged=bool(result.converged),
        n_steps=int(result.n_steps), energy=num(result.energy), energy_per_atom=num(result.energy_per_atom),
        fmax=num(result.fmax), pressure_gpa=num(pressure), volume=volume, relax_cell=bool(result.relax_cell),
        error=result.error, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if atoms is not None and not result.failed:
        atoms = atoms.copy()
        atoms.calc = result.structure.calc
        atoms.info.update(key=key, input=ordinal, converged=bool(result.converged), n_steps=int(result.n_steps),
                          fmax=float(result.fmax))
        return record, atoms
    return record, None


def format_table(rows: list[dict], max_rows: int) -> str:
    head = f"{'#':>5s}  {'structure':34s} {'formula':12s} {'atoms':>5s} {'E/atom (eV)':>12s} {'fmax':>8s} " \
           f"{'steps':>5s}  status"
    lines = [head, "-" * len(head)]
    for r in rows[:max_rows]:
        e = f"{r['energy_per_atom']:12.5f}" if r.get("energy_per_atom") is not None else f"{'-':>12s}"
        fm = f"{r['fmax']:8.4f}" if r.get("fmax") is not None else f"{'-':>8s}"
        status = r["status"] if not r.get("error") else f"failed: {r['error']}"
        label = r["label"] if len(r["label"]) <= 34 else os.path.basename(r["label"])[-34:]
        lines.append(f"{r.get('input', 0):5d}  {label:34s} {r['formula'][:12]:12s} {r['n_atoms'] or 0:5d} {e} {fm} "
                     f"{r['n_steps']:5d}  {status}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more rows in results.csv")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    n_conv = sum(r["status"] == "converged" for r in rows)
    n_not = sum(r["status"] == "not_converged" for r in rows)
    return (f"{len(rows)} structures: {n_conv} converged, {n_not} not converged, "
            f"{len(rows) - n_conv - n_not} failed")


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    if args.rebuild_table:
        store = open_store(args.out, readonly=True)
        rows = write_table(store)
        print(format_table(rows, args.table_rows))
        print(summarize(rows))
        return 0
    if not args.inputs:
        print("error: no INPUT given", file=sys.stderr)
        return 2

    import torch

    from geodite_sim.executors import make_executor

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        executor = make_executor(args.ray, args.workers, shard_size=args.shard_size)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = gs.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))

    relax_settings = RelaxSettings(fmax=args.fmax, max_steps=args.max_steps, optimizer=args.optimizer,
                                   relax_cell=not args.no_cell, max_atoms=args.max_atoms)
    # the store's fingerprint: the settings results depend on (non-default ones only beyond fmax, steps, cell, so
    # stores written before --optimizer existed resume) and the dtype
    settings = {**relax_settings.record(), "dtype": args.dtype}
    try:
        store = open_store(args.out, settings, model)
    except StoreError as exc:
        executor.shutdown()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = expand_inputs(args.inputs)
    n_inputs = count_frames(files)
    total = n_inputs - sum(1 for i in store.done("relax") if i < n_inputs)
    pending: dict[int, tuple[str, str, int, int]] = {}  # stream position -> (key, path, frame, input index)
    skipped = 0
    mismatch: list[str] = []

    def stream():
        nonlocal skipped
        position = 0
        for ordinal, (key, path, frame, structure) in enumerate(iter_frames(files)):
            done = store.get("relax", ordinal)
            if done is not None:
                if done.key != key:
                    mismatch.append(f"input {ordinal} is {key} but {args.out} holds {done.key} there")
                    return
                skipped += 1
                continue
            pending[position] = (key, path, frame, ordinal)
            position += 1
            yield structure

    t0 = time.perf_counter()
    n_new = 0
    try:
        for result in executor.relax_many(stream(), model, relax_settings, stream=True, progress=not args.no_progress,
                                          total=total):
            key, path, frame, ordinal = pending.pop(result.index)
            record, atoms = make_record(result, key, path, frame, ordinal)
            store.put(record, "relax", atoms)
            if atoms is not None and args.per_structure:
                from ase.io import write

                sdir = store.directory / "structures"
                sdir.mkdir(exist_ok=True)
                write(sdir / f"{ordinal:06d}_{record.formula}.extxyz", atoms, format="extxyz")
            n_new += 1
    finally:
        executor.shutdown()
        store.close()
        table_missing = not (store.directory / "results.json").exists()
        rows = write_table(store) if n_new or table_missing else [r.row() for r in store.records("relax")]
    if mismatch:
        print(f"error: the inputs differ from the stored job ({mismatch[0]}); use another --out", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - t0
    print(format_table(rows, args.table_rows))
    print(f"relaxed {n_new} new structure(s) in {elapsed:.1f} s"
          + (f", skipped {skipped} already done" if skipped else ""))
    print(summarize(rows))
    print(f"results: {store.directory / 'results.csv'}, {store.directory / 'results.json'}, "
          f"structures: {store.structures_path}")

    return exit_code(r["status"] for r in rows)  # 0: every input fine; 1: some failed (the others ran)
