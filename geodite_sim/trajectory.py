"""HDF5 trajectories of batched MD: one group per system, appendable, readable back into ASE Atoms.

Layout (h5py)::

    /                      attrs: format, model_name, model_checksum, dtype, ensemble, timestep_fs,
                                  tdamp_fs, chain_length, tloop, friction_per_fs, fix_com, seed,
                                  frame_every, skin, versions (JSON), ...
    /systems/<index>/      one group per input structure (index = position in the input stream)
        positions      [T, N, 3]  Å (float64 for float64 runs, float32 otherwise)
        cell           [T, 3, 3]  Å, rows = lattice vectors
        energy         [T]        potential energy, eV
        kinetic_energy [T]        eV
        temperature    [T]        2 KE / (N_dof k_B), K (N_dof = 3N minus what constraints remove)
        conserved      [T]        NHC conserved quantity, or total energy (NVE, Langevin), eV
        step           [T]        int64 step of the frame (0 = initial structure)
        momenta        [T, N, 3]  amu·Å/t (ASE units), only when requested
        numbers [N], masses [N] (amu), pbc [3]
        attrs: index, label, formula, n_atoms, temperature_K, target_steps, seed, status
               ("running" | "done" | "failed"), error, n_steps

Per-frame datasets are chunked along T and stored uncompressed. Frames are buffered per system and
written in blocks; the file is flushed after every block, so a killed run leaves a readable file. On
restart, datasets are truncated back to the frame counts recorded in the checkpoint and then appended to.

Why uncompressed: an uncompressed chunk has a fixed size, so HDF5 writes it in place and a partly filled
chunk that is completed later keeps the same bytes for the frames it already held. A compressed chunk
changes size when frames are appended, so HDF5 frees it and writes it elsewhere — possibly over the space
just freed; a SIGKILL between the two leaves the index pointing at half-written bytes ("filter returned
failure during read") and frames that a checkpoint counted are lost. gzip saved only ~20 % on MD
positions (float32 noise in the low bits). ``compression="gzip"`` remains available for runs that are
never interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms

FORMAT = "geodite_sim.md_trajectory/1"
_SCALARS = ("energy", "kinetic_energy", "temperature", "conserved")


def _attr(value):
    """An HDF5-storable attribute value (None -> "", dict/list -> JSON)."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value


