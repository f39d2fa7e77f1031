"""MD checkpoints: everything a run needs to continue bit-for-bit, written atomically.

A checkpoint (``torch.save`` of plain containers and CPU tensors, loaded with
``weights_only=True``) holds:

- ``settings``: the run's integrator settings (checked on restart);
- ``iteration``: steps taken by the engine loop;
- ``state``: the packed integrator state — positions, cell, pbc, numbers, masses, momenta,
  energy and forces at the current positions, target kT, step counters, target steps,
  per-system seeds (the Langevin noise is counter-based, so (seed, step) *is* the RNG
  state), the Nosé–Hoover chains (η, p_η, Q) or the Langevin friction, the constraints;
- ``active``/``labels``: input indices of the systems in the batch, in slot order;
  ``next_index``: the first input not yet started (the queue position);
- ``results``: finished systems (final positions, momenta, forces, energy, error) and
  inputs that failed to load;
- ``frames``: frames of every system already in the trajectory file (the file is
  truncated back to these counts on restart).

The neighbour list is not stored: right after writing a checkpoint the uninterrupted run
rebuilds its runner from it exactly as a restart does (``Runner.restore``: the padded layout,
the edge lists at the configured skin, the Verlet policy's margins and grown skins all from
scratch; ``freed``, the atoms retired since the last admission, and the monitors' last check
come from the checkpoint), then checks before stepping, as a restart does. So both runs use
identical batches and edge lists (same order, hence the same floating-point sums, in float32
too).

Writes go to a temporary file in the same folder, are fsynced, then ``os.replace``d over
the previous checkpoint, so a run killed at any moment leaves either the old or the new
checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from geodite_sim.batch import Batch
from geodite_sim.dynamics.verlet import MDState
from geodite_sim.io.structures import InputItem
from geodite_sim.md_output import slot_item
from geodite_sim.monitors import temperature_limit_factor
from geodite_sim.state import PER

if TYPE_CHECKING:
    from geodite_sim.md_job import MDJob
    from geodite_sim.runner import Runner

FORMAT = "geodite_sim.md_checkpoint/1"


def _state_types() -> dict[str, type[MDState]]:
    """Every MD state class by name (MDState and its subclasses, including those of newly registered ensembles)."""
    out: dict[str, type[MDState]] = {}
    todo: list[type[MDState]] = [MDState]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo += cls.__subclasses__()
    return out


STATE_TYPES = _state_types()


def _state_type(name: str) -> type[MDState]:
    """The MD state class called ``name``. Every ensemble's module lives in :mod:`geodite_sim.dynamics`; a restart in
    a fresh process may need a state class nothing has imported yet (registry entries import their module lazily,
    e.g. Bussi's), so an unknown name imports that package's modules first."""
    types = _state_types()
    if name not in types:
        import importlib
        import pkgutil

        import geodite_sim.dynamics as dynamics

        for module in pkgutil.iter_modules(dynamics.__path__):
            importlib.import_module(f"{dynamics.__name__}.{module.name}")
        types = _state_types()
    if name not in types:
        raise ValueError(f"checkpoint state type {name!r} is not an MD state of geodite_sim.dynamics")
    return types[name]


def state_to_dict(state: MDState | None) -> dict | None:
    """Plain-container copy (CPU tensors) of an MD state."""
    if state is None:
        return None
    batch = {f.name: getattr(state.batch, f.name).detach().cpu().clone() for f in fields(state.batch)
             if isinstance(getattr(state.batch, f.name), torch.Tensor)}
    values = {}
    for f in fields(state):
        if f.name == "batch":
            continue
        v = getattr(state, f.name)
        values[f.name] = None if v is None else _packed_to_dict(v) if f.metadata.get(PER) == "packed" \
            else v.detach().cpu().clone()
    return {"type": type(state).__name__, "batch": batch, "fields": values}


def _packed_to_dict(value) -> dict:
    """A packed field (a dataclass of tensors and host flags, e.g. the constraints) as plain containers."""
    return {"packed": type(value).__name__,
            "fields": {f.name: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                       for f in fields(value) for v in [getattr(value, f.name)]}}


def _packed_from_dict(d: dict, device):
    from geodite_sim.dynamics.constraints import BatchConstraints

    kinds = {"BatchConstraints": BatchConstraints}
    values = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d["fields"].items()}
    return kinds[d["packed"]](**values)


def state_from_dict(d: dict | None, device: str | torch.device = "cpu") -> MDState | None:
    """Inverse of :func:`state_to_dict`, tensors moved to ``device``."""
    if d is None:
        return None
    cls = _state_type(d["type"])
    batch = Batch(**{k: v.to(device) for k, v in d["batch"].items()})
    batch.atom_count = int(batch.offsets[-1])
    values = {k: (None if v is None else _packed_from_dict(v, device) if isinstance(v, dict) else v.to(device))
              for k, v in d["fields"].items()}
    return cls(batch=batch, **values)


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically write ``payload`` (plain containers, tensors) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, **payload}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an MD checkpoint (format {payload.get('format')!r}, expected {FORMAT!r})")
    return payload


def check_compatible(saved: dict, current: dict, keys: tuple[str, ...], hint: str = "") -> None:
    """Raise ValueError naming every setting in ``keys`` that differs between ``saved`` and ``current``
    (``hint``: what to do instead, appended to the message)."""
    diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError("cannot restart: settings differ from the checkpointed run (" + "; ".join(diff) + ")"
                         + (f"; {hint}" if hint else ""))


#: Per-input targets a restart must also match, where the checkpoint records them (since 2026-12-08).
RUN_TARGET_KEYS = ("steps", "temperature_K")


def run_targets(steps, temperature) -> dict:
    """The checkpoint's record of the per-input targets (one value or one per input, as plain floats; other
    containers, e.g. a mapping by input index, by their text)."""

    def plain(v):
        if v is None:
            return None
        try:
            return np.asarray(v, dtype=float).tolist()
        except (TypeError, ValueError):
            return repr(v)

    return {"steps": plain(steps), "temperature_K": plain(temperature)}


def check_restart(saved: dict, current: dict, keys: tuple[str, ...]) -> None:
    """Refuse a restart whose settings ``keys`` differ from the checkpointed run's, or that asks for other step
    counts or temperatures (it would otherwise return a finished run's results as if they had run longer;
    checkpoints older than that record are not checked for them)."""
    check_compatible(saved, current, keys)
    check_compatible(saved, current, tuple(k for k in RUN_TARGET_KEYS if k in saved),
                     hint="a finished run is not extended: start a new run from its final structures "
                          "(MDResult.final, with momenta) or remove the checkpoint to start afresh")


class CountedItems:
    """Iterator over InputItems that remembers the index after the last one handed out (a checkpoint's queue
    position)."""

    def __init__(self, items: Iterator[InputItem], next_index: int = 0):
        self._items = items
        self.next_index = next_index

    def __iter__(self) -> CountedItems:
        return self

    def __next__(self) -> InputItem:
        item = next(self._items)
        self.next_index = item.index + 1
        return item


class MDCheckpoints:
    """The checkpoints of one MD job: file, period (engine steps), the next one due; writing and restoring."""

    def __init__(self, path: str | None, every: int | None):
        self.path, self.every = path, every
        self.next = every

    @property
    def enabled(self) -> bool:
        return self.path is not None and self.every is not None

    def due(self, iteration: int) -> bool:
        return self.enabled and self.next is not None and iteration >= self.next

    def advance(self, iteration: int) -> None:
        """The next checkpoint after one written at ``iteration``."""
        if self.every is None or self.next is None:
            return
        while self.next <= iteration:
            self.next += self.every

    @staticmethod
    def attrs(job: MDJob) -> dict:
        """The trajectory file's run attributes."""
        import ase
        import h5py

        from geodite_sim.version import __version__

        versions = {"geodite_sim": __version__, "torch": torch.__version__, "numpy": np.__version__,
                    "h5py": h5py.__version__, "ase": ase.__version__}
        return {**job.settings, "model_checksum": job.settings["model_fingerprint"], "versions": versions,
                "created_by": "geodite_sim.run_md", "time_unit": "fs",
                "conserved": job.integrator.conserved_label}

    def save(self, job: MDJob, runner: Runner, reload: bool = False) -> None:
        """Write the checkpoint; ``reload``: then rebuild the runner from it, as a restart does (so the run goes on
        exactly as a run restarted from this checkpoint would)."""
        if self.path is None:
            raise ValueError("this MD run has no checkpoint file")
        if job.writer is not None:
            job.writer.flush()
        active = runner.active_slots()
        state = runner.compact(active) if active else None
        saved = state_to_dict(state)
        pending = runner.pending
        if pending is not None:
            next_index = pending.index
        elif job.items is not None:
            next_index = job.items.next_index
        else:
            raise ValueError("the MD run has no input queue to checkpoint")
        items = [slot_item(runner, s) for s in active]
        payload = {
            "settings": job.settings, "iteration": runner.iteration, "state": saved,
            "freed": runner.freed, "last_monitor": job.last_monitor,
            "active": [it.index for it in items], "labels": [it.label for it in items],
            "next_index": next_index,
            "results": list(job.result_data.values()),
            "frames": [[k, v] for k, v in (job.writer.written().items() if job.writer else [])],
            "last_frame": [[k, v] for k, v in job.last_frame.items()],
            "t_limit": [[k, float(v)] for k, v in job.t_limit.items()],
        }
        save_checkpoint(self.path, payload)
        if reload and active:
            runner.restore(items, state_from_dict(saved, job.device), runner.freed)

    def restore(self, job: MDJob, runner: Runner, ckpt: dict, stream) -> None:
        """Continue ``job`` on ``runner`` from the loaded checkpoint ``ckpt`` (``stream``: the inputs from the
        start; the ones the checkpoint has started are skipped)."""
        next_index = int(ckpt["next_index"])
        seen: dict[int, InputItem] = {}
        for _ in range(next_index):
            try:
                item = next(stream)
            except StopIteration:
                raise ValueError(f"cannot restart: the checkpoint has started {next_index} inputs, "
                                 f"but only {len(seen)} were given") from None
            seen[item.index] = item
        active = []
        for index, label in zip(ckpt["active"], ckpt["labels"]):
            item = seen[index]
            if item.label != label or item.atoms is None:
                raise ValueError(f"cannot restart: input {index} is {item.label!r}, the checkpoint has {label!r}")
            active.append(item)
            job.t_limit[index] = temperature_limit_factor(job.monitors, len(item.atoms))
        for data in ckpt["results"]:
            job.result_data[data["index"]] = data
            job.results[data["index"]] = job.make_result(seen[data["index"]], data)
        job.last_frame = {int(k): int(v) for k, v in ckpt.get("last_frame", [])}
        job.t_limit.update({int(k): float(v) for k, v in ckpt.get("t_limit", [])})
        job.items = CountedItems(stream, next_index)
        runner.iteration = int(ckpt["iteration"])
        job.last_monitor = int(ckpt.get("last_monitor", -1))
        if ckpt["state"] is not None:
            runner.restore(active, state_from_dict(ckpt["state"], job.device), int(ckpt.get("freed", 0)))
        if self.every:
            self.next = (runner.iteration // self.every + 1) * self.every
