"""One candidate shard: its bases built, relaxed by the teacher (one ``relax_many``), MD'd (one ``run_md``), cut.

:func:`generate_shard` is the only place generation calls the teacher; everything it draws comes from
each base's own random stream (:meth:`Base.rng`), so a shard does not depend on which process or
which other shards ran before it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from ase import Atoms
from geodite_sim.workflows.distill import sources
from geodite_sim.workflows.distill.generate import (
    DIMER_RANGE,
    EXPANSIONS,
    VOLUME_SCAN_COMPOUND,
    Base,
    Split,
    base_structure,
    make_shard_data,
    md_run_tag,
    mobile_ion,
    scaled,
    strain_rattle,
    supercell_repeats,
    supercell_within,
    too_close,
    vacancy,
)
from geodite_sim.workflows.distill.shards import ShardData
from geodite_sim.workflows.distill.spec import DistillSpec

NEEDS_RELAX = ("elemental", "prototype", "pyxtal")


def relax_seeds(spec: DistillSpec, teacher) -> tuple[list[Atoms], list[dict]]:
    """The domain's seed structures relaxed by the teacher (one batched ``relax_many``), and failures."""
    from geodite_sim.relax import relax_many

    if not spec.domain.seeds:
        return [], []
    results = relax_many(list(spec.domain.seeds), teacher, fmax=0.02, max_steps=300, relax_cell=True,
                         progress=False)
    out, failures = [], []
    for path, r in zip(spec.domain.seeds, results):
        if r.error is not None:
            failures.append({"tag": f"seed:{Path(path).name}", "error": r.error})
            out.append(None)
            continue
        a = r.structure
        out.append(Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc))
    return out, failures


class _Failed:
    """Stand-in result of a structure whose relaxation raised."""

    def __init__(self, error: str):
        self.error = error
        self.structure = None


def _relax(structures: list[Atoms], spec: DistillSpec, teacher) -> list[tuple[Atoms | None, str | None]]:
    from geodite_sim.relax import relax_many

    if not structures:
        return []
    if spec.data.relax_steps <= 0:
        return [(a, None) for a in structures]
    def run(group: list[Atoms]) -> list:
        return relax_many(group, teacher, fmax=spec.data.relax_fmax, max_steps=spec.data.relax_steps,
                          relax_cell=True, progress=False)

    try:
        res = run(structures)
    except (ValueError, RuntimeError) as exc:  # one system broke the batch (e.g. a non-finite cell): isolate it
        res = []
        for a in structures:
            try:
                res.extend(run([a]))
            except (ValueError, RuntimeError) as one:
                res.append(_Failed(f"{a.get_chemical_formula()}: {type(one).__name__}: {one}"))
        del exc
    out = []
    for r in res:
        if r.error is not None:
            out.append((None, r.error))
        else:
            a = r.structure
            out.append((Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc), None))
    return out


def _variants(base: Base, start: Atoms, spec: DistillSpec, rng: np.random.Generator) -> list[tuple[Atoms, str]]:
    d = spec.data
    tag = f"{base.kind}:" + ":".join(str(k) for k in base.key)
    if base.kind == "elemental":
        jitter = rng.uniform(0.98, 1.02, len(d.volume_scan))  # repeated bases do not duplicate structures
        out = [(scaled(start, f * j), f"{tag}:v{f:g}") for f, j in zip(d.volume_scan, jitter)]
        out += [(strain_rattle(supercell_within(start, d.max_atoms, rng), rng, d.strain, d.rattle), f"{tag}:sr{i}")
                for i in range(2)]
        return out
    if base.kind == "expanded":
        return [(strain_rattle(scaled(start, f), rng, 0.0, (0.01, 0.05)), f"{tag}:x{f:g}") for f in EXPANSIONS]
    if base.kind in ("prototype", "pyxtal"):
        out = [(start, f"{tag}:relaxed")] + [(scaled(start, f), f"{tag}:v{f:g}") for f in VOLUME_SCAN_COMPOUND]
        out += [(strain_rattle(supercell_within(start, d.max_atoms, rng), rng, d.strain, d.rattle), f"{tag}:sr{i}")
                for i in range(3)]
        return out
    if base.kind == "seed_static":
        cell = _seed_supercell(base, start, spec, rng)
        return [(strain_rattle(cell, rng, d.strain, d.rattle), f"{tag}:sr{i}") for i in range(5)]
    raise ValueError(f"no variants for {base.kind}")


