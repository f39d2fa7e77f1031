"""Solid-state-electrolyte MD campaign: materials × temperatures on one device, RDF overlap scores, diffusion, report.

    geodite-sim campaign workflows/sse/short.toml            # run (or resume), analyse, report
    geodite-sim campaign workflows/sse/short.toml --status   # what is done, what is left

    from geodite_sim.workflows.sse_campaign import run_campaign
    result = run_campaign("workflows/sse/full.toml")

A campaign spec (TOML, see ``docs/sse-campaign.md`` and ``workflows/sse/*.toml``) lists
materials (a structure file each) × temperatures, the MD settings (default: the Geodite paper's
protocol — Nosé–Hoover chain of 10, damping 100 × dt, dt = 1.5 fs, 700,000 steps, a frame every
10 steps) and the analysis settings (5 ps discarded, RDF bins of 0.05 Å, references discarding
30 ps). Every run goes into **one** :func:`geodite_sim.md.run_md` call, so all runs share the
device through its continuous batching, in one HDF5 file (``trajectories.h5``, group = run
index) with one checkpoint. Re-running the same spec resumes: run_md restarts bit-for-bit from
the checkpoint, runs already finished are left as they are. Progress and an ETA are printed
and written to ``progress.json`` while the MD runs. The analysis (per-run RDFs, overlap with
reference trajectories, MSD and diffusion coefficients) is cached in ``analysis.json``; the
report (``report.md``, ``report.html``, ``plots/*.png``) is written next to the HDF5 file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from geodite_sim.workflows import sse_transport
from geodite_sim.workflows.sse_transport import TRANSPORT_KEYS, run_transport, transport_settings

from geodite_sim.md_presets import get_preset
from geodite_sim.store import ResultStore, StoreMismatch

#: Names of the files a campaign writes into its output folder.
TRAJECTORY = "trajectories.h5"
MANIFEST = "campaign.json"
PROGRESS = "progress.json"
ANALYSIS = "analysis.json"

_CAMPAIGN_KEYS = {"name", "output", "model", "model_options", "dtype", "device", "seed"}
_MD_KEYS = {"ensemble", "timestep_fs", "steps", "chain_length", "tdamp_fs", "frame_every", "checkpoint_every",
            "max_atoms", "skin", "monitors", "preset"}
_ANALYSIS_KEYS = {"discard_fs", "rdf_bin_width", "rdf_stride", "msd_fit_fraction", "msd_fit_window_fs",
                  "reference_discard_fs", "device", "remove_com"} | TRANSPORT_KEYS
_MATERIAL_KEYS = {"name", "structure", "temperatures", "mobile", "references"}
_REFERENCE_KEYS = {"file", "discard_fs", "frame_interval_fs", "system", "stride"}


class SpecError(ValueError):
    """A campaign spec that cannot be run; the message says which entry and why."""


# ---------------------------------------------------------------------------------------------- spec
@dataclass
class MDSettings:
    """MD settings shared by every run (defaults: the paper's SSE protocol)."""

    ensemble: str = "nvt_nhc"
    timestep_fs: float = 1.5
    steps: int = 700_000
    chain_length: int = 10
    tdamp_fs: float | None = None  # None: 100 × timestep
    frame_every: int = 10
    checkpoint_every: int = 1000
    max_atoms: int = 0  # 0: every run in one batch
    skin: float = 0.5
    monitors: bool = True


@dataclass
class AnalysisSettings:
    """Analysis settings (changing them re-analyses; the MD is not touched)."""

    discard_fs: float = 5000.0
    rdf_bin_width: float = 0.05
    rdf_stride: int = 1
    msd_fit_fraction: tuple[float, float] = (0.1, 0.5)
    msd_fit_window_fs: tuple[float, float] | None = None
    reference_discard_fs: float = 30000.0
    remove_com: bool = True
    device: str | None = None  # None: the campaign's device
    # transport (geodite_sim.workflows.sse_transport): charges {"Li": 1, ...} (default: pymatgen's guess),
    # extrapolation temperature, R² below which D is "not determined", interval level, frames kept for the MSD
    charges: dict | None = None
    extrapolate_to_K: float = 300.0
    r2_min: float = 0.5
    confidence: float = 0.95
    msd_max_frames: int = 2000


@dataclass
class Reference:
    """A reference trajectory (extxyz, ASE .traj or geodite_sim HDF5) for one run."""

    file: Path
    discard_fs: float
    frame_interval_fs: float | None = None
    system: int | None = None
    stride: int = 1


@dataclass
class Run:
    """One MD run: a material at a temperature; ``index`` is its input index (HDF5 group)."""

    id: str
    index: int
    material: str
    structure: Path
    temperature: float
    mobile: str | None
    reference: Reference | None = None


@dataclass
class CampaignSpec:
    name: str
    output: Path
    model: str
    model_options: dict
    dtype: str
    device: str
    seed: int
    md: MDSettings
    analysis: AnalysisSettings
    runs: list[Run]
    source: Path | None = None

    @property
    def trajectory(self) -> Path:
        return self.output / TRAJECTORY

    @property
    def checkpoint(self) -> Path:
        return self.output / (TRAJECTORY + ".ckpt")

    @property
    def tdamp_fs(self) -> float:
        return self.md.tdamp_fs if self.md.tdamp_fs is not None else 100.0 * self.md.timestep_fs


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _fill(cls, table: dict, where: str):
    obj = cls()
    for k, v in table.items():
        default = getattr(obj, k)
        if isinstance(default, tuple) or k in ("msd_fit_window_fs",):
            if v is not None and (not isinstance(v, list) or len(v) != 2):
                raise SpecError(f"{where}.{k}: expected [start, end], got {v!r}")
            v = tuple(float(x) for x in v) if v is not None else None
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise SpecError(f"{where}.{k}: expected true/false, got {v!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(v, int) or isinstance(v, bool):
                raise SpecError(f"{where}.{k}: expected an integer, got {v!r}")
        elif isinstance(default, float) or k == "tdamp_fs":
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise SpecError(f"{where}.{k}: expected a number, got {v!r}")
            v = float(v)
        setattr(obj, k, v)
    return obj


def _reference(value, base: Path, default_discard: float, where: str) -> Reference:
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict) or "file" not in value:
        raise SpecError(f"{where}: expected a file name or a table with 'file'")
    _check_keys(value, _REFERENCE_KEYS, where)
    return Reference(file=(base / value["file"]).resolve() if not Path(value["file"]).is_absolute()
                     else Path(value["file"]),
                     discard_fs=float(value.get("discard_fs", default_discard)),
                     frame_interval_fs=None if value.get("frame_interval_fs") is None
                     else float(value["frame_interval_fs"]),
                     system=value.get("system"), stride=int(value.get("stride", 1)))


def load_spec(path_or_dict: str | Path | dict, output: str | Path | None = None,
              base: str | Path | None = None) -> CampaignSpec:
    """Read and validate a campaign spec (a TOML file, or the same content as a dict).

    Structure and reference paths are relative to the spec file's folder (``base`` for a dict);
    ``output`` (default ``[campaign] output``, else ``out/<name>``) is relative to the current
    directory.
    """
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, None
        base = Path(base or ".").resolve()
    else:
        source = Path(path_or_dict).resolve()
        try:
            data = tomllib.loads(source.read_text())
        except FileNotFoundError:
            raise SpecError(f"campaign spec not found: {path_or_dict}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{path_or_dict}: invalid TOML: {exc}") from None
        base = source.parent
    _check_keys(data, {"campaign", "md", "analysis", "material"}, "spec")
    camp = data.get("campaign", {})
    _check_keys(camp, _CAMPAIGN_KEYS, "[campaign]")
    _check_keys(data.get("md", {}), _MD_KEYS, "[md]")
    _check_keys(data.get("analysis", {}), _ANALYSIS_KEYS, "[analysis]")
    md_table = dict(data.get("md", {}))
    if "preset" in md_table:  # a named protocol (geodite_sim.md_presets) fills the integrator settings first
        try:
            preset = get_preset(md_table.pop("preset"))
        except ValueError as exc:
            raise SpecError(f"[md].preset: {exc}") from None
        if preset.is_npt:
            raise SpecError(f"[md].preset: {preset.name!r} is an NPT protocol; campaigns run NVT (equilibrate the "
                            "cells with `geodite-sim md run --preset ...` first)")
        given = {k: md_table[k] for k in ("ensemble", "timestep_fs", "chain_length", "tdamp_fs") if k in md_table}
        if given:
            raise SpecError(f"[md]: {sorted(given)} conflict with preset {preset.name!r}; give one or the other")
        md_table.update(ensemble=preset.ensemble, timestep_fs=preset.timestep_fs, chain_length=preset.chain_length,
                        tdamp_fs=preset.tdamp_fs)
        if preset.steps is not None:
            md_table.setdefault("steps", preset.steps)
    md = _fill(MDSettings, md_table, "[md]")
    analysis = _fill(AnalysisSettings, data.get("analysis", {}), "[analysis]")
    try:
        transport_settings(analysis, None)
    except ValueError as exc:
        raise SpecError(str(exc) if str(exc).startswith("[analysis]") else f"[analysis]: {exc}") from None
    if md.ensemble != "nvt_nhc" and md.ensemble not in ("nvt_langevin", "nve"):
        raise SpecError(f"[md].ensemble: unknown ensemble {md.ensemble!r}")
    if md.steps < 1 or md.frame_every < 1 or md.checkpoint_every < 1:
        raise SpecError("[md]: steps, frame_every and checkpoint_every must be >= 1")
    name = str(camp.get("name", source.stem if source else "campaign"))
    out = Path(output or camp.get("output") or Path("out") / name).resolve()

    materials = data.get("material", [])
    if not materials:
        raise SpecError("spec lists no [[material]]")
    runs: list[Run] = []
    seen: set[str] = set()
    for m_i, mat in enumerate(materials):
        where = f"[[material]] #{m_i + 1}"
        _check_keys(mat, _MATERIAL_KEYS, where)
        for key in ("name", "structure", "temperatures"):
            if key not in mat:
                raise SpecError(f"{where}: missing {key!r}")
        where = f"[[material]] {mat['name']!r}"
        structure = Path(mat["structure"])
        structure = structure if structure.is_absolute() else (base / structure).resolve()
        if not structure.exists():
            raise SpecError(f"{where}: structure file not found: {structure}")
        temps = mat["temperatures"]
        if not isinstance(temps, list) or not temps or not all(isinstance(t, (int, float)) and t > 0 for t in temps):
            raise SpecError(f"{where}: temperatures must be a non-empty list of positive numbers (K)")
        refs = mat.get("references", {})
        if not isinstance(refs, dict):
            raise SpecError(f"{where}: references must be a table {{\"<temperature>\" = file or table}}")
        ref_by_t = {}
        for key, value in refs.items():
            try:
                t_ref = float(key)
            except ValueError:
                raise SpecError(f"{where}.references: key {key!r} is not a temperature") from None
            if t_ref not in [float(t) for t in temps]:
                raise SpecError(f"{where}.references: no run at {key} K (temperatures: {temps})")
            ref_by_t[t_ref] = _reference(value, base, analysis.reference_discard_fs, f"{where}.references.{key}")
        for t in temps:
            run_id = f"{mat['name']}-{t:g}K"
            if run_id in seen:
                raise SpecError(f"{where}: duplicate run {run_id}")
            seen.add(run_id)
            runs.append(Run(run_id, len(runs), str(mat["name"]), structure, float(t), mat.get("mobile"),
                            ref_by_t.get(float(t))))
    return CampaignSpec(name, out, str(camp.get("model", "default")), dict(camp.get("model_options", {})),
                        str(camp.get("dtype", "float32")), str(camp.get("device", "cpu")), int(camp.get("seed", 0)),
                        md, analysis, runs, source)


# ---------------------------------------------------------------------------------------------- model
def build_model(spec: CampaignSpec):
    """The spec's model: ``"default"`` (packaged), a packaged name or checkpoint path, ``"morse"``
    (``MorsePotential(**model_options)``, for tests and demos) or ``"package.module:factory"``
    (called with ``model_options``, ``dtype`` and ``device``)."""
    import torch

    dtype = {"float32": torch.float32, "float64": torch.float64}.get(spec.dtype)
    if dtype is None:
        raise SpecError(f"[campaign].dtype must be float32 or float64, got {spec.dtype!r}")
    if spec.model == "morse":
        from geodite_sim.pair_potential import MorsePotential

        model = MorsePotential(**spec.model_options, dtype=dtype, device=spec.device)
        model.name = "morse:" + json.dumps(spec.model_options, sort_keys=True)
        return model
    if ":" in spec.model and not Path(spec.model).exists() and not spec.model.startswith(("/", ".")):
        module, _, attr = spec.model.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        model = factory(**spec.model_options, dtype=dtype, device=spec.device)
        if not hasattr(model, "name"):
            model.name = spec.model
        return model
    from geodite_sim.model import load_model

    return load_model(None if spec.model == "default" else spec.model, device=spec.device, dtype=dtype)


class _Interrupted(KeyboardInterrupt):
    """Raised by the progress observer to simulate an interruption (tests)."""


# ---------------------------------------------------------------------------------------------- progress
def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class RunState:
    """Where one run stands: ``status`` is "pending", "running", "done" or "failed"."""

    id: str
    index: int
    n_atoms: int
    steps_done: int
    steps_target: int
    status: str
    error: str | None = None


@dataclass
class RunRecord:
    """The result of one finished run: a line of ``runs.jsonl`` (store kind "run", ``index`` = run index).

    ``status`` is "done" or "failed" (``error`` says why); ``n_steps`` steps taken; ``energy`` eV and
    ``temperature`` K at the last step; ``trajectory``/``group`` where its frames are (HDF5 ``/systems/<group>``).
    """

    index: int
    id: str
    status: str
    n_steps: int
    error: str | None
    energy: float | None
    temperature: float | None
    trajectory: str | None
    group: str | None


#: The campaign's result store (inside the output folder).
RUNS = "runs.jsonl"


def open_run_store(spec: CampaignSpec, model=None, readonly: bool = False):
    """The campaign's :class:`~geodite_sim.store.ResultStore` of :class:`RunRecord` (fingerprint: the MD
    settings, the run list with structure hashes, and the model); another campaign's folder is refused."""
    if readonly:
        return ResultStore.open_readonly(spec.output, RunRecord, records_name=RUNS, structures_name=None)
    try:
        return ResultStore(spec.output, RunRecord, _md_fingerprint(spec), model, records_name=RUNS,
                           structures_name=None, job="campaign")
    except StoreMismatch as exc:
        raise SpecError(f"{spec.output} holds a campaign started with different MD settings: {exc}. Restore the "
                        "spec, or choose a new output folder. (Analysis settings and references may change "
                        "freely.)") from None


def _checkpoint_progress(spec: CampaignSpec) -> tuple[dict[int, int], dict[int, str | None], set[int]]:
    """(steps done, errors of retired runs, active runs) from the MD checkpoint (engine state, not results)."""
    steps: dict[int, int] = {}
    errors: dict[int, str | None] = {}
    active: set[int] = set()
    if not spec.checkpoint.exists():
        return steps, errors, active
    from geodite_sim.md_checkpoint import load_checkpoint

    ckpt = load_checkpoint(spec.checkpoint)
    for d in ckpt["results"]:
        steps[int(d["index"])] = int(d.get("n_steps", 0))
        errors[int(d["index"])] = d.get("error")
    if ckpt["state"] is not None:
        for index, n in zip(ckpt["active"], ckpt["state"]["fields"]["step"].tolist(), strict=True):
            steps[int(index)] = int(n)
            active.add(int(index))
    return steps, errors, active


def run_states(spec: CampaignSpec) -> list[RunState]:
    """Status of every run: finished runs from the result store; steps of unfinished ones from the checkpoint
    (runs retired by an interrupted session count as finished there until the next session records them)."""
    from ase.io import read

    records = {r.index: r for r in open_run_store(spec, readonly=True).records("run")} \
        if (spec.output / RUNS).exists() else {}
    steps, errors, active = _checkpoint_progress(spec)
    sizes: dict[Path, int] = {}
    out = []
    for run in spec.runs:
        if run.structure not in sizes:
            sizes[run.structure] = len(read(run.structure))
        i = run.index
        rec = records.get(i)
        if rec is not None:
            status, n, error = rec.status, rec.n_steps, rec.error
        elif i in errors:
            status, n, error = ("failed" if errors[i] else "done"), steps[i], errors[i]
        else:
            status, n, error = ("running" if i in active else "pending"), steps.get(i, 0), None
        out.append(RunState(run.id, i, sizes[run.structure], n, spec.md.steps, status, error))
    return out


class _ProgressReporter:
    """A run_md observer (:meth:`on_check`): counts engine steps at every check; prints progress and an ETA
    every ``every_s`` seconds and writes progress.json."""

    def __init__(self, spec: CampaignSpec, states: list[RunState], every_s: float, log: Callable[[str], None],
                 interrupt_after: int | None = None):
        self.spec = spec
        self.every_s = every_s
        self.log = log
        self.interrupt_after = interrupt_after
        self.total = sum(s.steps_target * s.n_atoms for s in states)
        self.done0 = sum(min(s.steps_done, s.steps_target) * s.n_atoms for s in states)
        self.system_steps_total = sum(s.steps_target for s in states)
        self.system_steps0 = sum(min(s.steps_done, s.steps_target) for s in states)
        self.iterations = 0
        self.system_steps = 0
        self.atom_steps = 0.0
        self._atoms_now = 0
        self._systems_now = -1
        self.t0 = time.perf_counter()
        self.t_last = self.t0
        self.complete = False  # set when run_md has returned: failed runs' unrun steps count as done
        self.t_first, self.atom_steps_first, self.iterations_first = self.t0, 0.0, 0
        self.store = None  # the campaign's result store: runs are recorded as they retire

    def on_check(self, event) -> None:
        """run_md observer hook, called at every check: ``event.steps`` engine steps since the previous check,
        ``event.iteration`` (total engine steps), ``event.n_systems`` / ``event.n_atoms`` active in those steps."""
        steps = int(event.steps)
        first = self.iterations == 0
        self.iterations += steps
        self._systems_now = int(event.n_systems)
        self._atoms_now = int(event.n_atoms)
        self.system_steps += steps * self._systems_now
        self.atom_steps += steps * self._atoms_now
        if first:  # rates are measured from the end of the first check (start-up excluded)
            self.t_first, self.atom_steps_first, self.iterations_first = time.perf_counter(), self.atom_steps, \
                self.iterations
        for result in getattr(event, "finished", None) or ():  # runs retired at this check: stored at once
            self.on_result(result)
        if self.interrupt_after is not None and self.iterations >= self.interrupt_after:
            raise _Interrupted(f"interrupted after {self.iterations} steps (test hook)")
        now = time.perf_counter()
        if now - self.t_last >= self.every_s:
            self.t_last = now
            self.report()

    def on_result(self, result) -> None:
        """run_md observer hook, called when a run retires: its record goes into the store at once."""
        if self.store is not None:
            self.store.put(_run_record(self.spec, result), "run")

    def snapshot(self) -> dict:
        now = time.perf_counter()
        elapsed = max(now - self.t0, 1e-9)
        if self.iterations > self.iterations_first:
            span = max(now - self.t_first, 1e-9)
            rate = (self.atom_steps - self.atom_steps_first) / span
            steps_per_s = (self.iterations - self.iterations_first) / span
        else:
            rate = self.atom_steps / elapsed
            steps_per_s = self.iterations / elapsed
        done = self.total if self.complete else min(self.total, self.done0 + self.atom_steps)
        remaining = max(0.0, self.total - done)
        eta = remaining / rate if rate > 0 else float("inf")
        return {"fraction_done": done / self.total if self.total else 1.0,
                "system_steps_done": int(self.system_steps_total if self.complete
                                         else min(self.system_steps_total, self.system_steps0 + self.system_steps)),
                "system_steps_total": int(self.system_steps_total), "active_systems": self._systems_now,
                "atom_steps_per_s": rate, "us_per_atom_step": 1e6 / rate if rate > 0 else None,
                "elapsed_s": elapsed, "eta_s": eta if math.isfinite(eta) else None,
                "ns_per_day_per_system": steps_per_s * self.spec.md.timestep_fs * 86400 / 1e6,
                "updated": time.strftime("%Y-%m-%d %H:%M:%S")}

    def report(self) -> None:
        s = self.snapshot()
        self.log(f"[{self.spec.name}] {100 * s['fraction_done']:5.1f} % | {s['system_steps_done']:,}/"
                 f"{s['system_steps_total']:,} system-steps | {s['active_systems']} active | "
                 f"{s['atom_steps_per_s']:.3g} atom-steps/s ({s['ns_per_day_per_system']:.3g} ns/day per system) | "
                 f"ETA {_format_duration(s['eta_s'] if s['eta_s'] is not None else float('inf'))}")
        _write_json(self.spec.output / PROGRESS, s)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


# ---------------------------------------------------------------------------------------------- MD
def _md_fingerprint(spec: CampaignSpec) -> dict:
    """Everything that determines the MD data: a resumed campaign must match it exactly."""
    runs = []
    for run in spec.runs:
        digest = hashlib.sha256(run.structure.read_bytes()).hexdigest()[:16]
        runs.append({"id": run.id, "index": run.index, "structure": run.structure.name, "sha256": digest,
                     "temperature": run.temperature})
    md = asdict(spec.md)
    md["tdamp_fs"] = spec.tdamp_fs
    return {"model": spec.model, "model_options": spec.model_options, "dtype": spec.dtype, "seed": spec.seed,
            "md": md, "runs": runs}


def _manifest(spec: CampaignSpec) -> dict:
    """``campaign.json``: the campaign's name, spec and one entry per MD session (throughput for ``--status``).
    The resume check is the result store's fingerprint (:func:`open_run_store`), not this file."""
    path = spec.output / MANIFEST
    if path.exists():
        return json.loads(path.read_text())
    return {"name": spec.name, "spec": str(spec.source) if spec.source else None,
            "fingerprint": _md_fingerprint(spec), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "sessions": []}


def _run_record(spec: CampaignSpec, res) -> RunRecord:
    """The store record of one run_md result."""
    file, group = res.trajectory if res.trajectory else (None, None)
    return RunRecord(index=int(res.index), id=spec.runs[res.index].id, status="failed" if res.error else "done",
                     n_steps=int(res.n_steps), error=res.error,
                     energy=None if res.energy is None else float(res.energy),
                     temperature=None if res.temperature is None else float(res.temperature),
                     trajectory=None if file is None else str(file),
                     group=None if group is None else str(group).rsplit("/", 1)[-1])  # "/systems/<i>" -> "<i>"


def run_md_stage(spec: CampaignSpec, log: Callable[[str], None] = print, progress_every_s: float = 30.0,
                 interrupt_after: int | None = None, model=None, executor=None) -> list[RunState]:
    """Run (or resume) every unfinished run of the campaign in one batched ``run_md`` call; store each run's
    result. A campaign whose runs are all stored does nothing (no MD, no file touched)."""
    from ase.io import read

    model = build_model(spec) if model is None else model
    with open_run_store(spec, model) as store:
        states = run_states(spec)
        todo = [s for s in states if (("run", s.index) not in store)]
        if not todo:
            log(f"[{spec.name}] MD complete: {len(states)} runs ({sum(s.status == 'failed' for s in states)} failed)")
            return states
        n_done = len(states) - len(todo)
        log(f"[{spec.name}] {len(states)} runs: {n_done} finished, {len(todo)} to run "
            f"({sum(s.status == 'running' for s in todo)} resumed from the checkpoint); output {spec.output}")
        manifest = _manifest(spec)
        reporter = _ProgressReporter(spec, states, progress_every_s, log, interrupt_after)
        reporter.store = store
        structures = []
        for run in spec.runs:
            atoms = read(run.structure)
            atoms.info = {"campaign_run": run.id}
            structures.append(atoms)
        total_atoms = sum(len(a) for a in structures)
        session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": spec.checkpoint.exists(),
                   "executor": executor.describe() if executor is not None else "local (one process)"}
        kwargs = dict(ensemble=spec.md.ensemble, temperature=[r.temperature for r in spec.runs],
                      timestep=spec.md.timestep_fs, steps=spec.md.steps, trajectory=str(spec.trajectory),
                      frame_every=spec.md.frame_every, tdamp=spec.tdamp_fs, chain_length=spec.md.chain_length,
                      seed=spec.seed, max_atoms=spec.md.max_atoms or total_atoms, skin=spec.md.skin,
                      monitors=spec.md.monitors, checkpoint=str(spec.checkpoint),
                      checkpoint_every=spec.md.checkpoint_every, restart=True, progress=False)
        try:
            if executor is None or getattr(executor, "name", "local") == "local":
                from geodite_sim.md import run_md

                results = run_md(structures, model, observers=[reporter], **kwargs)
            else:  # Ray: shards run remotely; progress comes with the finished shards
                results = executor.run_md(structures, model, **kwargs)
            reporter.complete = True
            for res in results:
                store.put(_run_record(spec, res), "run")
        finally:
            snap = reporter.snapshot()
            session.update(ended=time.strftime("%Y-%m-%d %H:%M:%S"), elapsed_s=snap["elapsed_s"],
                           atom_steps=reporter.atom_steps, us_per_atom_step=snap["us_per_atom_step"])
            manifest["sessions"].append(session)
            _write_json(spec.output / MANIFEST, manifest)
            if reporter.iterations or reporter.complete:
                reporter.report()
    states = run_states(spec)
    failed = [s for s in states if s.status == "failed"]
    log(f"[{spec.name}] MD complete: {len(states)} runs, {len(failed)} failed"
        + "".join(f"\n  {s.id}: {s.error}" for s in failed))
    return states


