"""The distillation workflow: data (generate → label, shard by shard) → train → validate → report.

    from geodite_sim.workflows.distill import run_distill
    result = run_distill("workflows/distill/specs/sse_li.toml")

With a ``[refine]`` section the train stage runs stage 1, the refine data round (``refine.py``), a
force-weighted stage on both rounds' data, then stage 2. Re-running the same spec resumes: a shard present on disk is skipped, training continues from its last
checkpoint bit for bit, a finished stage is not redone. ``data_workers=N`` labels shards in N processes (one
thread each; process i takes the shards k with k mod N = i): each shard's content is fixed by the spec, the seed
and its index, so the shards, their hashes and the split are those of one process. A wall-clock budget (``[budget]`` or
``deadline=``) stops the run cleanly between shards / training steps, checkpointed, with the stage
recorded. Files in the work folder::

    manifest.json          spec fingerprint, teacher, E0, shards with content hashes, split, data hash
    candidates/shard-*.h5  generated structures (float64, not needed once labelled)
    labels/shard-*.h5      labelled shards (float32, compressed, immutable)
    refine/                the error-targeted second round ([refine]): focus.json, labels/, candidates/
    refine-2/ ...          later rounds ([refine] rounds > 1), each from the student before it
    train/stage1, train/refine[, train/refine-2 ...], train/stage2/   trainer checkpoints (last.ckpt) and history
    student.ckpt           the exported student (EMA weights) with its model card
    report/                report.md, report.json, *.png
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geodite_sim.workflows.distill.generate import Split, plan, shards_of
from geodite_sim.workflows.distill.shards import (
    load_samples,
    read_shard,
    shard_hash,
    shard_name,
    write_record,
    write_shard,
)
from geodite_sim.workflows.distill.spec import (
    BudgetExhausted,
    DistillSpec,
    SpecError,
    check_teacher_elements,
    load_spec,
)

from geodite_sim.progress import eta_after

MANIFEST = "manifest.json"


@dataclass
class DistillResult:
    """What a call of :func:`run_distill` achieved."""

    workdir: Path
    stage: str  # where it stopped ("data", "train", "validate"), "done", or "<last stage asked for> finished"
    finished: bool
    shards_done: int
    shards_total: int
    student: Path | None = None
    report: Path | None = None
    metrics: dict = field(default_factory=dict)


class Distillation:
    """One spec's workflow state (the teacher is loaded on first use)."""

    def __init__(self, spec: DistillSpec, log: Callable[[str], None] = print, deadline: float | None = None,
                 progress: Callable[[str], None] | None = None):
        self.spec = spec
        self.log = log  # warnings and outcomes: always shown
        self.progress = log if progress is None else progress  # per-shard / per-epoch lines with ETA
        self.workdir = spec.workdir
        self.deadline = deadline
        self._teacher = None
        self.bases = plan(spec)
        self.shards = shards_of(self.bases, spec.data.structures_per_shard)

    # ------------------------------------------------------------------ teacher and manifest
    @property
    def teacher(self):
        if self._teacher is None:
            from geodite_sim.workflows.distill.teacher import load_teacher

            from geodite_sim.model.contract import supported_elements

            self._teacher = load_teacher(self.spec.teacher)
            check_teacher_elements(self.spec, supported_elements(self._teacher))
        return self._teacher

    def samples(self, folder: Path | None = None, report: bool = False) -> tuple[list, list]:
        """(training, held-out) samples of ``folder`` (default: round 0's), teacher labels beyond ``[train]``'s
        limits left out (``report``: say how many)."""
        excluded: list[str] = []
        e0 = {int(z): e for z, e in self.manifest().get("e0", {}).items()}
        out = load_samples(folder or self.workdir, self.spec.train.label_limits, e0, excluded)
        if report and excluded:
            self.log(f"{len(excluded)} structures left out: teacher labels beyond [train] max_energy_per_atom / "
                     f"max_force / max_stress (e.g. {', '.join(excluded[:3])})")
        return out

    def manifest(self) -> dict:
        path = self.workdir / MANIFEST
        return json.loads(path.read_text()) if path.exists() else {}

    def _start_manifest(self) -> dict:
        from ase.data import atomic_numbers
        from geodite_sim.workflows.distill.teacher import isolated_atom_energies, teacher_info

        m = self.manifest()
        fp = self.spec.fingerprint("data")
        if m and m.get("data_fingerprint") != fp:
            raise SpecError(f"{self.workdir} holds data of another spec (fingerprint {m.get('data_fingerprint')} "
                            f"vs {fp}): use a fresh work folder")
        if not m:
            teacher = self.teacher
            numbers = sorted({atomic_numbers[e] for e in self.spec.domain.elements}
                             | set(self._seed_numbers()))
            m = {"name": self.spec.name, "data_fingerprint": fp, "seed": self.spec.seed,
                 "teacher": teacher_info(teacher, self.spec.teacher).to_dict(),
                 "e0": {str(z): e for z, e in isolated_atom_energies(teacher, numbers).items()},
                 "shards_planned": len(self.shards), "structures_planned": sum(b.n_candidates for b in self.bases),
                 "shards": {}, "seed_failures": []}
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_record(self.workdir / MANIFEST, m)
        return m

    def _seed_numbers(self) -> list[int]:
        from ase.io import read

        out = set()
        for path in self.spec.domain.seeds:
            try:
                out |= set(int(z) for z in read(path).numbers)
            except Exception:  # noqa: BLE001 - a bad seed gets its own error in relax_seeds
                continue
        return sorted(out)

    def relaxed_seeds(self) -> list:
        """Teacher-relaxed seeds, cached in ``seeds/`` (a failed seed is recorded and left out)."""
        from ase.io import read, write

        if not self.spec.domain.seeds:
            return []
        folder = self.workdir / "seeds"
        done = folder / "done.json"
        if done.exists():
            info = json.loads(done.read_text())
            return [read(folder / f) if f else None for f in info["files"]]
        from geodite_sim.workflows.distill.candidates import relax_seeds

        relaxed, failures = relax_seeds(self.spec, self.teacher)
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for i, a in enumerate(relaxed):
            if a is None:
                files.append(None)
                continue
            name = f"seed-{i:03d}.extxyz"
            write(folder / name, a)
            files.append(name)
            relaxed[i] = read(folder / name)  # the file's (rounded) values, as every later run reads them
        for f in failures:
            self.log(f"seed {f['tag']}: {f['error']} (left out; the other seeds proceed)")
        write_record(done, {"files": files, "failures": failures})
        if not any(a is not None for a in relaxed):
            raise SpecError("no seed structure could be relaxed by the teacher: " +
                            "; ".join(f["error"] for f in failures))
        return relaxed

    # ------------------------------------------------------------------ data
    def _check_time(self, what: str) -> None:
        if self.deadline is not None and time.time() >= self.deadline:
            raise BudgetExhausted(what)

    def data_done(self) -> int:
        return sum((self.workdir / "labels" / shard_name(k)).exists() for k in range(len(self.shards)))

    @contextlib.contextmanager
    def _manifest_lock(self):
        """An exclusive lock on the manifest (data workers in other processes update it too)."""
        with open(self.workdir / (MANIFEST + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _record_shard(self, k: int, labelled, digest: str, section: str | None = None) -> None:
        """Add labelled shard ``k`` to the manifest (read, update, write atomically under the lock); ``section``:
        the manifest entry of a later data round (``"refine"``) instead of round 0."""
        with self._manifest_lock():
            m = self.manifest()
            entry = m if section is None else m.setdefault(section, {})
            shards = entry.setdefault("shards", {})
            shards[shard_name(k)] = {"hash": digest, "structures": len(labelled),
                                     "atoms": int(sum(len(a) for a in labelled.atoms)),
                                     "heldout": int(sum(labelled.heldout)), "failed": len(labelled.failures)}
            entry["shards"] = dict(sorted(shards.items()))
            entry["data_hash"] = data_hash(entry)
            write_record(self.workdir / MANIFEST, m)

    def split(self) -> tuple[Split, list]:
        """The held-out split and the teacher-relaxed seeds (None where a seed failed)."""
        seeds = self.relaxed_seeds()
        kept = [a for a in seeds if a is not None]
        return Split(self.spec, kept if self.spec.domain.seeds else None, self.bases), seeds

    def produce_shard(self, bases: list, split: Split, seeds: list, folder: Path, k: int, md_index: int,
                      spec: DistillSpec | None = None, driver=None):
        """Generate (cached in ``folder/candidates``) and label shard ``k`` into ``folder/labels``; returns
        (labelled shard, its content hash, seconds spent generating). ``spec``/``driver``: the settings and the
        model that generate (default: this spec and the teacher; the refine round's MD uses the student);
        labels always come from the teacher."""
        from geodite_sim.workflows.distill.candidates import generate_shard
        from geodite_sim.workflows.distill.label import label_shard

        cand_path = folder / "candidates" / shard_name(k)
        t_shard = time.time()
        if not cand_path.exists():
            cands = generate_shard(spec or self.spec, driver if driver is not None else self.teacher, bases, split,
                                   seeds, self.workdir, md_index)
            write_shard(cand_path, cands, labelled=False)
        t_gen = time.time() - t_shard
        self._check_time(f"data: before labelling shard {k}")
        labelled = label_shard(read_shard(cand_path), self.teacher, self.spec.teacher.batch_atoms)
        digest = write_shard(folder / "labels" / shard_name(k), labelled, labelled=True)
        return labelled, digest, t_gen

    def run_data(self, max_shards: int | None = None, part: tuple[int, int] = (0, 1)) -> None:
        """Generate and label every planned shard not yet on disk (in order); ``part=(i, n)``: only the shards
        k with k mod n = i (one of n data workers)."""
        self._start_manifest()
        split, seeds = self.split()
        t0, done_here = time.time(), 0
        index, workers = part
        todo = [k for k in range(len(self.shards))
                if k % workers == index and not (self.workdir / "labels" / shard_name(k)).exists()]
        if todo:
            self.progress(f"data: {len(self.shards) - len(todo)}/{len(self.shards)} shards labelled; "
                     f"{len(todo)} to go ({sum(b.n_candidates for k in todo for b in self.shards[k])} structures)")
        for n, k in enumerate(todo):
            if max_shards is not None and n >= max_shards:
                break
            self._check_time(f"data: before shard {k}")
            t_shard = time.time()
            # bases of failed seeds are dropped (their index points at None)
            bases = [b for b in self.shards[k] if not (b.kind.startswith("seed_") and seeds[b.key[0]] is None)]
            labelled, digest, t_gen = self.produce_shard(bases, split, seeds, self.workdir, k, k)
            self._record_shard(k, labelled, digest)
            done_here += 1
            self.progress(f"data: shard {k + 1}/{len(self.shards)} labelled ({len(labelled)} structures, "
                     f"{len(labelled.failures)} failed; generated in {t_gen:.0f} s, labelled in "
                     f"{time.time() - t_shard - t_gen:.0f} s); {time.time() - t0:.0f} s so far, "
                     f"{eta_after(done_here, len(todo), time.time() - t0)}")

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        m = self.manifest()
        from geodite_sim.workflows.distill.train import training_status

        return {"workdir": str(self.workdir), "shards_labelled": self.data_done(), "shards_planned": len(self.shards),
                "structures_labelled": sum(s["structures"] for s in m.get("shards", {}).values()),
                "data_hash": m.get("data_hash"), "train": training_status(self),
                "refine": self._refine_status(m),
                "student": str(self.workdir / "student.ckpt") if (self.workdir / "student.ckpt").exists() else None,
                "validate": {"checks_done": sorted(f.stem for f in (self.workdir / "report" / "checks").glob("*.json")
                                                   if f.stem != "weights"),
                             "md_in_progress": sorted(f.stem for f in (self.workdir / "report").glob("*.ckpt"))},
                "report": str(self.workdir / "report" / "report.md")
                if (self.workdir / "report" / "report.md").exists() else None}


    def _refine_status(self, m: dict) -> dict | None:
        """Round 1's focus and labelled data (``rounds`` > 1: each later round under its name as well)."""
        from geodite_sim.workflows.distill.refine import round_name

        if self.spec.refine.structures == 0:
            return None

        def one(name: str) -> dict:
            focus = self.workdir / name / "focus.json"
            shards = m.get(name, {}).get("shards", {})
            return {"focus_meV_per_A": {el: round(1e3 * e, 1)
                                        for el, e in json.loads(focus.read_text())["focus"].items()}
                    if focus.exists() else None,
                    "shards_labelled": len(shards), "structures_labelled": sum(s["structures"] for s in shards.values())}

        out = one(round_name(1))
        for r in range(2, self.spec.refine.rounds + 1):
            out[round_name(r)] = one(round_name(r))
        return out


def data_hash(manifest: dict) -> str:
    """sha256 (16 hex) of the labelled shards' names and content hashes."""
    items = sorted((k, v["hash"]) for k, v in manifest.get("shards", {}).items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def verify_shards(workdir: Path) -> list[str]:
    """Names of labelled shards whose content hash differs from the manifest's (empty when all agree)."""
    m = json.loads((workdir / MANIFEST).read_text())
    return [name for name, info in m.get("shards", {}).items()
            if shard_hash(workdir / "labels" / name) != info["hash"]]


def run_distill(spec_or_path, workdir: str | Path | None = None, deadline: float | None = None,
                stages: tuple[str, ...] = ("data", "train", "validate"), log: Callable[[str], None] = print,
                max_shards: int | None = None, progress: Callable[[str], None] | None = None,
                data_workers: int = 1) -> DistillResult:
    """Run (or resume) the workflow up to the end of ``stages``, within the spec's wall-clock budget.

    ``stages`` may also name ``"teacher-checks"``: the teacher's relaxations of the validation, which need no
    student — run ``("teacher-checks",)`` in a second process while the student trains — and
    ``"interim-checks"``: the relaxed volumes of the student being trained (its latest checkpoint's EMA weights)
    against the teacher's cached ones, a row of ``report/interim.json`` per call.
    ``log`` gets warnings and outcomes; ``progress`` (default: ``log``) the per-shard and per-epoch lines.
    ``data_workers``: processes that generate and label shards (each one thread; this one is the first)."""
    start = time.time()
    spec = spec_or_path if isinstance(spec_or_path, DistillSpec) else load_spec(spec_or_path, workdir)
    limits = [t for t in (deadline, spec.budget.deadline(start)) if t is not None]
    job = Distillation(spec, log=log, deadline=min(limits) if limits else None, progress=progress)
    stage = "data"
    try:
        if "data" in stages:
            if data_workers > 1:
                _run_data_workers(job, data_workers, quiet=progress is not None)
            else:
                job.run_data(max_shards=max_shards)
            if job.data_done() < len(job.shards):
                return DistillResult(job.workdir, "data", False, job.data_done(), len(job.shards))
        if "teacher-checks" in stages:  # the teacher's side of the validation: no student needed
            from geodite_sim.workflows.distill.report import run_teacher_checks

            stage = "teacher-checks"
            job.log(f"teacher-checks: {run_teacher_checks(job)['structures']} structures relaxed by the teacher")
        if "interim-checks" in stages:  # the student being trained, against the teacher's cached volumes
            from geodite_sim.workflows.distill.report import interim_summary, run_interim_checks

            stage = "interim-checks"
            job.log(interim_summary(run_interim_checks(job)))
        stage = "train"
        if "train" in stages and job.data_done() < len(job.shards):
            log(f"train: the data stage is not finished ({job.data_done()} of {len(job.shards)} shards labelled): "
                f"training on the shards present; re-running with more shards continues from the checkpoint on "
                f"the larger set (bit-for-bit resumption holds for a fixed set of shards)")
        if "train" in stages:
            from geodite_sim.workflows.distill.card import publish_student
            from geodite_sim.workflows.distill.train import run_training

            publish_student(job, run_training(job))
        stage = "validate"
        if "validate" in stages:
            from geodite_sim.workflows.distill.report import run_validation

            metrics = run_validation(job)
            return DistillResult(job.workdir, "done", True, job.data_done(), len(job.shards),
                                 job.workdir / "student.ckpt", job.workdir / "report" / "report.md", metrics)
    except BudgetExhausted as exc:
        log(f"wall-clock budget reached ({exc}); everything so far is saved — re-run the same command to continue")
        return DistillResult(job.workdir, stage, False, job.data_done(), len(job.shards))
    return DistillResult(job.workdir, f"{stages[-1]} finished", True, job.data_done(), len(job.shards),
                         job.workdir / "student.ckpt" if (job.workdir / "student.ckpt").exists() else None)


def _data_worker(spec: DistillSpec, deadline: float | None, index: int, workers: int, quiet: bool) -> None:
    """One data worker process: the shards k with k mod ``workers`` = ``index`` (stops at the deadline)."""
    import sys

    import torch

    torch.set_num_threads(1)

    def log(msg: str) -> None:
        print(f"[data worker {index + 1}/{workers}] {msg}", file=sys.stderr, flush=True)

    job = Distillation(spec, log=log, deadline=deadline, progress=(lambda msg: None) if quiet else log)
    try:
        job.run_data(part=(index, workers))
    except BudgetExhausted:
        pass


def _run_data_workers(job: Distillation, workers: int, quiet: bool) -> None:
    """The data stage in ``workers`` processes: this one prepares the manifest and the teacher-relaxed seeds
    (so that no worker races on them), starts ``workers - 1`` others, takes its own share, then waits."""
    job._start_manifest()
    job.relaxed_seeds()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_data_worker, args=(job.spec, job.deadline, i, workers, quiet), daemon=False)
             for i in range(1, workers)]
    for proc in procs:
        proc.start()
    try:
        job.run_data(part=(0, workers))
    finally:
        for proc in procs:
            proc.join()
    failed = [i + 1 for i, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        job.log(f"data workers {failed} of {workers} exited with an error; their unfinished shards are done by the "
                f"next run")
