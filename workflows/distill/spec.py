"""The distillation spec: teacher, domain, data budget, student, training stages and wall-clock budget.

A spec is a TOML file (``workflows/distill/specs/*.toml``; docs/distillation.md)::

    [distill]
    name = "sse-li"            # output folder default: <spec folder>/<name>.distill
    seed = 0
    [teacher]
    model = "sevennet-0"       # packaged name, checkpoint path, "morse", "package.module:factory"
    [domain]
    elements = ["Li", "N"]     # universal mode (elemental cells, prototypes, pyxtal, dimers)
    seeds = ["Li3N.extxyz"]    # domain mode (supercells, strain, rattle, teacher MD); paths relative to the spec
    temperatures = [600.0]     # K, the MD frames of domain mode
    [data]
    structures = 2000          # data budget: structures to label (approximate, deterministic)
    [student]
    hidden_channels = 48
    [train]
    stage1_epochs = 30
    [refine]
    structures = 400           # error-targeted second round after stage 1 (0: none)
    rounds = 1                 # repeat it, each round from the latest student (active learning)
    [budget]
    hours = 2.0                # or until = "HH:MM"

Every section and key is checked here; an unknown key, a bad value or an element the teacher
cannot compute is refused at spec time with a message naming it (:class:`SpecError`).
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ase.data import atomic_numbers, chemical_symbols


class BudgetExhausted(Exception):
    """The wall-clock budget ran out; everything done so far is on disk."""


class SpecError(ValueError):
    """A distillation spec that cannot be run; the message names the entry and why."""


@dataclass(frozen=True)
class TeacherSpec:
    """The model that labels the data: any model the engine runs."""

    model: str = "sevennet-0"
    options: dict = field(default_factory=dict)  # keyword arguments of "morse" / a factory
    dtype: str = "float32"
    device: str = "auto"
    batch_atoms: int = 2048  # atoms per labelling batch


@dataclass(frozen=True)
class DomainSpec:
    """What the student must serve: elements (universal mode) and/or seed structures (domain mode)."""

    elements: tuple[str, ...] = ()
    seeds: tuple[str, ...] = ()  # structure files (resolved against the spec's folder)
    temperatures: tuple[float, ...] = (300.0,)  # K
    pressures: tuple[float, ...] = (0.0,)  # GPa (recorded; strains cover the volume range)
    mobile: str = ""  # domain mode: the mobile ion (vacancy variants); default the first of Li, Na, K, Ag, Cu, …

    @property
    def mode(self) -> str:
        if self.elements and self.seeds:
            return "both"
        return "universal" if self.elements else "domain"


@dataclass(frozen=True)
class DataSpec:
    """Data budget and sampling settings (sizes in atoms, strains as fractions, temperatures K)."""

    structures: int = 2000  # structures to label in all (approximate; split over the sources)
    structures_per_shard: int = 200
    heldout_fraction: float = 0.1  # of the compositions
    max_atoms: int = 32  # largest generated cell (universal mode)
    volume_scan: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.25, 1.4)  # x the estimated volume (elemental)
    strain: float = 0.05
    rattle: tuple[float, float] = (0.01, 0.15)  # Å, log-uniform std of the rattle
    relax_steps: int = 40  # teacher pre-relaxation (FIRE + cell) of the base structures
    relax_fmax: float = 0.1
    # domain mode
    supercell_atoms: tuple[int, int] = (24, 96)  # atoms of the supercells cut from a seed
    md_steps: int = 400
    md_frame_every: int = 40
    md_timestep: float = 1.0  # fs
    md_fraction: float = 0.5  # of the domain-mode budget spent on teacher MD frames (the rest: strained/rattled)
    sources: dict = field(default_factory=lambda: {"elemental": 0.15, "prototype": 0.45, "pyxtal": 0.25,
                                                   "dimer": 0.05, "expanded": 0.10})


@dataclass(frozen=True)
class StudentSpec:
    """Student architecture (Geodite; ``GeoditeConfig`` fields)."""

    hidden_channels: int = 48
    num_layers: int = 2
    num_heads: int = 4
    n_rbf: int = 10
    cutoff: float = 5.0


@dataclass(frozen=True)
class TrainSpec:
    """Two stages: forces first, then energies at a low learning rate; EMA throughout."""

    stage1_epochs: int = 30
    stage1_lr: float = 2e-3
    stage1_weights: tuple[float, float, float] = (1.0, 10.0, 1.0)  # energy, forces, stress
    stage2_epochs: int = 10
    stage2_lr: float = 3e-4
    stage2_weights: tuple[float, float, float] = (10.0, 1.0, 1.0)
    batch_size: int = 8
    ema_decay: float = 0.995
    checkpoint_every: int = 200  # optimizer steps between mid-epoch checkpoints
    dtype: str = "float32"
    # teacher labels beyond these are neither trained nor validated on (shards.load_samples)
    max_energy_per_atom: float = 20.0  # eV/atom above (or below) the isolated atoms
    max_force: float = 50.0  # eV/Å, largest component
    max_stress: float = 5.0  # eV/Å^3, largest component (800 GPa)

    @property
    def label_limits(self) -> tuple[float, float, float]:
        return self.max_energy_per_atom, self.max_force, self.max_stress


@dataclass(frozen=True)
class RefineSpec:
    """A second, error-targeted data round after stage 1 (``refine.py``); ``structures = 0``: none."""

    structures: int = 0  # structures labelled in the round (approximate)
    focus_fraction: float = 0.25  # of the elements: those with the largest stage-1 held-out force error
    epochs: int = 4  # force-weighted epochs on round 0 + refine data, from the stage-1 student
    lr: float = 1e-3
    md_steps: int = 1000  # domain mode: each stage-1-student NVT run (frames labelled by the teacher)
    md_frame_every: int = 50
    rounds: int = 1  # refine rounds, each made from the student of the round before (refine, refine-2, ...)


@dataclass(frozen=True)
class BudgetSpec:
    """Wall-clock budget: stop cleanly (checkpoint, exit) before ``hours`` from the start or at ``until``."""

    hours: float | None = None
    until: str | None = None  # "HH:MM" local time (the next such time)

    def deadline(self, start: float) -> float | None:
        """Unix time to stop by, or None."""
        ends = []
        if self.hours is not None:
            ends.append(start + 3600.0 * self.hours)
        if self.until is not None:
            ends.append(parse_until(self.until, start))
        return min(ends) if ends else None


@dataclass(frozen=True)
class ValidateSpec:
    """Validation settings (docs/distillation.md)."""

    relax_crystals: int = 30  # held-out crystals whose relaxed volumes are compared
    dcdft: bool = False  # Delta-test crystals within the domain's elements (WIEN2k volumes)
    md_steps: int = 2000  # domain mode: student vs teacher NVT per material
    md_timestep: float = 1.0
    long_md_ps: float = 20.0  # domain mode: student-only NVT per material with the monitors on (0: skip)
    speed_structures: int = 8
    structures: tuple[str, ...] = ()  # file globs (relative to the spec): relaxed by both, none may blow up


@dataclass(frozen=True)
class DistillSpec:
    name: str
    workdir: Path
    seed: int
    teacher: TeacherSpec
    domain: DomainSpec
    data: DataSpec
    student: StudentSpec
    train: TrainSpec
    budget: BudgetSpec
    validate: ValidateSpec
    source: Path | None = None
    refine: RefineSpec = RefineSpec()

    def fingerprint(self, stage: str) -> str:
        """Identity of what a stage depends on (a changed spec is refused instead of mixing data)."""
        def given(section) -> dict:  # fields at their defaults are left out: a new option does not change it
            default = type(section)()
            return {k: v for k, v in asdict(section).items() if v != getattr(default, k)}

        parts: dict[str, Any] = {"seed": self.seed, "teacher": given(self.teacher), "domain": given(self.domain),
                                 "data": given(self.data)}
        parts["teacher"].pop("batch_atoms", None)
        parts["teacher"].pop("device", None)
        if stage == "refine":
            # a round's data does not depend on how its stage trains, nor on how many rounds follow it
            parts["refine"] = {k: v for k, v in given(self.refine).items() if k not in ("epochs", "lr", "rounds")}
        if stage == "train":
            parts.update(student=given(self.student), train=given(self.train))
            parts["train"].pop("checkpoint_every", None)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_until(text: str, start: float) -> float:
    """The next local time ``HH:MM`` after ``start`` (Unix seconds)."""
    try:
        hh, mm = (int(x) for x in text.split(":"))
        t = _dt.time(hh, mm)
    except ValueError:
        raise SpecError(f"[budget] until must be HH:MM, got {text!r}") from None
    now = _dt.datetime.fromtimestamp(start)
    end = now.replace(hour=t.hour, minute=t.minute, second=0, microsecond=0)
    if end <= now:
        end += _dt.timedelta(days=1)
    return end.timestamp()


def _section(cls, data: dict, name: str, base: Path | None = None):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"[{name}]: unknown key(s) {unknown}; known: {sorted(known)}")
    kw = {}
    for key, value in data.items():
        default = getattr(cls(), key) if key not in ("options", "sources") else None
        if isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                value = [value]
            value = tuple(value)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise SpecError(f"[{name}] {key} must be true or false, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(value, int) or isinstance(value, bool):
                raise SpecError(f"[{name}] {key} must be an integer, got {value!r}")
        elif isinstance(default, float) and not isinstance(value, (int, float)):
            raise SpecError(f"[{name}] {key} must be a number, got {value!r}")
        kw[key] = value
    return cls(**kw)


def _elements(names) -> tuple[str, ...]:
    out = []
    for el in names:
        if el not in atomic_numbers or el == "X":
            raise SpecError(f"[domain] elements: {el!r} is not a chemical element")
        out.append(el)
    return tuple(sorted(set(out), key=lambda e: atomic_numbers[e]))


def _validate(data: dict, base: Path) -> ValidateSpec:
    validate = _section(ValidateSpec, data, "validate")
    patterns = tuple(str(base / p) if not Path(p).is_absolute() else p for p in validate.structures)
    for pattern in patterns:
        if not glob.glob(pattern):
            raise SpecError(f"[validate] structures: {pattern!r} matches no file")
    return replace(validate, structures=patterns)


def _refine(data: dict, domain: DomainSpec) -> RefineSpec:
    refine = _section(RefineSpec, data, "refine")
    if refine.structures < 0 or refine.epochs < 0 or not 0.0 < refine.focus_fraction <= 1.0:
        raise SpecError("[refine] structures and epochs must be >= 0 and focus_fraction in (0, 1]")
    if refine.structures > 0 and refine.epochs == 0:
        raise SpecError("[refine] structures > 0 needs epochs > 0 (the refine data is trained on in its own stage)")
    if refine.md_steps < 1 or not 1 <= refine.md_frame_every <= refine.md_steps:
        raise SpecError("[refine] md_steps must be >= 1 and md_frame_every in 1..md_steps")
    if not 1 <= refine.rounds <= 9:
        raise SpecError(f"[refine] rounds must be in 1..9, got {refine.rounds}")
    return refine


def load_spec(path_or_dict: str | Path | dict, workdir: str | Path | None = None) -> DistillSpec:
    """Read and check a spec (TOML file or dict). Relative paths resolve against the spec's folder."""
    if isinstance(path_or_dict, dict):
        data, source, base = path_or_dict, None, Path.cwd()
    else:
        source = Path(path_or_dict).resolve()
        if not source.is_file():
            raise SpecError(f"{path_or_dict}: no such spec file")
        try:
            data = tomllib.loads(source.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{path_or_dict}: not valid TOML: {exc}") from None
        base = source.parent
    sections = {"distill", "teacher", "domain", "data", "student", "train", "refine", "budget", "validate"}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise SpecError(f"unknown section(s) {unknown}; known: {sorted(sections)}")
    head = dict(data.get("distill", {}))
    bad = sorted(set(head) - {"name", "seed", "workdir"})
    if bad:
        raise SpecError(f"[distill]: unknown key(s) {bad}; known: ['name', 'seed', 'workdir']")
    name = str(head.get("name") or (source.stem if source else "distill"))
    teacher = _section(TeacherSpec, dict(data.get("teacher", {})), "teacher")
    domain_raw = dict(data.get("domain", {}))
    domain = _section(DomainSpec, domain_raw, "domain")
    seeds = tuple(str((base / s).resolve()) if not Path(s).is_absolute() else s for s in domain.seeds)
    domain = DomainSpec(elements=_elements(domain.elements), seeds=seeds,
                        temperatures=tuple(float(t) for t in domain.temperatures),
                        pressures=tuple(float(p) for p in domain.pressures), mobile=str(domain.mobile))
    if domain.mobile and domain.mobile not in atomic_numbers:
        raise SpecError(f"[domain] mobile: {domain.mobile!r} is not a chemical element")
    if not domain.elements and not domain.seeds:
        raise SpecError("[domain] needs elements (universal mode) and/or seeds (domain mode)")
    if any(t <= 0 for t in domain.temperatures):
        raise SpecError(f"[domain] temperatures must be positive (K), got {list(domain.temperatures)}")
    data_spec = _section(DataSpec, dict(data.get("data", {})), "data")
    if data_spec.structures < 1 or data_spec.structures_per_shard < 1:
        raise SpecError("[data] structures and structures_per_shard must be >= 1")
    if not 0.0 <= data_spec.heldout_fraction < 1.0:
        raise SpecError(f"[data] heldout_fraction must be in [0, 1), got {data_spec.heldout_fraction}")
    unknown_sources = sorted(set(data_spec.sources) - {"elemental", "prototype", "pyxtal", "dimer", "expanded"})
    if unknown_sources:
        raise SpecError(f"[data] sources: unknown source(s) {unknown_sources}")
    student = _section(StudentSpec, dict(data.get("student", {})), "student")
    train = _section(TrainSpec, dict(data.get("train", {})), "train")
    refine = _refine(dict(data.get("refine", {})), domain)
    budget = _section(BudgetSpec, dict(data.get("budget", {})), "budget")
    if budget.until is not None:
        parse_until(budget.until, 0.0)
    validate = _validate(dict(data.get("validate", {})), base)
    out = Path(workdir) if workdir is not None else (base / str(head.get("workdir", f"{name}.distill")))
    return DistillSpec(name=name, workdir=out.resolve(), seed=int(head.get("seed", 0)), teacher=teacher,
                       domain=domain, data=data_spec, student=student, train=train, budget=budget,
                       validate=validate, source=source, refine=refine)


def check_teacher_elements(spec: DistillSpec, supported: frozenset[int] | None) -> None:
    """Refuse, at spec time, domain elements the teacher cannot compute (naming them)."""
    if supported is None:
        return
    missing = [el for el in spec.domain.elements if atomic_numbers[el] not in supported]
    if missing:
        raise SpecError(f"[domain] elements {missing} are not supported by the teacher {spec.teacher.model!r} "
                        f"(it supports {len(supported)} elements, e.g. "
                        f"{', '.join(chemical_symbols[z] for z in sorted(supported)[:8])} …)")