# ---------------------------------------------------------------------------------------------- analysis
def _file_key(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def run_locations(spec: CampaignSpec) -> dict[int, tuple[Path, str]]:
    """(HDF5 file, group) of every run's frames: the store's record when it has one (a Ray campaign writes
    one file per shard), else the campaign's ``trajectories.h5`` with group = run index."""
    records = {r.index: r for r in open_run_store(spec, readonly=True).records("run")} \
        if (spec.output / RUNS).exists() else {}
    out = {}
    for run in spec.runs:
        rec = records.get(run.index)
        if rec is not None and rec.trajectory:
            out[run.index] = (Path(rec.trajectory), str(rec.group))
        else:
            out[run.index] = (spec.trajectory, str(run.index))
    return out


def analyse_run(spec: CampaignSpec, run: Run, device: str | None = None,
                location: tuple[Path, str] | None = None) -> dict:
    """RDFs, overlap score with the reference, MSD and diffusion coefficients of one finished run
    (frames at ``location`` = (HDF5 file, group); default the campaign file, group = run index)."""
    import h5py

    from geodite_sim.analysis import compare_rdfs, diffusion_coefficients, load_frames

    a = spec.analysis
    device = device or a.device or spec.device
    file, group = location or (spec.trajectory, str(run.index))
    out: dict[str, Any] = {"id": run.id, "index": run.index, "material": run.material,
                           "temperature": run.temperature, "mobile": run.mobile}
    with h5py.File(file, "r") as f:
        g = f["systems"].get(group)
        if g is None:
            out["status"] = "pending"
            return out
        out.update(status=g.attrs.get("status", ""), error=g.attrs.get("error", "") or None,
                   n_steps=int(g.attrs.get("n_steps", 0)), n_atoms=int(g.attrs.get("n_atoms", 0)),
                   formula=str(g.attrs.get("formula", "")))
        steps = g["step"][()]
        temps = g["temperature"][()]
    keep = steps * spec.md.timestep_fs >= a.discard_fs
    out["mean_temperature"] = float(temps[keep].mean()) if keep.any() else None
    out["std_temperature"] = float(temps[keep].std()) if keep.any() else None
    try:
        frames = load_frames(file, system=int(group), discard_fs=a.discard_fs, stride=a.rdf_stride)
    except ValueError as exc:
        out["analysis_error"] = str(exc)
        return out
    out["n_frames"] = len(frames)
    rdf = frames.rdf(bin_width=a.rdf_bin_width, device=device)
    out["rdf"] = rdf.to_dict()
    if len(frames) >= 4:
        msd = frames.msd(remove_com=a.remove_com, device=device)
        out["msd"] = msd.to_dict()
        try:
            fits = diffusion_coefficients(msd, window_fs=a.msd_fit_window_fs, window_fraction=a.msd_fit_fraction)
            out["diffusion"] = {k: v.to_dict() for k, v in fits.items()}
        except ValueError as exc:
            out["analysis_error"] = f"diffusion fit: {exc}"
    try:
        out["transport"] = run_transport(a, run.mobile, file, group, run.temperature, device)
    except (ValueError, KeyError) as exc:
        out["transport_error"] = f"transport: {exc}"
    if run.reference is not None:
        ref = run.reference
        try:
            ref_frames = load_frames(ref.file, system=ref.system, discard_fs=ref.discard_fs, stride=ref.stride,
                                     frame_interval_fs=ref.frame_interval_fs)
            ref_rdf = ref_frames.rdf(bin_width=a.rdf_bin_width, device=device)
            out["reference"] = {"file": str(ref.file), "n_frames": len(ref_frames), "rdf": ref_rdf.to_dict()}
            out["comparison"] = compare_rdfs(ref_rdf, rdf).to_dict()
        except (ValueError, KeyError, FileNotFoundError) as exc:
            out["reference_error"] = f"{type(exc).__name__}: {exc}"
    return out


def analyse_campaign(spec: CampaignSpec, log: Callable[[str], None] = print, device: str | None = None) -> list[dict]:
    """Analyse every run that has frames; cached in ``analysis.json`` (recomputed when frames,
    analysis settings or reference files change)."""
    import h5py

    cache_path = spec.output / ANALYSIS
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    settings = asdict(spec.analysis)
    settings.pop("device", None)
    results = []
    frames_of = {}
    locations = run_locations(spec)
    for file in sorted({f for f, _ in locations.values()}):
        if not file.exists():
            continue
        with h5py.File(file, "r") as f:
            groups = dict(f["systems"].items())
            for index, (fi, group) in locations.items():
                if fi == file and group in groups:
                    g = groups[group]
                    frames_of[index] = [int(g["step"].shape[0]), str(g.attrs.get("status", ""))]
    for run in spec.runs:
        ref_key = None
        if run.reference is not None:
            ref_file = run.reference.file
            ref_key = [_file_key(ref_file) if ref_file.exists() else None, asdict(run.reference)]
        key = json.dumps({"frames": frames_of.get(run.index), "settings": settings, "timestep": spec.md.timestep_fs,
                          "ref": ref_key}, default=_json_default, sort_keys=True)
        hit = cache.get(run.id)
        if hit is not None and hit.get("key") == key:
            results.append(hit["result"])
            continue
        if run.index not in frames_of:
            res = {"id": run.id, "index": run.index, "material": run.material, "temperature": run.temperature,
                   "mobile": run.mobile, "status": "pending"}
        else:
            t = time.perf_counter()
            res = analyse_run(spec, run, device, locations[run.index])
            log(f"[{spec.name}] analysed {run.id}: {res.get('n_frames', 0)} frames in {time.perf_counter() - t:.1f} s")
        cache[run.id] = {"key": key, "result": res}
        results.append(res)
    spec.output.mkdir(parents=True, exist_ok=True)
    _write_json(cache_path, cache)
    return results


def summarise(results: list[dict]) -> dict:
    """Mean overlap score over the finished runs with a reference, the worst run, and counts.

    Failed and unfinished runs are analysed (their frames so far) but left out of the mean.
    """
    scored = [r for r in results if r.get("status") == "done" and r.get("comparison")
              and not math.isnan(r["comparison"]["score"])]
    mean = float(np.mean([r["comparison"]["score"] for r in scored])) if scored else None
    worst = min(scored, key=lambda r: r["comparison"]["score"]) if scored else None
    return {"n_runs": len(results), "n_scored": len(scored), "mean_score": mean,
            "worst_run": None if worst is None else worst["id"],
            "worst_score": None if worst is None else worst["comparison"]["score"],
            "n_failed": sum(r.get("status") == "failed" for r in results),
            "n_unfinished": sum(r.get("status") in ("pending", "running") for r in results)}


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class CampaignResult:
    spec: CampaignSpec
    states: list[RunState]
    results: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)


