"""Validate → report: run the checks of :mod:`.validate`, write ``report/`` (Markdown, JSON, PNGs), update the card.

Each check's result is cached in ``report/checks/<name>.json`` so a validation interrupted by the
wall-clock guard resumes with the checks it has not done.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from geodite_sim.workflows.distill import validate as V
from geodite_sim.workflows.distill.card import write_card
from geodite_sim.workflows.distill.shards import weights_hash, write_record

from geodite_sim.progress import eta_after


def _cached(folder: Path, name: str, compute, job) -> dict:
    path = folder / "checks" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    job._check_time(f"validate: before {name}")
    job.progress(f"validate: {name} …")
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_record(path, result)
    return result


def _parity_png(path: Path, pairs: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (name, unit) in zip(axes, (("energy", "eV/atom"), ("forces", "eV/Å"))):
        t, s = (np.asarray(x) for x in pairs[name])
        ax.scatter(t, s, s=3, alpha=0.4)
        lo, hi = (float(min(t.min(), s.min())), float(max(t.max(), s.max()))) if len(t) else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.set_xlabel(f"teacher {name} ({unit})")
        ax.set_ylabel(f"student {name} ({unit})")
        ax.set_title(f"held-out {name}: MAE {np.abs(t - s).mean() * 1e3:.1f} m{unit}" if len(t) else name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_validation(job) -> dict:
    """All checks for the student at ``<workdir>/student.ckpt``; returns the headline metrics."""
    from geodite_sim.model.checkpoint import load_checkpoint

    spec, folder = job.spec, job.workdir / "report"
    student_path = job.workdir / "student.ckpt"
    student = load_checkpoint(student_path, dtype=torch.float64 if spec.train.dtype == "float64" else torch.float32)
    student.name = f"student:{spec.name}"
    teacher = job.teacher
    tag = weights_hash(student_path)
    stamp = folder / "checks" / "weights.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("weights_hash") != tag:
        for f in [*(folder / "checks").glob("*.json"), *folder.glob("*.ckpt"), *folder.glob("md-*.h5")]:
            if not f.name.startswith("md-teacher."):  # the teacher's MD does not depend on the student
                f.unlink()  # checks, MD checkpoints and trajectories of other weights
    stamp.parent.mkdir(parents=True, exist_ok=True)
    if not stamp.exists():
        write_record(stamp, {"weights_hash": tag})
    _, held = job.samples()

    def heldout():
        r = V.heldout_errors(student, held, spec.teacher.batch_atoms)
        _parity_png(folder / "parity.png", r.pop("_parity"))
        return r

    checks = {"heldout": _cached(folder, "heldout", heldout, job)}
    teacher_volumes = folder / "teacher-volumes.json"  # the teacher's relaxations survive a new student
    seeds = [a for a in job.relaxed_seeds() if a is not None]
    # domain mode's MD comparison first: it decides most (the teacher's trajectory survives a new student)
    if seeds and spec.validate.md_steps > 0:
        from geodite_sim.workflows.distill.generate import supercell_repeats

        cells = [a.repeat(supercell_repeats(a, *spec.data.supercell_atoms)[-1]) for a in seeds]
        checks["md"] = _cached(folder, "md", lambda: V.md_comparison(
            student, teacher, cells, spec.domain.temperatures[0], spec.validate.md_steps,
            spec.validate.md_timestep, folder), job)
    crystals = V.pick_crystals(held, spec.validate.relax_crystals)
    if crystals:
        checks["volumes"] = _cached(folder, "volumes", lambda: V.relaxed_volume_errors(
            student, teacher, crystals, teacher_volumes), job)
    if spec.validate.structures:
        files = validation_files(spec)
        checks["sanity"] = _cached(folder, "sanity", lambda: V.sanity_relaxations(student, teacher, files,
                                                                                  teacher_volumes), job)
    if spec.validate.dcdft:
        checks["dcdft"] = _cached(folder, "dcdft", lambda: V.dcdft_volumes(student, teacher, teacher_volumes), job)
    elements = V.element_symbols(student)
    dia_elements = [e for e in elements if e in spec.domain.elements or any(
        e in a.get_chemical_symbols() for a in seeds)][:24]
    if dia_elements:
        checks["diatomics"] = _cached(folder, "diatomics", lambda: V.diatomics(student, teacher, dia_elements,
                                                                               folder / "diatomics"), job)
    speed_set = (seeds or crystals or [s.atoms for s in held])[: spec.validate.speed_structures]
    if speed_set:
        checks["speed"] = _cached(folder, "speed", lambda: V.speed(student, teacher, speed_set), job)
    if seeds and spec.validate.long_md_ps > 0:
        from geodite_sim.workflows.distill.generate import supercell_repeats

        cells = [a.repeat(supercell_repeats(a, *spec.data.supercell_atoms)[-1]) for a in seeds]
        checks["long_md"] = _cached(folder, "long_md", lambda: V.long_md(
            student, cells, spec.domain.temperatures[0], spec.validate.long_md_ps, spec.validate.md_timestep,
            folder), job)
    metrics = headline(checks)
    write_record(folder / "report.json", {"weights_hash": tag, "metrics": metrics, "checks": checks,
                                         "manifest": job.manifest().get("data_hash")})
    (folder / "report.md").write_text(markdown(job, checks, metrics))
    write_card(job, student, student_path, metrics)
    job.log(f"validate: report in {folder / 'report.md'}")
    return metrics


def validation_files(spec) -> list[str]:
    """The ``[validate] structures`` files (globs expanded, sorted, each once)."""
    import glob

    return sorted({f for pattern in spec.validate.structures for f in glob.glob(pattern)})


def run_teacher_checks(job, chunk: int = 16) -> dict:
    """The teacher's side of the validation, which needs no student (stage ``teacher-checks``; run it beside
    training): relaxed volumes of the held-out crystals, the ``[validate] structures`` and (``dcdft = true``)
    the Delta-test crystals of the domain's elements, into ``report/teacher-volumes.json``. In chunks of
    ``chunk`` structures, the cache saved after each, the wall-clock guard checked between them."""
    from ase.collections import dcdft
    from ase.io import read

    spec = job.spec
    _, held = job.samples()
    structures = list(V.pick_crystals(held, spec.validate.relax_crystals))
    for path in validation_files(spec):
        try:
            structures.append(read(path))
        except Exception:  # noqa: BLE001 - the validation reports unreadable files itself
            continue
    if spec.validate.dcdft:
        structures += [dcdft[n] for n in dcdft.names if n in spec.domain.elements]
    cache = job.workdir / "report" / "teacher-volumes.json"
    t0, n_done = time.time(), 0
    for i in range(0, len(structures), chunk):
        job._check_time(f"teacher-checks: {i} of {len(structures)} structures relaxed")
        part = structures[i:i + chunk]
        V.relaxed_volumes(part, job.teacher, cache)
        n_done += len(part)
        job.progress(f"teacher-checks: {n_done}/{len(structures)} structures relaxed by the teacher; "
                     f"{eta_after(n_done, len(structures), time.time() - t0)}")
    return {"structures": len(structures), "cache": str(cache)}


def run_interim_checks(job) -> dict:
    """Physics checks of the student *while it trains* (stage ``interim-checks``, beside training): the EMA weights
    of the latest training checkpoint relax the held-out crystals and (``dcdft = true``) the Delta-test crystals;
    their volumes are compared with the teacher's from ``teacher-checks`` (the teacher runs nothing here) and with
    WIEN2k. Each call appends a row to ``report/interim.json``; returns it."""
    from ase.collections import dcdft
    from geodite_sim.workflows.distill.spec import SpecError
    from geodite_sim.workflows.distill.train import latest_checkpoint

    from geodite_sim.model import load_model
    from geodite_sim.model.contract import model_fingerprint

    spec = job.spec
    stage, ckpt = latest_checkpoint(job)
    _, held = job.samples()
    crystals = V.pick_crystals(held, spec.validate.relax_crystals)
    dc = [dcdft[n] for n in dcdft.names if n in spec.domain.elements] if spec.validate.dcdft else []
    cache = job.workdir / "report" / "teacher-volumes.json"
    record = json.loads(cache.read_text()) if cache.exists() else {}
    stored = record.get("volumes", {}) if record.get("model") == model_fingerprint(job.teacher) else {}
    missing = sum(V.structure_key(a) not in stored for a in [*crystals, *dc])
    if missing:
        raise SpecError(f"interim-checks compares with the teacher's cached volumes, but {missing} of "
                        f"{len(crystals) + len(dc)} are not in {cache}: run --stages teacher-checks first")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    training = state["geodite_training"]
    student = load_model(str(ckpt), use_ema=True)
    t0 = time.time()
    row = {"stage": stage, "epochs": round(training["global_step"] / max(1, _steps_per_epoch(training)), 2),
           "global_step": training["global_step"], "weights": "ema",
           "volumes": V.relaxed_volume_errors(student, job.teacher, crystals, cache) if crystals else None}
    if dc:
        d = V.dcdft_volumes(student, job.teacher, cache)
        row["dcdft"] = {"student": d["student"], "teacher": d["teacher"], "elements": d["elements"]}
    if row["volumes"] is not None:
        row["volumes"].pop("rows")
    row["wall_s"] = time.time() - t0
    path = job.workdir / "report" / "interim.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    write_record(path, [*rows, row])
    return row


def interim_summary(row: dict) -> str:
    """One line of an interim-checks row."""
    parts = [f"interim-checks: {row['stage']} after {row['epochs']} epochs (EMA weights)"]
    v = row.get("volumes")
    if v:
        parts.append(f"held-out crystals within 3 % of the teacher {v['within_3pct']}/{v['compared']} (median "
                     f"{v['median_abs_pct']:.2f} %)")
    d = row.get("dcdft")
    if d:
        s, t = d["student"], d["teacher"]
        parts.append(f"dcdft vs WIEN2k: {s['accepted']} accepted, median {s['median_abs_pct']:.2f} %, "
                     f"{s['within_5pct']} within 5 % (teacher {t['accepted']}, {t['median_abs_pct']:.2f} %, "
                     f"{t['within_5pct']})")
    return "; ".join(parts)


def _steps_per_epoch(training: dict) -> int:
    """Steps per epoch of a training checkpoint's stage (its total steps over its epochs)."""
    return int(training["total_steps"]) // max(1, int(training["train_config"]["epochs"]))