class TrajectoryWriter:
    """Appends frames of many systems to one HDF5 file.

    Args:
        path: output file.
        attrs: run metadata stored as root attributes.
        restart_frames: ``{index: frames}`` to keep from an existing file (restart); None starts a new file.
        float_dtype: dtype of positions/momenta/cell datasets.
        block: frames buffered per system before they are written.
        save_momenta: also store momenta.
        compression: None (default: kill-safe, see the module docstring) or an h5py filter such as "gzip".
        compression_opts: the filter's level.
    """

    def __init__(self, path: str | Path, attrs: dict, restart_frames: dict[int, int] | None = None,
                 float_dtype=np.float32, block: int = 64, save_momenta: bool = False,
                 compression: str | None = None, compression_opts: int = 4):
        import h5py

        self.path = str(path)
        self.float_dtype = np.dtype(float_dtype)
        self.block = int(block)
        self.save_momenta = save_momenta
        self._comp = (dict(compression=compression, compression_opts=compression_opts, shuffle=True)
                      if compression else {})
        self._buffers: dict[int, list[dict]] = {}
        self._written: dict[int, int] = {}
        if restart_frames is None:
            self.file = h5py.File(self.path, "w")
            self.file.attrs["format"] = FORMAT
            for k, v in attrs.items():
                self.file.attrs[k] = _attr(v)
            self.file.create_group("systems")
        else:
            self.file = h5py.File(self.path, "a")
            systems = self.file.require_group("systems")
            for name in list(systems.keys()):
                index = int(name)
                if index not in restart_frames:
                    del systems[name]  # started after the checkpoint: it will be started again
                    continue
                g = systems[name]
                n = int(restart_frames[index])
                for _key, ds in g.items():
                    if ds.maxshape and ds.maxshape[0] is None:
                        ds.resize(n, axis=0)
                self._written[index] = n
            self.file.flush()

    # ------------------------------------------------------------------ systems
    def group_name(self, index: int) -> str:
        return f"/systems/{index}"

    def add_system(self, index: int, numbers: np.ndarray, masses: np.ndarray, pbc: np.ndarray, attrs: dict) -> None:
        """Create (or, on restart, re-open) the group of system ``index``."""
        systems = self.file["systems"]
        name = str(index)
        n = len(numbers)
        if name in systems:
            g = systems[name]
        else:
            g = systems.create_group(name)
            g.create_dataset("numbers", data=np.asarray(numbers, dtype=np.int32))
            g.create_dataset("masses", data=np.asarray(masses, dtype=np.float64))
            g.create_dataset("pbc", data=np.asarray(pbc, dtype=bool))
            chunk = max(1, min(self.block, (1 << 20) // max(1, 24 * n)))
            g.create_dataset("positions", shape=(0, n, 3), maxshape=(None, n, 3), dtype=self.float_dtype,
                             chunks=(chunk, n, 3), **self._comp)
            if self.save_momenta:
                g.create_dataset("momenta", shape=(0, n, 3), maxshape=(None, n, 3), dtype=self.float_dtype,
                                 chunks=(chunk, n, 3), **self._comp)
            g.create_dataset("cell", shape=(0, 3, 3), maxshape=(None, 3, 3), dtype=self.float_dtype,
                             chunks=(64, 3, 3), **self._comp)
            for key in _SCALARS:
                g.create_dataset(key, shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(256,), **self._comp)
            g.create_dataset("step", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(256,), **self._comp)
        for k, v in attrs.items():
            g.attrs[k] = _attr(v)
        g.attrs["status"] = "running"
        g.attrs["error"] = ""
        self._written.setdefault(index, 0)

    def set_attrs(self, index: int, **attrs) -> None:
        g = self.file["systems"][str(index)]
        for k, v in attrs.items():
            g.attrs[k] = _attr(v)

    # ------------------------------------------------------------------ frames
    def add_frame(self, index: int, frame: dict) -> None:
        """Buffer one frame: positions [N,3], cell [3,3], energy, kinetic_energy, temperature, conserved, step
        (and momenta [N,3] when stored). Writes the system's block when it is full."""
        buf = self._buffers.setdefault(index, [])
        buf.append(frame)
        if len(buf) >= self.block:
            self.flush([index])

    def _write(self, index: int) -> None:
        buf = self._buffers.pop(index, None)
        if not buf:
            return
        g = self.file["systems"][str(index)]
        n0 = self._written[index]
        k = len(buf)
        keys = ["positions", "cell", "step", *_SCALARS] + (["momenta"] if self.save_momenta else [])
        for key in keys:
            ds = g[key]
            ds.resize(n0 + k, axis=0)
            ds[n0:n0 + k] = np.stack([np.asarray(f[key]) for f in buf]).astype(ds.dtype, copy=False)
        self._written[index] = n0 + k

    def flush(self, indices: Sequence[int] | None = None) -> None:
        """Write buffered frames (of ``indices``, default all) and flush the file."""
        for index in list(self._buffers) if indices is None else indices:
            self._write(index)
        self.file.flush()

    def frames(self, index: int) -> int:
        """Frames of system ``index`` written to the file (buffered ones not counted)."""
        return self._written.get(index, 0)

    def written(self) -> dict[int, int]:
        return dict(self._written)

    def close(self) -> None:
        if self.file.id.valid:
            self.flush()
            self.file.close()


# ---------------------------------------------------------------------------------------------- reading
def read_metadata(path: str | Path) -> dict:
    """Root attributes of a trajectory file (JSON strings decoded where possible)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            out[k] = _decode(v)
    return out


def _decode(v):
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def trajectory_systems(path: str | Path) -> list[dict]:
    """One dict per system group: index, frames, ``last_step`` (step of its last stored frame, 0 without one),
    ``formula`` and the group's attributes, sorted by index."""
    import h5py

    out = []
    with h5py.File(path, "r") as f:
        for name, g in f["systems"].items():
            d = {k: _decode(v) for k, v in g.attrs.items()}
            d["index"] = int(name)
            d["frames"] = int(g["step"].shape[0])
            d["last_step"] = int(g["step"][-1]) if d["frames"] else 0
            if "numbers" in g:
                from ase.symbols import Symbols

                d["formula"] = Symbols(g["numbers"][()]).get_chemical_formula()
            out.append(d)
    return sorted(out, key=lambda d: d["index"])


def read_trajectory(path: str | Path, system: int | None = None, index: slice | int = slice(None)) -> list[Atoms]:
    """Frames of one system as ASE Atoms (positions, cell, pbc, masses, momenta when stored).

    ``system`` is the system's input index (may be omitted when the file holds one system);
    ``index`` selects frames. Each Atoms carries ``info`` (system, step, time_fs, temperature,
    kinetic_energy, conserved) and a single-point calculator with the potential energy.
    """
    import h5py
    from ase.calculators.singlepoint import SinglePointCalculator

    with h5py.File(path, "r") as f:
        g, system = system_group(f, system, path)
        dt_fs = float(f.attrs.get("timestep_fs", 0.0))
        n_frames = g["step"].shape[0]
        if isinstance(index, slice) and (index.step or 1) > 0:
            sel = slice(*index.indices(n_frames))

            def read(ds):
                return ds[sel]
        else:
            idx = np.atleast_1d(np.arange(n_frames)[index])

            def read(ds):
                return ds[()][idx]
        numbers = g["numbers"][()]
        masses = g["masses"][()]
        pbc = g["pbc"][()]
        data = {k: read(g[k]) for k in ("positions", "cell", "step", *_SCALARS)}
        momenta = read(g["momenta"]) if "momenta" in g else None
    frames = []
    for t in range(len(data["step"])):
        a = Atoms(numbers=numbers, positions=np.asarray(data["positions"][t], dtype=float),
                  cell=np.asarray(data["cell"][t], dtype=float), pbc=pbc, masses=masses)
        if momenta is not None:
            a.set_momenta(np.asarray(momenta[t], dtype=float))
        step = int(data["step"][t])
        a.info.update(system=int(system), step=step, time_fs=step * dt_fs,
                      temperature=float(data["temperature"][t]), kinetic_energy=float(data["kinetic_energy"][t]),
                      conserved=float(data["conserved"][t]))
        a.calc = SinglePointCalculator(a, energy=float(data["energy"][t]))
        frames.append(a)
    return frames


def read_series(path: str | Path, name: str, system: int | None = None) -> np.ndarray:
    """One per-frame dataset of one system (``temperature``, ``energy``, ``conserved``, ``step``, ``cell`` ...)
    as an array [T, ...] — without building an Atoms per frame (:func:`read_trajectory` does that)."""
    import h5py

    with h5py.File(path, "r") as f:
        g, system = system_group(f, system, path)
        if name not in g:
            raise KeyError(f"{path}: system {system} has no dataset {name!r} (has {sorted(g.keys())})")
        return g[name][()]


def export_extxyz(path: str | Path, out: str | Path, system: int | None = None) -> int:
    """Write the frames of ``system`` (default: every system, one after another) to an extxyz file.

    Returns the number of frames written.
    """
    from ase.io import write

    systems = [system] if system is not None else [d["index"] for d in trajectory_systems(path)]
    frames = []
    for s in systems:
        frames.extend(read_trajectory(path, system=s))
    write(str(out), frames, format="extxyz")
    return len(frames)


def system_group(f, system: int | None, path) -> tuple:
    """The ``/systems/<system>`` group of an open trajectory file and its index.

    ``system`` may be None when the file holds exactly one system. Raises with the available ids.
    """
    if "systems" not in f:
        raise ValueError(f"{path}: not a geodite_sim trajectory (no /systems group)")
    names = sorted(f["systems"].keys(), key=int)
    if system is None:
        if len(names) != 1:
            raise ValueError(f"{path} holds {len(names)} systems {names}: pass system=<index>")
        system = int(names[0])
    if str(system) not in f["systems"]:
        raise KeyError(f"system {system} not in {path} (systems: {names})")
    return f["systems"][str(system)], int(system)
