"""Campaign runs: the model, run states and records in the store, progress with an ETA, the one run_md call of
the MD stage."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from geodite_sim.workflows.sse_campaign.spec import MANIFEST, PROGRESS, CampaignSpec, SpecError

from geodite_sim.store import ResultStore, StoreMismatch, write_json


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
        write_json(self.spec.output / PROGRESS, s)


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
        session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "resumed": spec.checkpoint.exists(),
                   "executor": executor.describe() if executor is not None else "local (one process)"}
        kwargs = dict(ensemble=spec.md.ensemble, temperature=[r.temperature for r in spec.runs],
                      timestep=spec.md.timestep_fs, steps=spec.md.steps, trajectory=str(spec.trajectory),
                      frame_every=spec.md.frame_every, tdamp=spec.tdamp_fs, chain_length=spec.md.chain_length,
                      seed=spec.seed, max_atoms=spec.md.max_atoms or None, skin=spec.md.skin,
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
            write_json(spec.output / MANIFEST, manifest)
            if reporter.iterations or reporter.complete:
                reporter.report()
    states = run_states(spec)
    failed = [s for s in states if s.status == "failed"]
    log(f"[{spec.name}] MD complete: {len(states)} runs, {len(failed)} failed"
        + "".join(f"\n  {s.id}: {s.error}" for s in failed))
    return states