def headline(checks: dict) -> dict:
    h = checks["heldout"]
    out = {"heldout_structures": h["structures"], "heldout_elements": h["elements"],
           "energy_mae_meV_per_atom": h["energy_mae_meV_per_atom"], "forces_mae_meV_per_A": h["forces_mae_meV_per_A"],
           "stress_mae_eV_per_A3": h["stress_mae"]}
    if "volumes" in checks:
        v = checks["volumes"]
        out["volume_within_3pct"] = f"{v['within_3pct']}/{v['compared']}"
    if "sanity" in checks:
        out["user_structures_blown"] = f"{checks['sanity']['blown']}/{checks['sanity']['structures']}"
    if "dcdft" in checks:
        d = checks["dcdft"]
        out["dcdft_median_abs_pct"] = d["student"]["median_abs_pct"]
        out["dcdft_within_5pct"] = f"{d['student']['within_5pct']}/{d['student']['accepted']}"
        out["dcdft_teacher_median_abs_pct"] = d["teacher"]["median_abs_pct"]
    if "speed" in checks:
        out["speedup_vs_teacher"] = checks["speed"]["speedup"]
    if "md" in checks:
        scores = [r["rdf_min_score"] for r in checks["md"].values() if not np.isnan(r["rdf_min_score"])]
        out["md_rdf_min_score"] = min(scores) if scores else float("nan")
        for key in ("student_repeat_min_score", "teacher_halves_min_score"):
            own = [r[key] for r in checks["md"].values() if key in r]
            if own:
                out[f"md_rdf_{key}"] = min(own)
    if "long_md" in checks:
        runs = checks["long_md"]["runs"]
        out["long_md_stopped"] = f"{sum(r['stopped'] for r in runs)}/{len(runs)}"
    return out


