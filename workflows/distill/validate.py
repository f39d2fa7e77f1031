"""Validate the student against the teacher; every model call goes through the engine's batched paths.

- held-out compositions: energy (eV/atom), force (eV/Å), stress (eV/Å^3) MAE, overall and per element group;
- relaxed volume per atom of held-out crystals (student vs teacher, ``relax_many`` fmax 0.01);
- ``[validate] structures``: the user-facing structures relaxed by both (none may blow up or collapse);
- Delta test (``ase.collections.dcdft``, WIEN2k PBE volumes) within the student's elements, teacher beside it;
- diatomics metrics (student and teacher, the domain's elements);
- speed per atom-step in the engine (NVE through ``run_md``, student and teacher alternating, same structures);
- domain mode: student vs teacher NVT per seed at the first domain temperature — RDF overlap per element
  pair (teacher trajectory as reference) and tracer diffusion coefficients side by side (with 95 % intervals;
  "not determined" where the run resolves no diffusion).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

#: Element groups of the per-group table.
GROUPS = {
    "alkali": ["Li", "Na", "K", "Rb", "Cs"], "alkaline earth": ["Be", "Mg", "Ca", "Sr", "Ba"],
    "3d metals": ["Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn"],
    "4d metals": ["Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd"],
    "5d metals": ["Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg"],
    "lanthanides": ["La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu"],
    "actinides": ["Ac", "Th", "Pa", "U", "Np", "Pu"],
    "p-block metals": ["Al", "Ga", "In", "Sn", "Tl", "Pb", "Bi"],
    "metalloids": ["B", "Si", "Ge", "As", "Sb", "Te"],
    "nonmetals": ["H", "C", "N", "O", "P", "S", "Se"],
    "halogens": ["F", "Cl", "Br", "I"], "noble gases": ["He", "Ne", "Ar", "Kr", "Xe"],
}


#: Validation MD writes a checkpoint every this many steps (a stopped session resumes from the last one).
MD_CHECKPOINT_EVERY = 200

def heldout_errors(student, held: list, batch_atoms: int = 2048) -> dict:
    """MAE of the student vs the teacher's labels on the held-out samples (overall and per group) + raw pairs."""
    from geodite_sim.evaluate import evaluate

    out = evaluate([s.atoms for s in held], student, max_atoms=batch_atoms, allow_unsupported_elements=False)
    e_t, e_s, f_err, s_err, groups, elements = [], [], [], [], [], set()
    f_pairs = []
    failed = 0
    for s, r in zip(held, out):
        if r["error"] is not None:
            failed += 1
            continue
        n = len(s.atoms)
        e_t.append(s.energy / n)
        e_s.append(r["energy"] / n)
        f_err.append(np.abs(r["forces"] - s.forces).mean())
        f_pairs.append((s.forces.ravel(), np.asarray(r["forces"]).ravel()))
        s_err.append(np.abs(r["stress"] - s.stress).mean() if s.stress is not None else np.nan)
        syms = set(s.atoms.get_chemical_symbols())
        elements |= syms
        groups.append({g for g, members in GROUPS.items() if syms & set(members)})
    e_t, e_s = np.array(e_t), np.array(e_s)
    e_err = np.abs(e_s - e_t)
    f_err, s_err = np.array(f_err), np.array(s_err)
    per_group = {}
    for g in GROUPS:
        idx = [i for i, gs in enumerate(groups) if g in gs]
        if idx:
            per_group[g] = {"structures": len(idx), "energy_mae_meV_per_atom": 1e3 * float(e_err[idx].mean()),
                            "forces_mae_meV_per_A": 1e3 * float(f_err[idx].mean()),
                            "stress_mae": float(np.nanmean(s_err[idx])) if np.isfinite(s_err[idx]).any() else None}
    nat = sum(len(p[0]) for p in f_pairs)
    return {
        "structures": int(len(e_err)), "failed": failed, "elements": len(elements),
        "energy_mae_meV_per_atom": 1e3 * float(e_err.mean()) if len(e_err) else None,
        "forces_mae_meV_per_A": 1e3 * float(np.sum([np.abs(a - b).sum() for a, b in f_pairs]) / max(nat, 1)),
        "stress_mae": float(np.nanmean(s_err)) if np.isfinite(s_err).any() else None,
        "per_group": per_group,
        "_parity": {"energy": (e_t, e_s), "forces": (np.concatenate([a for a, _ in f_pairs] or [np.zeros(0)]),
                                                     np.concatenate([b for _, b in f_pairs] or [np.zeros(0)]))},
    }


