"""Refine: a second, error-targeted data round after training stage 1 (``[refine]`` in the spec).

Rather than growing the data blindly, the stage-1 student (its exported EMA weights) is evaluated on the
held-out structures and each element gets its own error: the mean |F_student - F_teacher| over the force
components of *its* atoms (eV/Å) — an attribution a per-structure MAE cannot make for a multi-element cell.
The ``focus_fraction`` of the elements with the largest error (at least ``MIN_ATOMS`` held-out atoms each)
receive ``[refine] structures`` new structures, shared in proportion to their error and, per element, over
the universal sources in the spec's proportions: its elemental and expanded cells, AFLOW prototypes
decorated so that one species is the element, and pyxtal crystals of experimental compositions holding it
(dimers are left out: round 0 already scans every pair on a fixed grid).

Domain mode (seed structures): the stage-1 student itself runs NVT on the seeds' supercells at the domain
temperatures (``md_steps``, a frame every ``md_frame_every``), runs shared over the seeds in proportion to
each seed's held-out force error; the teacher labels the frames. The student so visits what *it* gets wrong
(a too high or too low barrier shows as configurations the teacher's MD did not sample), the classic
active-learning round; frames of a held-out run's conditions (seed, temperature, variant) stay held out.

The round's bases carry the element in their key, so their random streams — and therefore their structures —
differ from round 0's; the held-out split is round 0's (by composition), so a held-out composition stays
held out. Everything is fixed by the stage-1 weights and the seed: ``refine/focus.json`` records the
per-element errors and the weights' hash; shards go to ``refine/labels/`` with their hashes in the
manifest's ``"refine"`` entry, generated and labelled through the same batched paths as round 0.

``[refine] rounds = n`` repeats the round: round r (``refine-r/``, manifest entry and training stage of the
same name; round 1 keeps the plain ``refine``) is made from the student of round r-1's training stage, so
each round samples what the latest student gets wrong; its bases and MD runs are numbered apart from every
earlier round's.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols
from geodite_sim.workflows.distill import sources
from geodite_sim.workflows.distill.generate import PER_BASE, Base, shards_of
from geodite_sim.workflows.distill.shards import shard_name, write_record
from geodite_sim.workflows.distill.spec import DistillSpec, SpecError

from geodite_sim.progress import eta_after

#: Elements with fewer held-out atoms than this are not ranked (their error is too noisy to act on).
MIN_ATOMS = 8
REFINE_KINDS = ("elemental", "expanded", "prototype", "pyxtal")
#: Refine MD runs are numbered from here (their random streams and MD seeds differ from round 0's).
REFINE_RUN_OFFSET = 10_000
FOLDER = "refine"


def round_name(r: int) -> str:
    """Folder, manifest entry and training stage of refine round ``r`` (1-based): refine, refine-2, ..."""
    if r < 1:
        raise ValueError(f"refine rounds are numbered from 1, not {r}")
    return FOLDER if r == 1 else f"{FOLDER}-{r}"


def atom_force_errors(student, held: list, batch_atoms: int = 2048) -> list[np.ndarray | None]:
    """Per held-out sample: the mean |F_student - F_teacher| over each atom's components (eV/Å, shape (n,)),
    None where the student failed."""
    from geodite_sim.evaluate import evaluate

    out = evaluate([s.atoms for s in held], student, max_atoms=batch_atoms, allow_unsupported_elements=False)
    return [None if r["error"] is not None else np.abs(np.asarray(r["forces"]) - s.forces).mean(axis=1)
            for s, r in zip(held, out)]


def element_errors(student, held: list, batch_atoms: int = 2048,
                   errors: list[np.ndarray | None] | None = None) -> dict[str, dict]:
    """Per element of the held-out samples: held-out atoms and the force MAE over their components (eV/Å)."""
    errors = atom_force_errors(student, held, batch_atoms) if errors is None else errors
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for s, err in zip(held, errors):
        if err is None:
            continue
        for z in np.unique(s.atoms.numbers):
            mask = s.atoms.numbers == z
            total[int(z)] = total.get(int(z), 0.0) + float(err[mask].sum())
            count[int(z)] = count.get(int(z), 0) + int(mask.sum())
    return {chemical_symbols[z]: {"atoms": count[z], "forces_mae": total[z] / count[z]} for z in sorted(count)}


def seed_errors(held: list, errors: list[np.ndarray | None]) -> dict[int, dict]:
    """Per seed structure (domain mode; from the ``seed_md:`` / ``seed_static:`` tags): held-out atoms and force
    MAE (eV/Å)."""
    total: dict[int, float] = {}
    count: dict[int, int] = {}
    for s, err in zip(held, errors):
        tag = s.atoms.info.get("tag", "")
        if err is None or not tag.startswith(("seed_md:", "seed_static:")):
            continue
        i = int(tag.split(":")[1])
        total[i] = total.get(i, 0.0) + float(err.sum())
        count[i] = count.get(i, 0) + len(err)
    return {i: {"atoms": count[i], "forces_mae": total[i] / count[i]} for i in sorted(count)}


def choose_focus(errors: dict[str, dict], fraction: float, elements: tuple[str, ...]) -> dict[str, float]:
    """{element: force MAE} of the ``fraction`` of ``elements`` with the largest error (ties by symbol)."""
    ranked = sorted((el for el, e in errors.items() if el in elements and e["atoms"] >= MIN_ATOMS),
                    key=lambda el: (-errors[el]["forces_mae"], el))
    n = max(1, math.ceil(fraction * len(elements)))
    return {el: errors[el]["forces_mae"] for el in ranked[:n]}


def refine_plan(spec: DistillSpec, focus: dict[str, float], r: int = 1) -> list[Base]:
    """Round ``r``'s bases: ``spec.refine.structures`` candidates shared over the focus elements by error."""
    shares = {k: spec.data.sources.get(k, 0.0) for k in REFINE_KINDS}
    weight = sum(focus.values()) or 1.0
    allowed = set(spec.domain.elements)
    protos = sources.prototype_names(spec.data.max_atoms) if len(allowed) >= 2 else []
    comps = [i for i, c in enumerate(sources.experimental_compositions()) if set(c) <= allowed and len(c) >= 2]
    rng = np.random.default_rng([spec.seed, 11] if r == 1 else [spec.seed, 11, r])
    tag, first_copy = round_name(r), 1000 * (r - 1)  # later rounds: other keys, so other random streams
    out: list[Base] = []
    for el in sorted(focus):
        budget = spec.refine.structures * focus[el] / weight
        candidates = {"elemental": [(el, lat, tag) for lat in sources.LATTICES],
                      "expanded": [(el, lat, tag) for lat in ("fcc", "bcc", "sc")],
                      "prototype": [(p, el) for p in protos],
                      "pyxtal": [(i, el) for i in comps if el in sources.experimental_compositions()[i]]}
        norm = sum(shares[k] for k in REFINE_KINDS if candidates[k]) or 1.0  # kinds this element can have
        for kind in REFINE_KINDS:
            n = math.ceil(budget * shares[kind] / norm / PER_BASE[kind]) if candidates[kind] else 0
            order = rng.permutation(len(candidates[kind])) if n else []
            copies = [first_copy + i // len(order) for i in range(n)]
            out.extend(Base(kind, candidates[kind][order[i % len(order)]] + ((copies[i],) if copies[i] else ()))
                       for i in range(n))
    order = np.random.default_rng([spec.seed, 12] if r == 1 else [spec.seed, 12, r]).permutation(len(out))
    return [out[i] for i in order]


def domain_refine_plan(spec: DistillSpec, seed_focus: dict[int, float], r: int = 1) -> list[Base]:
    """Domain mode: NVT runs of the student (stage 1's, or round r-1's) on the seeds' supercells (frames labelled by the teacher),
    ``spec.refine.structures`` frames in all, runs shared over the seeds in proportion to their held-out error
    and cycled over the domain temperatures and supercell variants (the seed's composition, one vacancy)."""
    rs = spec.refine
    frames = rs.md_steps // rs.md_frame_every
    runs = math.ceil(rs.structures / frames)
    weight = sum(seed_focus.values()) or 1.0
    quota = {i: runs * e / weight for i, e in seed_focus.items()}
    share = {i: math.floor(q) for i, q in quota.items()}
    for i in sorted(quota, key=lambda i: (share[i] - quota[i], i))[: runs - sum(share.values())]:
        share[i] += 1  # largest remainders
    temps = spec.domain.temperatures
    first = REFINE_RUN_OFFSET * r  # run numbers of round r: other MD seeds than any other round's
    out = [Base("seed_md", (i, float(temps[j % len(temps)]), (j // len(temps)) % 5, first + j, frames))
           for i in sorted(share) for j in range(share[i])]
    order = np.random.default_rng([spec.seed, 13] if r == 1 else [spec.seed, 13, r]).permutation(len(out))
    return [out[k] for k in order]


def focus_of(job, stage1_weights: Path, r: int = 1) -> dict:
    """``<round>/focus.json``: the per-element held-out errors of the student that round ``r`` starts from
    (stage 1's for round 1, round r-1's stage otherwise) and the focus elements (cached)."""
    from geodite_sim.workflows.distill.shards import weights_hash

    from geodite_sim.model.checkpoint import load_checkpoint

    folder = job.workdir / round_name(r)
    path = folder / "focus.json"
    tag = weights_hash(stage1_weights)
    if path.exists():
        info = json.loads(path.read_text())
        if info["weights_hash"] != tag:
            raise SpecError(f"{path} was made from other student weights ({info['weights_hash']} vs {tag}): "
                            f"remove {folder} to redo the refine round")
        if info["fingerprint"] != job.spec.fingerprint("refine"):
            raise SpecError(f"{folder} holds a refine round of other [refine] settings: restore them, "
                            f"or remove the folder (and train/{round_name(r)}, the stages after it) to redo it")
        return info
    _, held = job.samples()
    if not held:
        raise SpecError("[refine] needs held-out structures (data heldout_fraction > 0) to find where the error is")
    job.progress(f"{round_name(r)}: the student on {len(held)} held-out structures, per-element force error …")
    per_atom = atom_force_errors(load_checkpoint(stage1_weights), held, job.spec.teacher.batch_atoms)
    errors = element_errors(None, held, errors=per_atom)
    focus = choose_focus(errors, job.spec.refine.focus_fraction, job.spec.domain.elements) \
        if job.spec.domain.elements else {}
    per_seed = seed_errors(held, per_atom) if job.spec.domain.seeds else {}
    info = {"weights_hash": tag, "per_element": errors, "focus": focus,
            "per_seed": {str(i): e for i, e in per_seed.items()},
            "fingerprint": job.spec.fingerprint("refine")}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, info)
    if focus:
        job.log(f"{round_name(r)}: largest held-out force errors (meV/Å): " +
                ", ".join(f"{el} {1e3 * e:.0f}" for el, e in sorted(focus.items(), key=lambda kv: -kv[1])))
    if per_seed:
        job.log(f"{round_name(r)}: held-out force error per seed (meV/Å): " +
                ", ".join(f"seed {i} {1e3 * e['forces_mae']:.0f}" for i, e in per_seed.items()))
    return info


def run_refine(job, stage1_weights: Path, r: int = 1) -> int:
    """Generate and label round ``r``'s shards not yet on disk (from the student ``stage1_weights``); returns the
    number of shards. Universal shards first (teacher-relaxed bases of the focus elements), then domain shards
    (the student's MD)."""
    from dataclasses import replace

    from geodite_sim.model.checkpoint import load_checkpoint

    info = focus_of(job, stage1_weights, r)
    per_shard = job.spec.data.structures_per_shard
    universal = shards_of(refine_plan(job.spec, info["focus"], r), per_shard) if info["focus"] else []
    seed_focus = {int(i): e["forces_mae"] for i, e in info.get("per_seed", {}).items()}
    domain = shards_of(domain_refine_plan(job.spec, seed_focus, r), per_shard) if seed_focus else []
    rs = job.spec.refine
    md_spec = replace(job.spec, data=replace(job.spec.data, md_steps=rs.md_steps, md_frame_every=rs.md_frame_every))
    name = round_name(r)
    folder = job.workdir / name
    split, seeds = job.split()
    shards = [(b, job.spec, None) for b in universal] + [(b, md_spec, "student") for b in domain]
    todo = [k for k in range(len(shards)) if not (folder / "labels" / shard_name(k)).exists()]
    student = load_checkpoint(stage1_weights) if any(shards[k][2] for k in todo) else None
    t0 = time.time()
    for n, k in enumerate(todo):
        job._check_time(f"{name}: before shard {k}")
        bases, spec, driver = shards[k]
        bases = [b for b in bases if not (b.kind.startswith("seed_") and seeds[b.key[0]] is None)]
        labelled, digest, _ = job.produce_shard(bases, split, seeds, folder, k, REFINE_RUN_OFFSET * 10 * r + k,
                                                spec=spec, driver=student if driver else None)
        job._record_shard(k, labelled, digest, section=name)
        job.progress(f"{name}: shard {k + 1}/{len(shards)} labelled ({len(labelled)} structures, "
                     f"{len(labelled.failures)} failed); {eta_after(n + 1, len(todo), time.time() - t0)}")
    return len(shards)