def _f(x, fmt=".3g") -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, fmt)


def _d(entry: dict, who: str) -> str:
    """A tracer D (cm²/s) with its interval, or "n.d." (not determined: the run resolves no diffusion)."""
    d, ci = entry.get(who), entry.get(f"{who}_ci")
    if d is None:
        return "n.d."
    return f"{d:.2g} [{ci[0]:.2g}, {ci[1]:.2g}]" if ci else f"{d:.2g}"


def _refine_lines(job, m: dict, r: int = 1) -> list[str]:
    """Refine round ``r``: the elements / seeds the student before it got most wrong and the data added for them."""
    from geodite_sim.workflows.distill.refine import round_name

    name = round_name(r)
    focus_path = job.workdir / name / "focus.json"
    if not focus_path.exists():
        return []
    info = json.loads(focus_path.read_text())
    shards = m.get(name, {}).get("shards", {})
    before = "stage-1" if r == 1 else round_name(r - 1)
    lines = [f"## Refine round {r} (error-targeted data, `{name}/`)", "",
             f"{sum(s['structures'] for s in shards.values())} structures in {len(shards)} shards.", ""]
    if info["focus"]:
        lines += [f"Universal structures for the {len(info['focus'])} elements with the largest {before} held-out "
                  f"force error (of {len(info['per_element'])}):", "",
                  f"| element | {before} force MAE on its atoms (meV/Å) | held-out atoms |", "|---|---|---|"]
        lines += [f"| {el} | {1e3 * e:.0f} | {info['per_element'][el]['atoms']} |"
                  for el, e in sorted(info["focus"].items(), key=lambda kv: -kv[1])] + [""]
    if info.get("per_seed"):
        seeds = job.relaxed_seeds()
        lines += [f"The {before} student's NVT frames labelled by the teacher, runs shared by each seed's held-out "
                  "error:", "", f"| seed | {before} force MAE (meV/Å) | held-out atoms |", "|---|---|---|"]
        lines += [f"| {seeds[int(i)].get_chemical_formula() if seeds[int(i)] is not None else i} | "
                  f"{1e3 * e['forces_mae']:.0f} | {e['atoms']} |" for i, e in info["per_seed"].items()] + [""]
    return lines