def structure_key(atoms: Atoms) -> str:
    """sha256 (16 hex) of a structure's numbers, positions, cell and pbc (float64 bytes)."""
    h = hashlib.sha256()
    for a in (np.asarray(atoms.numbers, np.int64), np.asarray(atoms.positions, np.float64),
              np.asarray(atoms.cell[:], np.float64), np.asarray(atoms.pbc, bool)):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def relaxed_volumes(structures: list[Atoms], model, cache: Path | None = None) -> list[float | None]:
    """Relaxed V/atom (Å³; FIRE + cell, fmax 0.01, ≤ 500 steps, one batched call), None where it failed.

    ``cache``: a JSON file of earlier results of this model (by :func:`structure_key`); only the structures
    missing from it are relaxed. The teacher's relaxations do not depend on the student, so a new student
    reuses them — on the default model's validation set that is hours of SevenNet-0 time. A cache made by
    another model (``model_fingerprint``) is started afresh."""
    from geodite_sim.model.contract import model_fingerprint
    from geodite_sim.relax import relax_many

    keys = [structure_key(a) for a in structures]
    tag = model_fingerprint(model)
    known: dict[str, float | None] = {}
    if cache is not None and cache.exists():
        stored = json.loads(cache.read_text())
        known = stored["volumes"] if stored.get("model") == tag else {}
    todo = [i for i, k in enumerate(keys) if k not in known]
    if todo:
        res = relax_many([structures[i] for i in todo], model, fmax=0.01, max_steps=500, relax_cell=True,
                         progress=False)
        for i, r in zip(todo, res):
            known[keys[i]] = r.structure.get_volume() / len(r.structure) if r.error is None else None
        if cache is not None:
            from geodite_sim.workflows.distill.shards import write_record

            cache.parent.mkdir(parents=True, exist_ok=True)
            write_record(cache, {"model": tag, "volumes": known})
    return [known[k] for k in keys]


def relaxed_volume_errors(student, teacher, crystals: list[Atoms], teacher_cache: Path | None = None) -> dict:
    """Relaxed V/atom of the student vs the teacher's, per crystal, and the share within 3 %."""
    vs, vt = relaxed_volumes(crystals, student), relaxed_volumes(crystals, teacher, teacher_cache)
    rows = []
    for a, s, t in zip(crystals, vs, vt):
        if s is None or t is None:
            rows.append({"formula": a.get_chemical_formula(), "error": "relaxation failed"})
            continue
        rows.append({"formula": a.get_chemical_formula(), "student": s, "teacher": t, "rel": s / t - 1})
    rel = np.array([r["rel"] for r in rows if "rel" in r])
    return {"crystals": len(crystals), "compared": int(len(rel)),
            "within_3pct": int((np.abs(rel) <= 0.03).sum()),
            "median_abs_pct": 100 * float(np.median(np.abs(rel))) if len(rel) else None, "rows": rows}


#: A student relaxation "blows up or collapses" when its volume leaves this range x the teacher's.
SANE_VOLUME_RATIO = (0.75, 1.33)


def sanity_relaxations(student, teacher, files: list[str], teacher_cache: Path | None = None) -> dict:
    """The structures users meet first (demo, screening example, SSE cells) relaxed by both models (fmax 0.01):
    V_student / V_teacher per structure; a student relaxation that fails or leaves :data:`SANE_VOLUME_RATIO`
    blows up or collapses. Unreadable files and unsupported elements get their own row, never a crash."""
    from ase.io import read

    from geodite_sim.model.contract import supported_elements

    allowed = supported_elements(student)
    rows: list[dict] = []
    structures: list[Atoms] = []
    for path in files:
        name = Path(path).name
        try:
            atoms = read(path)
        except Exception as exc:  # noqa: BLE001 - reported per file
            rows.append({"file": name, "skipped": f"unreadable: {exc}"})
            continue
        missing = sorted({s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers)
                          if allowed is not None and int(z) not in allowed})
        if missing:
            rows.append({"file": name, "skipped": f"elements {missing} outside the student's"})
            continue
        rows.append({"file": name, "atoms": len(atoms)})
        structures.append(atoms)
    vs, vt = relaxed_volumes(structures, student), relaxed_volumes(structures, teacher, teacher_cache)
    lo, hi = SANE_VOLUME_RATIO
    for row, s, t in zip((r for r in rows if "skipped" not in r), vs, vt):
        row.update(student=s, teacher=t, ratio=s / t if s is not None and t is not None else None)
        row["blown"] = s is None or (row["ratio"] is not None and not lo <= row["ratio"] <= hi)
    compared = [r for r in rows if r.get("ratio") is not None]
    return {"structures": len(structures), "skipped": sum("skipped" in r for r in rows),
            "blown": sum(bool(r.get("blown")) for r in rows),
            "within_5pct": sum(abs(r["ratio"] - 1) <= 0.05 for r in compared),
            "within_10pct": sum(abs(r["ratio"] - 1) <= 0.10 for r in compared), "compared": len(compared),
            "rows": rows}