def _seed_supercell(base: Base, seed_atoms: Atoms, spec: DistillSpec, rng: np.random.Generator) -> Atoms:
    """Variant 0: the seed's composition in a random supercell size; v >= 1: one mobile-ion vacancy in size v-1."""
    reps = supercell_repeats(seed_atoms, *spec.data.supercell_atoms)
    variant = base.key[2] if base.kind == "seed_md" else base.key[1]
    if variant == 0:
        return seed_atoms.repeat(reps[int(rng.integers(len(reps)))])
    cell = seed_atoms.repeat(reps[(variant - 1) % len(reps)])
    return vacancy(cell, mobile_ion(seed_atoms, spec.domain.mobile), rng)


def _dimers(base: Base) -> list[tuple[Atoms, str]]:
    a, b = base.key[0], base.key[1]
    rsum = sources.rcov(a) + sources.rcov(b)
    return [(sources.dimer(a, b, f * rsum), f"dimer:{a}:{b}:{f:.3f}")
            for f in np.linspace(*DIMER_RANGE, 8)]


def _md_frames(bases: list[Base], starts: list[Atoms], spec: DistillSpec, teacher, workdir: Path,
               shard_index: int) -> tuple[list[tuple[Atoms, str]], list[dict]]:
    """Teacher NVT (Langevin) of every MD base of the shard in one ``run_md``; frames after the first."""
    from geodite_sim.md import run_md
    from geodite_sim.trajectory import read_trajectory

    if not bases:
        return [], []
    d = spec.data
    path = workdir / "tmp" / f"md-{shard_index:05d}.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:md:{shard_index}".encode()).digest()[:4], "little")
    res = run_md(starts, teacher, ensemble="nvt_langevin", temperature=[b.key[1] for b in bases],
                 timestep=d.md_timestep, steps=d.md_steps, trajectory=str(path), frame_every=d.md_frame_every,
                 friction=0.02, seed=seed, progress=False)
    out, failures = [], []
    for i, (b, r) in enumerate(zip(bases, res)):
        tag = md_run_tag(b)
        if r.error is not None:
            failures.append({"tag": tag, "error": f"teacher MD stopped: {r.error}"})
        frames = read_trajectory(path, system=i) if r.n_steps > 0 else []
        for k, a in enumerate(frames[1:]):
            out.append((Atoms(a.numbers, a.positions, cell=a.cell, pbc=a.pbc), f"{tag}:f{k + 1}"))
    path.unlink(missing_ok=True)
    return out, failures


def generate_shard(spec: DistillSpec, teacher, bases: list[Base], split: Split, relaxed_seeds: list[Atoms],
                   workdir: Path, shard_index: int) -> ShardData:
    """Candidates of one shard (unlabelled), with the split and the reasons of dropped bases."""
    failures: list[dict] = []
    made: list[tuple[Atoms, str]] = []
    to_relax: list[tuple[Base, Atoms]] = []
    md_bases, md_starts = [], []
    for b in bases:
        tag = f"{b.kind}:" + ":".join(str(k) for k in b.key)
        if b.kind == "isolated":
            from geodite_sim.workflows.distill.teacher import isolated_atoms

            made.append((isolated_atoms([sources.atomic_numbers[b.key[0]]])[0], tag))
            continue
        if b.kind == "dimer":
            made.extend(_dimers(b))
            continue
        start = base_structure(b, spec, relaxed_seeds)
        if start is None:
            failures.append({"tag": tag, "error": "the structure library could not build this base"})
            continue
        if b.kind in NEEDS_RELAX:
            to_relax.append((b, start))
        elif b.kind == "seed_md":
            md_bases.append(b)
            md_starts.append(_seed_supercell(b, start, spec, b.rng(spec.seed)))
        else:
            made.extend(_variants(b, start, spec, b.rng(spec.seed)))
    for (b, _), (relaxed, error) in zip(to_relax, _relax([s for _, s in to_relax], spec, teacher)):
        tag = f"{b.kind}:" + ":".join(str(k) for k in b.key)
        if relaxed is None:
            failures.append({"tag": tag, "error": f"teacher relaxation failed: {error}"})
            continue
        made.extend(_variants(b, relaxed, spec, b.rng(spec.seed)))
    frames, md_fail = _md_frames(md_bases, md_starts, spec, teacher, workdir, shard_index)
    made.extend(frames)
    failures.extend(md_fail)
    kept = []
    for a, tag in made:
        if too_close(a):
            failures.append({"tag": tag, "error": "generated structure has atoms closer than 0.6 x covalent radii"})
        else:
            kept.append((a, tag))
    return make_shard_data([a for a, _ in kept], [t for _, t in kept], split, failures)