def markdown(job, checks: dict, metrics: dict) -> str:
    m = job.manifest()
    h = checks["heldout"]
    lines = [f"# Distillation report: {job.spec.name}", "",
             f"Teacher: {m['teacher']['version']} — energies: {m['teacher']['energy_convention']}.",
             f"Data: {sum(s['structures'] for s in m['shards'].values())} labelled structures in {len(m['shards'])} "
             f"shards (manifest hash {m.get('data_hash')}); split by composition.", "",
             "## Held-out compositions (student vs teacher)", "",
             "| structures | elements | energy MAE (meV/atom) | force MAE (meV/Å) | stress MAE (eV/Å³) |",
             "|---|---|---|---|---|",
             f"| {h['structures']} | {h['elements']} | {_f(h['energy_mae_meV_per_atom'])} | "
             f"{_f(h['forces_mae_meV_per_A'])} | {_f(h['stress_mae'])} |", "",
             "| element group | structures | energy MAE | force MAE | stress MAE |", "|---|---|---|---|---|"]
    for g, r in h["per_group"].items():
        lines.append(f"| {g} | {r['structures']} | {_f(r['energy_mae_meV_per_atom'])} | "
                     f"{_f(r['forces_mae_meV_per_A'])} | {_f(r['stress_mae'])} |")
    lines += ["", "![parity](parity.png)", ""]
    for r in range(1, job.spec.refine.rounds + 1):
        lines += _refine_lines(job, m, r)
    if "volumes" in checks:
        v = checks["volumes"]
        lines += ["## Relaxed volume per atom, held-out crystals (fmax 0.01)", "",
                  f"{v['within_3pct']} of {v['compared']} within 3 % of the teacher's; median |ΔV/V| "
                  f"{_f(v['median_abs_pct'])} %.", ""]
    if "sanity" in checks:
        c = checks["sanity"]
        lines += ["## User-facing structures relaxed by both (demo, screening example, SSE cells; fmax 0.01)", "",
                  f"{c['blown']} of {c['structures']} student relaxations blow up or collapse (fail, or V outside "
                  f"{V.SANE_VOLUME_RATIO[0]}–{V.SANE_VOLUME_RATIO[1]} x the teacher's); {c['within_5pct']} of "
                  f"{c['compared']} within 5 % of the teacher's volume, {c['within_10pct']} within 10 %; "
                  f"{c['skipped']} skipped.", "", "| structure | atoms | V student / teacher | note |", "|---|---|---|---|"]
        lines += [f"| {r['file']} | {r.get('atoms', '—')} | {_f(r.get('ratio'), '.3f')} | "
                  f"{r.get('skipped') or ('**blown**' if r.get('blown') else '')} |" for r in c["rows"]]
        lines.append("")
    if "dcdft" in checks:
        d = checks["dcdft"]
        lines += ["## Delta test (dcdft, WIEN2k PBE volumes)", "", "| model | accepted | median abs % | within 5 % |",
                  "|---|---|---|---|"]
        for who in ("student", "teacher"):
            s = d[who]
            lines.append(f"| {who} | {s['accepted']} | {_f(s['median_abs_pct'])} | {s['within_5pct']} |")
        lines.append("")
    if "diatomics" in checks:
        dia = checks["diatomics"]
        keys = sorted(set(dia["student"]) | set(dia["teacher"]))
        lines += ["## Diatomics (means over " + ", ".join(dia["elements"]) + ")", "", "| metric | student | teacher |",
                  "|---|---|---|"] + [f"| {k} | {_f(dia['student'].get(k))} | {_f(dia['teacher'].get(k))} |"
                                      for k in keys] + [""]
    if "speed" in checks:
        s = checks["speed"]
        lines += ["## Speed in the engine (NVE, same structures, same run)", "",
                  f"student {s['atom_steps_per_s']['student']:.0f} vs teacher {s['atom_steps_per_s']['teacher']:.0f} "
                  f"atom-steps/s: **{s['speedup']:.1f}x** ({s['structures']} structures, {s['atoms']} atoms).", ""]
    if "md" in checks:
        lines += ["## NVT MD, student vs teacher (RDF overlap with the teacher's trajectory)", "",
                  "The check's resolution at this run length and cell size: *student repeat* is the student "
                  "against itself run from other momenta — what an exact model would score here; *teacher halves* "
                  "is the teacher's first half against its second. A student score near them is at the noise "
                  "floor, not a model error.", "",
                  "| system | T (K) | steps | min RDF score | student repeat | teacher halves | pair scores | "
                  "D student / teacher (cm²/s, 95 % interval; n.d.: no diffusion resolved) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in checks["md"].items():
            pairs = ", ".join(f"{k} {v:.3f}" for k, v in r["rdf_scores"].items())
            ds = "; ".join(f"{el} {_d(v, 'student')} / {_d(v, 'teacher')}" for el, v in r["D_cm2_per_s"].items())
            ds = ds or r.get("D_note", "—")
            lines.append(f"| {name} | {r['temperature']:.0f} | {r['steps']} | {r['rdf_min_score']:.3f} | "
                         f"{_f(r.get('student_repeat_min_score'))} | {_f(r.get('teacher_halves_min_score'))} | "
                         f"{pairs} | {ds} |")
        lines.append("")
    if "long_md" in checks:
        lm = checks["long_md"]
        lines += [f"## Student alone: {lm['picoseconds']:g} ps NVT at {lm['temperature']:.0f} K, monitors on", "",
                  "| system | atoms | steps done | stopped |", "|---|---|---|---|"]
        lines += [f"| {r['system']} | {r['atoms']} | {r['steps_done']}/{lm['steps']} | "
                  f"{'yes: ' + str(r['reason']) if r['stopped'] else 'no'} |" for r in lm["runs"]]
        lines.append("")
    lines += ["## Headline", "", "```json", json.dumps(metrics, indent=1), "```", ""]
    return "\n".join(lines)