def dcdft_volumes(student, teacher, teacher_cache: Path | None = None) -> dict:
    """Delta-test crystals whose elements the student supports: relaxed V/atom vs WIEN2k, student and teacher."""
    from ase.collections import dcdft

    from geodite_sim.model.contract import supported_elements

    allowed = supported_elements(student)
    names = [n for n in dcdft.names if allowed is None or atomic_numbers[n] in allowed]
    crystals = [dcdft[n] for n in names]
    ref = np.array([dcdft.data[n]["wien2k_volume"] for n in names])
    vs, vt = relaxed_volumes(crystals, student), relaxed_volumes(crystals, teacher, teacher_cache)

    def summary(v):
        ok = [i for i, x in enumerate(v) if x is not None]
        rel = np.array([v[i] / ref[i] - 1 for i in ok])
        return {"accepted": len(ok), "median_abs_pct": 100 * float(np.median(np.abs(rel))) if len(rel) else None,
                "within_5pct": int((np.abs(rel) <= 0.05).sum())}

    rows = [{"element": n, "wien2k": float(r), "student": s, "teacher": t} for n, r, s, t in zip(names, ref, vs, vt)]
    return {"elements": len(names), "student": summary(vs), "teacher": summary(vt), "rows": rows}


def diatomics(student, teacher, elements: list[str], out_dir: Path) -> dict:
    from geodite_sim.workflows.properties import run_diatomics

    rs = run_diatomics(student, elements, out_dir=out_dir / "student", plots=False)
    rt = run_diatomics(teacher, elements, out_dir=out_dir / "teacher", plots=False)
    return {"elements": elements, "student": rs.means, "teacher": rt.means}


def speed(student, teacher, structures: list[Atoms], steps: int = 20, rounds: int = 2) -> dict:
    """Atom-steps per second of NVE through ``run_md``, student and teacher alternating (best of rounds)."""
    from geodite_sim.md import run_md

    n_atoms = sum(len(a) for a in structures)
    best = {"student": 0.0, "teacher": 0.0}
    for _ in range(rounds):
        for name, model in (("student", student), ("teacher", teacher)):
            t0 = time.perf_counter()
            run_md(structures, model, ensemble="nve", temperature=300.0, timestep=1.0, steps=steps, progress=False)
            best[name] = max(best[name], n_atoms * steps / (time.perf_counter() - t0))
    return {"atom_steps_per_s": best, "speedup": best["student"] / best["teacher"], "structures": len(structures),
            "atoms": n_atoms, "steps": steps}