def run_campaign(spec: str | Path | dict | CampaignSpec, output: str | Path | None = None, run_md: bool = True,
                 analyse: bool = True, report: bool = True, log: Callable[[str], None] = print,
                 progress_every_s: float = 30.0, device: str | None = None, model=None,
                 interrupt_after: int | None = None, executor=None) -> CampaignResult:
    """Run or resume a campaign, then analyse it and write the report.

    Args:
        spec: a spec file, its content as a dict, or a loaded :class:`CampaignSpec`.
        output: output folder (overrides the spec's).
        run_md: run/resume the MD (False: analyse what is there).
        analyse, report: compute the analysis / write report.md, report.html and plots.
        log: where progress lines go.
        progress_every_s: seconds between progress lines (and progress.json updates).
        device: analysis device override.
        model: use this model object instead of building the spec's (must be the same model on resume).
        interrupt_after: stop with KeyboardInterrupt after this many MD steps (tests of resuming; checked
            at the engine's check interval).
        executor: where the MD runs (:mod:`geodite_sim.executors`; default one process, one run_md call).
    """
    if not isinstance(spec, CampaignSpec):
        spec = load_spec(spec, output=output)
    elif output is not None:
        spec.output = Path(output).resolve()
    if run_md:
        states = run_md_stage(spec, log, progress_every_s, interrupt_after, model, executor)
    else:
        states = run_states(spec)
    result = CampaignResult(spec, states)
    if analyse and any(f.exists() for f, _ in run_locations(spec).values()):
        result.results = analyse_campaign(spec, log, device)
        result.summary = summarise(result.results)
        if report:
            result.report = write_report(spec, result.results, result.summary, states)
            log(f"[{spec.name}] report: {result.report['markdown']}")
    return result


