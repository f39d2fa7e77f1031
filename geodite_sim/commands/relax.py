"""``geodite-sim relax INPUT... --out DIR``: relax structures in batches, resumable.

Every input file is read frame by frame (anything ASE reads: CIF, POSCAR, extxyz, …;
directories are expanded to their files). Each frame is keyed ``<real path>@<frame>``.
Results go to ``DIR`` as they arrive:

- ``relaxed.extxyz``: relaxed structures (energy, forces, stress and the key in the frame's info),
  appended and fsync'ed; failed structures are not written;
- ``results.jsonl``: one JSON record per finished input, written (and fsync'ed) after its structure,
  holding the byte offset where ``relaxed.extxyz`` ended after it;
- ``results.csv`` and ``results.json``: the table, rebuilt from ``results.jsonl`` at the end of
  every run (``--rebuild-table`` rebuilds it alone).

Running again with the same ``--out`` resumes: inputs whose key has a record are skipped, and
``relaxed.extxyz`` is cut back to the last recorded offset (dropping a structure written by a
killed run before its record), so a killed job loses at most the systems in flight.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

EXAMPLES = """examples:
  geodite-sim relax examples/structures/* --out out/demo
  geodite-sim relax big.extxyz --out out/big --fmax 0.02 --max-steps 1000 --dtype float64
  geodite-sim relax structures/ --out out/fixed --no-cell --model Geodite-MP.ckpt --device cuda
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
        help="relax structures (batched FIRE, with the cell), resumable",
        description="Relax structures with batched FIRE (+ Fréchet cell filter) and write relaxed.extxyz "
                    "and a results table (CSV + JSON) to --out. Re-running with the same --out resumes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="structure files or directories (anything ASE reads)")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--fmax", type=float, default=0.05, help="force convergence threshold, eV/Å (default 0.05)")
    p.add_argument("--max-steps", type=int, default=500, help="FIRE steps per structure at most (default 500)")
    p.add_argument("--no-cell", action="store_true", help="keep every cell fixed (default: relax the cell)")
    p.add_argument("--model", default=None, help="checkpoint path or packaged model name (default: packaged default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--max-atoms", type=int, default=None, help="atoms per batch (default: estimated)")
    p.add_argument("--per-structure", action="store_true", help="also write one extxyz per structure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--rebuild-table", action="store_true", help="only rebuild results.csv/json from results.jsonl")
    p.add_argument("--table-rows", type=int, default=100, help="rows of the table printed at the end (default 100)")
    p.set_defaults(func=run)


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


def iter_frames(files: list[str]) -> Iterator[tuple[str, str, int, object]]:
    """(key, path, frame, structure) for every frame of every file, lazily.

    A file that cannot be read yields its path as the structure (``relax_many`` reports why).
    """
    from ase.io import iread

    for path in files:
        real = os.path.realpath(path)
        frame = 0
        try:
            for atoms in iread(path, index=":"):
                yield f"{real}@{frame}", path, frame, atoms
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


# ---------------------------------------------------------------------------------------------- output files
class ResultStore:
    """The output directory: incremental records + structures, resume bookkeeping and the table."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.records_path = self.out / "results.jsonl"
        self.xyz_path = self.out / "relaxed.extxyz"
        self.records = self._read_records()
        self.done = {r["key"] for r in self.records}
        self._repair_xyz()
        self._records_fd = open(self.records_path, "a", encoding="utf-8")
        self._xyz_fd = open(self.xyz_path, "a", encoding="utf-8")

    def _read_records(self) -> list[dict]:
        records = []
        if not self.records_path.exists():
            return records
        with open(self.records_path, encoding="utf-8") as f:
            lines = f.readlines()
        good_bytes = 0
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a record cut by a kill: everything after it is unreliable
            if not line.endswith("\n"):
                break
            records.append(rec)
            good_bytes += len(line.encode("utf-8"))
        if good_bytes != self.records_path.stat().st_size:
            with open(self.records_path, "r+b") as f:
                f.truncate(good_bytes)
        seen, unique = set(), []
        for rec in records:  # first record of a key wins (duplicates cannot arise, but be safe)
            if rec["key"] not in seen:
                seen.add(rec["key"])
                unique.append(rec)
        return unique

    def _repair_xyz(self) -> None:
        """Cut relaxed.extxyz back to the end of the last recorded structure."""
        end = max((r.get("xyz_end", 0) for r in self.records), default=0)
        if self.xyz_path.exists() and self.xyz_path.stat().st_size > end:
            with open(self.xyz_path, "r+b") as f:
                f.truncate(end)

    def add(self, record: dict, atoms=None, per_structure: bool = False) -> None:
        """Append a structure (if any) then its record, each flushed and fsync'ed."""
        from ase.io import write

        if atoms is not None:
            write(self._xyz_fd, atoms, format="extxyz")
            self._xyz_fd.flush()
            os.fsync(self._xyz_fd.fileno())
            if per_structure:
                sdir = self.out / "structures"
                sdir.mkdir(exist_ok=True)
                write(sdir / f"{record['input']:06d}_{record['formula']}.extxyz", atoms, format="extxyz")
        self._xyz_fd.flush()
        record["xyz_end"] = os.fstat(self._xyz_fd.fileno()).st_size
        self._records_fd.write(json.dumps(record) + "\n")
        self._records_fd.flush()
        os.fsync(self._records_fd.fileno())
        self.records.append(record)
        self.done.add(record["key"])

    def close(self) -> None:
        self._records_fd.close()
        self._xyz_fd.close()

    def write_table(self) -> list[dict]:
        """Rebuild results.csv and results.json from the records (sorted by input order)."""
        rows = sorted(self.records, key=lambda r: (r.get("input", 0), r["key"]))
        with open(self.out / "results.json", "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
        with open(self.out / "results.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        return rows


def make_record(result, key: str, path: str, frame: int, ordinal: int) -> tuple[dict, object]:
    """The JSON record of a result and the Atoms to write (None for failures)."""
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

    record = {
        "input": ordinal, "key": key, "label": path if frame == 0 else f"{path}@{frame}", "path": path,
        "frame": frame, "formula": formula, "n_atoms": n_atoms, "status": result.status,
        "converged": bool(result.converged), "n_steps": int(result.n_steps), "energy": num(result.energy),
        "energy_per_atom": num(result.energy_per_atom), "fmax": num(result.fmax), "pressure_gpa": num(pressure),
        "volume": volume, "relax_cell": bool(result.relax_cell), "error": result.error,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if atoms is not None and not result.failed:
        atoms = atoms.copy()
        atoms.calc = result.structure.calc
        atoms.info.update(key=key, converged=bool(result.converged), n_steps=int(result.n_steps),
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
    counts = {"converged": 0, "not_converged": 0, "failed": 0}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return (f"{len(rows)} structures: {counts['converged']} converged, {counts['not_converged']} not converged, "
            f"{counts['failed']} failed")


# ---------------------------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    store = ResultStore(args.out)
    if args.rebuild_table:
        rows = store.write_table()
        store.close()
        print(format_table(rows, args.table_rows))
        print(summarize(rows))
        return 0
    if not args.inputs:
        print("error: no INPUT given", file=sys.stderr)
        return 2

    import torch

    import geodite_sim as gs

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = gs.load_model(args.model, device=device, dtype=getattr(torch, args.dtype))
    files = expand_inputs(args.inputs)
    pending: dict[int, tuple[str, str, int, int]] = {}  # stream position -> (key, path, frame, input ordinal)
    skipped = 0

    def stream():
        nonlocal skipped
        position = 0
        for ordinal, (key, path, frame, structure) in enumerate(iter_frames(files)):
            if key in store.done:
                skipped += 1
                continue
            pending[position] = (key, path, frame, ordinal)
            position += 1
            yield structure

    t0 = time.perf_counter()
    n_new = 0
    try:
        for result in gs.relax_many(stream(), model, fmax=args.fmax, max_steps=args.max_steps,
                                    relax_cell=not args.no_cell, max_atoms=args.max_atoms, stream=True,
                                    progress=not args.no_progress):
            key, path, frame, ordinal = pending.pop(result.index)
            record, atoms = make_record(result, key, path, frame, ordinal)
            store.add(record, atoms, per_structure=args.per_structure)
            n_new += 1
    finally:
        store.close()
        rows = store.write_table()
    elapsed = time.perf_counter() - t0
    print(format_table(rows, args.table_rows))
    print(f"relaxed {n_new} new structure(s) in {elapsed:.1f} s" + (f", skipped {skipped} already done" if skipped else ""))
    print(summarize(rows))
    print(f"results: {store.out / 'results.csv'}, {store.out / 'results.json'}, structures: {store.xyz_path}")
    return 0