def md_comparison(student, teacher, seeds: list[Atoms], temperature: float, steps: int, timestep: float,
                  workdir: Path) -> dict:
    """Student vs teacher NVT (NHC) per seed supercell: RDF overlap per pair, tracer D side by side.

    The check's own resolution is measured beside it: the student run again from other momenta
    (``student-repeat``, seed 2; the student is cheap) scores what an exact model would against an
    independent reference of this length and cell size, and the teacher's first half against its second half
    shows how far its own RDFs still move."""
    from geodite_sim.analysis import compare_rdfs, load_frames
    from geodite_sim.analysis.transport import TransportSettings, analyse_transport
    from geodite_sim.md import run_md

    out = {}
    runs = {"teacher": (teacher, 1), "student": (student, 1), "student-repeat": (student, 2)}
    paths = {name: workdir / f"md-{name}.h5" for name in runs}
    results = {}
    for name, (model, seed) in runs.items():
        ckpt = workdir / f"md-{name}.ckpt"
        if not ckpt.exists():  # a trajectory without its checkpoint is from an older run: start afresh
            paths[name].unlink(missing_ok=True)
        results[name] = run_md(seeds, model, ensemble="nvt_nhc", temperature=temperature, timestep=timestep,
                               steps=steps, trajectory=str(paths[name]), frame_every=10, seed=seed, progress=False,
                               checkpoint=str(ckpt), checkpoint_every=MD_CHECKPOINT_EVERY, restart=True)
    discard = 0.2 * steps * timestep
    for i, atoms in enumerate(seeds):
        label = atoms.get_chemical_formula()
        row: dict = {"atoms": len(atoms), "temperature": temperature, "steps": steps,
                     "student_error": results["student"][i].error, "teacher_error": results["teacher"][i].error}
        fr = {n: load_frames(str(paths[n]), system=i, discard_fs=discard) for n in paths}
        rdfs = {n: f.rdf() for n, f in fr.items()}
        cmp = compare_rdfs(rdfs["teacher"], rdfs["student"])
        row["rdf_scores"] = {k: float(v) for k, v in cmp.pair_scores.items()}
        row["rdf_min_score"] = float(cmp.score)  # the minimum over pairs; pairs with no distance in range (NaN) ignored
        repeat = compare_rdfs(rdfs["student-repeat"], rdfs["student"])  # resolution: same model, other momenta
        row["student_repeat_scores"] = {k: float(v) for k, v in repeat.pair_scores.items()}
        row["student_repeat_min_score"] = float(repeat.score)
        first, second = fr["teacher"].halves()
        row["teacher_halves_min_score"] = float(compare_rdfs(first.rdf(), second.rdf()).score)
        fr.pop("student-repeat")
        try:  # tracer D with its 95 % interval; None where not determined (no diffusion resolved)
            settings = TransportSettings(discard_fs=discard)
            d = {n: analyse_transport(str(paths[n]), system=i, settings=settings).tracer
                 for n in ("teacher", "student")}
            row["D_cm2_per_s"] = {el: {**{n: d[n][el].D_cm2_per_s for n in d},
                                       **{f"{n}_ci": d[n][el].ci_cm2_per_s and list(d[n][el].ci_cm2_per_s)
                                          for n in d},
                                       **{f"{n}_note": d[n][el].reason for n in d}} for el in d["teacher"]}
        except ValueError as exc:  # too short a run for an MSD fit: said in the report, not a crash
            row["D_cm2_per_s"] = {}
            row["D_note"] = f"not determined: {exc}".replace(f"{workdir}/", "")  # the same wherever the run is
        out[f"{i}:{label}"] = row
    return out


def long_md(student, seeds: list[Atoms], temperature: float, picoseconds: float, timestep: float,
            workdir: Path) -> dict:
    """The student alone: NVT (NHC) for ``picoseconds`` per seed supercell, the stability monitors on
    (checkpointed in ``workdir``: a run stopped by the session resumes bit for bit)."""
    from geodite_sim.md import run_md

    steps = int(round(picoseconds * 1000 / timestep))
    ckpt = workdir / "long-md.ckpt"
    resumed = ckpt.exists()
    t0 = time.perf_counter()
    res = run_md(seeds, student, ensemble="nvt_nhc", temperature=temperature, timestep=timestep, steps=steps,
                 monitors=True, seed=2, progress=False, checkpoint=str(ckpt), checkpoint_every=MD_CHECKPOINT_EVERY,
                 restart=True)
    wall = time.perf_counter() - t0
    return {"picoseconds": picoseconds, "steps": steps, "temperature": temperature, "wall_s": wall,
            "resumed_from_checkpoint": resumed,
            "runs": [{"system": a.get_chemical_formula(), "atoms": len(a), "steps_done": r.n_steps,
                      "stopped": r.error is not None, "reason": r.error, "final_temperature": r.temperature}
                     for a, r in zip(seeds, res)]}


def pick_crystals(held: list, n: int) -> list[Atoms]:
    """Up to ``n`` held-out periodic crystals, preferring teacher-relaxed bases, spread over compositions."""
    seen, picks = set(), []
    ranked = sorted(held, key=lambda s: (not s.atoms.info.get("tag", "").endswith(":relaxed"),
                                         s.atoms.info.get("tag", "")))
    for s in ranked:
        comp = s.atoms.get_chemical_formula(mode="reduce")
        if s.atoms.pbc.all() and comp not in seen:
            seen.add(comp)
            picks.append(Atoms(s.atoms.numbers, s.atoms.positions, cell=s.atoms.cell, pbc=True))
        if len(picks) >= n:
            break
    return picks


def element_symbols(model) -> list[str]:
    from geodite_sim.model.contract import supported_elements

    return [chemical_symbols[z] for z in sorted(supported_elements(model) or [])]