# ---------------------------------------------------------------------------------------------- report
def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_rdf(res: dict, path: Path) -> Path | None:
    """Partial RDFs of one run (solid) over the reference's (dashed), one panel per element pair."""
    from geodite_sim.analysis import RDFResult

    if "rdf" not in res:
        return None
    model = RDFResult.from_dict(res["rdf"])
    ref = RDFResult.from_dict(res["reference"]["rdf"]) if res.get("reference") else None
    pairs = model.pairs
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = _figure(3.6 * ncols, 2.6 * nrows)
    scores = (res.get("comparison") or {}).get("pair_scores", {})
    for k, pair in enumerate(pairs):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        if ref is not None and pair in ref.g:
            ax.plot(ref.r, ref.g[pair], "--", color="0.3", lw=1.2, label="reference")
        ax.plot(model.r, model.g[pair], "-", color="C0", lw=1.2, label="model")
        title = pair + (f"  d = {scores[pair]:.3f}" if pair in scores and not math.isnan(scores[pair]) else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("r (Å)", fontsize=8)
        ax.set_ylabel("g(r)", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
    score = (res.get("comparison") or {}).get("score")
    fig.suptitle(f"{res['id']}" + (f"  (score {score:.3f})" if score is not None and not math.isnan(score) else ""),
                 fontsize=10)
    fig.savefig(path)
    return path


def plot_scores(results: list[dict], path: Path) -> Path | None:
    """Strip plot of the system scores, one column per mobile ion, coloured by temperature."""
    scored = [r for r in results if r.get("status") == "done" and r.get("comparison")
              and not math.isnan(r["comparison"]["score"])]
    if not scored:
        return None
    ions = sorted({r.get("mobile") or "?" for r in scored})
    fig = _figure(max(3.5, 1.2 * len(ions) + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    temps = [r["temperature"] for r in scored]
    lo, hi = min(temps), max(temps)
    rng = np.random.default_rng(0)
    from matplotlib import colormaps

    cmap = colormaps["coolwarm"]
    for r in scored:
        x = ions.index(r.get("mobile") or "?") + rng.uniform(-0.15, 0.15)
        c = cmap(0.5 if hi == lo else (r["temperature"] - lo) / (hi - lo))
        ax.scatter([x], [r["comparison"]["score"]], color=c, s=30, edgecolor="k", lw=0.4, zorder=3)
    values = [r["comparison"]["score"] for r in scored]
    mean = float(np.mean(values))
    ax.axhline(mean, ls="--", color="0.4", lw=1, label=f"mean {mean:.3f}")
    ax.set_ylim(min(0.8, min(values) - 0.03), 1.005)
    ax.set_xticks(range(len(ions)), ions)
    ax.set_xlim(-0.6, len(ions) - 0.4)
    ax.set_xlabel("mobile ion")
    ax.set_ylabel("RDF overlap score (min over pairs)")
    ax.set_title(f"{len(scored)} run{'s' if len(scored) > 1 else ''}, colour = temperature "
                 f"({lo:g}–{hi:g} K)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path)
    return path


def plot_msd(results: list[dict], material: str, path: Path) -> Path | None:
    """MSD of the mobile ion (or every species) of one material, one curve per temperature, with the fit."""
    from geodite_sim.analysis import MSDResult

    runs = [r for r in results if r["material"] == material and "msd" in r]
    if not runs:
        return None
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    for k, r in enumerate(sorted(runs, key=lambda r: r["temperature"])):
        msd = MSDResult.from_dict(r["msd"])
        species = [r["mobile"]] if r.get("mobile") in msd.msd else list(msd.msd)
        color = cmap(0.85 * k / max(1, len(runs) - 1))
        for sp in species:
            t_ps = msd.t_fs / 1000.0
            ax.plot(t_ps, msd.msd[sp], color=color, lw=1.2,
                    label=f"{r['temperature']:g} K" + (f" {sp}" if len(species) > 1 else ""))
            fit = ((r.get("transport") or {}).get("tracer") or {}).get(sp)  # the transport table's fit
            if fit and math.isfinite(fit["slope_D_cm2_per_s"]):
                t0, t1 = fit["window_fs"]
                tt = np.linspace(t0, t1, 20)
                ax.plot(tt / 1000.0, 6.0 * fit["slope_D_cm2_per_s"] * 1e4 * tt / 1000.0 + fit["intercept_A2"], "--",
                        color=color, lw=0.9)
    mobile = runs[0].get("mobile")
    ax.set_xlabel("lag time (ps)")
    ax.set_ylabel(f"MSD{' of ' + mobile if mobile else ''} (Å²)")
    ax.set_title(f"{material}: MSD (dashed: 6Dt + b, weighted 1/t, over the fit window)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.savefig(path)
    return path


def _fmt(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _tables(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    """The same table as Markdown and as HTML."""
    md = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]

    html = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"]
    html += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    html.append("</table>")
    return "\n".join(md), "\n".join(html)


def write_report(spec: CampaignSpec, results: list[dict], summary: dict, states: list[RunState]) -> dict:
    """report.md, report.html and plots/*.png in the campaign's output folder; returns their paths."""
    out = spec.output
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    state_of = {s.id: s for s in states}
    plots: dict[str, Path] = {}
    p = plot_scores(results, plots_dir / "scores.png")
    if p:
        plots["scores"] = p
    for material in dict.fromkeys(r["material"] for r in results):
        p = plot_msd(results, material, plots_dir / f"msd_{_slug(material)}.png")
        if p:
            plots[f"msd:{material}"] = p
    for r in results:
        p = plot_rdf(r, plots_dir / f"rdf_{_slug(r['id'])}.png")
        if p:
            plots[f"rdf:{r['id']}"] = p

    transport = sse_transport.material_transport(results, spec.analysis)
    for material, entry in transport.items():
        p = sse_transport.plot_arrhenius(material, entry, results, plots_dir / f"arrhenius_{_slug(material)}.png",
                                         _figure)
        if p:
            plots[f"arrhenius:{material}"] = p

    md_parts: list[str] = []
    html_parts: list[str] = []

    def text(md: str, html: str | None = None) -> None:
        md_parts.append(md)
        html_parts.append(html if html is not None else f"<p>{escape(md)}</p>")

    def table(headers, rows) -> None:
        m, h = _tables(headers, rows)
        md_parts.append(m)
        html_parts.append(h)

    def image(key: str, caption: str) -> None:
        if key in plots:
            rel = plots[key].relative_to(out).as_posix()
            md_parts.append(f"![{caption}]({rel})")
            html_parts.append(f'<figure><img src="{escape(rel)}" alt="{escape(caption)}">'
                              f"<figcaption>{escape(caption)}</figcaption></figure>")

    md = spec.md
    a = spec.analysis
    text(f"# SSE campaign report: {spec.name}", f"<h1>SSE campaign report: {escape(spec.name)}</h1>")
    text(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{spec.source or 'spec'}`; "
         f"trajectories in `{TRAJECTORY}` (group = run index).")
    text(f"Model `{spec.model}` ({spec.dtype}, {spec.device}). MD: {md.ensemble}, chain {md.chain_length}, "
         f"damping {spec.tdamp_fs:g} fs, dt {md.timestep_fs:g} fs, {md.steps:,} steps "
         f"({md.steps * md.timestep_fs / 1e6:g} ns), a frame every {md.frame_every} steps. "
         f"Analysis: first {a.discard_fs / 1000:g} ps discarded (references: their own discard, default "
         f"{a.reference_discard_fs / 1000:g} ps), RDF bins {a.rdf_bin_width} Å up to half the shortest "
         f"periodic-image separation, D from MSD = 6Dt + b over "
         + (f"{a.msd_fit_window_fs[0] / 1000:g}–{a.msd_fit_window_fs[1] / 1000:g} ps" if a.msd_fit_window_fs
            else f"{100 * a.msd_fit_fraction[0]:g}–{100 * a.msd_fit_fraction[1]:g} % of the analysed span")
         + (", centre-of-mass drift removed." if a.remove_com else "."))

    text("## Summary", "<h2>Summary</h2>")
    lines = [f"- runs: {summary['n_runs']} ({summary['n_failed']} failed, {summary['n_unfinished']} unfinished)",
             f"- finished runs with a reference (scored): {summary['n_scored']}"]
    if summary["mean_score"] is not None:
        lines.append(f"- **mean overlap score: {summary['mean_score']:.3f}** "
                     f"(worst: {summary['worst_run']}, {summary['worst_score']:.3f}); the Geodite paper reports "
                     "0.958 for Geodite-MP over its 49 runs")
    else:
        lines.append("- no reference trajectories given: no overlap scores (add `references` to the spec)")
    md_parts.append("\n".join(lines))
    html_parts.append("<ul>" + "".join(f"<li>{escape(x[2:].replace('**', ''))}</li>" for x in lines) + "</ul>")

    text("## Runs", "<h2>Runs</h2>")
    rows = []
    for r in results:
        st = state_of.get(r["id"])
        d = ((r.get("transport") or {}).get("tracer") or {}).get(r.get("mobile") or "")
        d = {"D_cm2_per_s": d["D_cm2_per_s"], "D_A2_per_ps": d["D_cm2_per_s"] * 1e4} \
            if d and d["D_cm2_per_s"] is not None else None
        comp = r.get("comparison") or {}
        rows.append([
            r["id"], r["material"], f"{r['temperature']:g}", str(st.n_atoms if st else r.get("n_atoms", "")),
            f"{st.steps_done:,}/{st.steps_target:,}" if st else "", r.get("status", ""),
            _fmt(r.get("mean_temperature"), ".0f"), str(r.get("n_frames", "–")), r.get("mobile") or "–",
            _fmt(d["D_cm2_per_s"], ".3e") if d else "–", _fmt(d["D_A2_per_ps"], ".4g") if d else "–",
            _fmt(comp.get("score")), comp.get("worst_pair") or "–",
        ])
    table(["run", "material", "T (K)", "atoms", "steps", "status", "⟨T⟩ (K)", "frames", "mobile",
           "D mobile (cm²/s)", "D mobile (Å²/ps)", "score", "worst pair"], rows)

    text("## Diffusion coefficients, all species (cm²/s)", "<h2>Diffusion coefficients, all species (cm²/s)</h2>")
    rows = []
    for r in results:
        tracer = (r.get("transport") or {}).get("tracer") or {}
        if tracer:
            rows.append([r["id"], "; ".join(
                f"{sp}: {v['D_cm2_per_s']:.3e} [{v['ci_cm2_per_s'][0]:.2e}, {v['ci_cm2_per_s'][1]:.2e}] "
                f"(R² {v['r2']:.2f})" if v["D_cm2_per_s"] is not None and v["ci_cm2_per_s"]
                else f"{sp}: {v['D_cm2_per_s']:.3e} (R² {v['r2']:.2f})" if v["D_cm2_per_s"] is not None
                else f"{sp}: not determined ({v['reason']})" for sp, v in tracer.items())])
    if rows:
        table(["run", f"D per species [{100 * a.confidence:g} % interval]"], rows)
    else:
        text("No run has enough frames after the discarded time for an MSD yet.")

    for item in sse_transport.report_tables(results, transport, a.confidence):
        if item[0] == "heading":
            text(f"## {item[1]}", f"<h2>{escape(item[1])}</h2>")
        elif item[0] == "text":
            text(item[1])
        else:
            table(item[1], item[2])

    keys = ("error", "analysis_error", "reference_error", "transport_error")
    problems = [r for r in results if any(r.get(k) for k in keys)]
    if problems:
        text("## Problems", "<h2>Problems</h2>")
        table(["run", "message"], [[r["id"], "; ".join(str(r[k]) for k in keys if r.get(k))] for r in problems])

    text("## Plots", "<h2>Plots</h2>")
    image("scores", "RDF overlap score per run, by mobile ion")
    for material in dict.fromkeys(r["material"] for r in results):
        image(f"arrhenius:{material}", f"{material}: Arrhenius plot of the mobile ion's tracer D")
        image(f"msd:{material}", f"{material}: mean-squared displacement")
    for r in results:
        image(f"rdf:{r['id']}", f"{r['id']}: partial RDFs, model (solid) vs reference (dashed)")

    md_path = out / "report.md"
    md_path.write_text("\n\n".join(md_parts) + "\n")
    html_path = out / "report.html"
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #bbb;padding:2px 6px}"
             "th{background:#eee}img{max-width:100%}figure{margin:1em 0}")
    html_path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(spec.name)}</title>"
                         f"<style>{style}</style></head><body>\n" + "\n".join(html_parts) + "\n</body></html>\n")
    return {"markdown": md_path, "html": html_path, "plots": sorted(plots.values())}


def format_status(spec: CampaignSpec, states: list[RunState], us_per_atom_step: float | None = None) -> str:
    """A table of every run's status and, given a throughput, the estimated time left."""
    lines = [f"{'run':24s} {'atoms':>6s} {'steps':>19s} {'status':>8s}"]
    for s in states:
        lines.append(f"{s.id:24s} {s.n_atoms:6d} {s.steps_done:>9,}/{s.steps_target:<9,} {s.status:>8s}"
                     + (f"  {s.error}" if s.error else ""))
    left = sum((s.steps_target - min(s.steps_done, s.steps_target)) * s.n_atoms for s in states
               if s.status in ("pending", "running"))
    lines.append(f"{sum(s.status in ('done', 'failed') for s in states)}/{len(states)} runs finished; "
                 f"{left:,} atom-steps left")
    if us_per_atom_step and left:
        lines.append(f"at the last measured {us_per_atom_step:.4g} µs/atom/step: about "
                     f"{_format_duration(left * us_per_atom_step * 1e-6)} left")
    return "\n".join(lines)


def last_throughput(spec: CampaignSpec) -> float | None:
    """µs/atom/step of the most recent MD session of this campaign (from its manifest), if any."""
    path = spec.output / MANIFEST
    if not path.exists():
        return None
    sessions = [s for s in json.loads(path.read_text()).get("sessions", []) if s.get("us_per_atom_step")]
    return sessions[-1]["us_per_atom_step"] if sessions else None
