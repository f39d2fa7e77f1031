"""The error-targeted refine round: per-element errors against a known answer, the focus and the plan.

The end-to-end path (stage 1 → refine data → refine stage → stage 2, interrupted and resumed bit for bit) runs in
``test_distill.py``'s universal mode, whose spec has a ``[refine]`` section.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from geodite_sim.workflows.distill import SpecError, load_spec
from geodite_sim.workflows.distill.refine import MIN_ATOMS, choose_focus, element_errors, refine_plan

from geodite_sim.evaluate import evaluate
from geodite_sim.pair_potential import MorsePotential
from geodite_sim.training.data import Sample
from tests.conftest import MORSE
from tests.workflows.test_distill import make_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_element_errors_recover_known_per_element_offsets():
    """Labels = the model's own forces plus a known offset per element on one component: the per-element MAE
    must be |offset| / 3 (the mean over an atom's three components), whatever the cell mixes."""
    model = MorsePotential(**MORSE).to(torch.float64)
    offsets = {29: 0.3, 47: 0.06, 79: 0.012}
    structures = []
    for i, (a, b) in enumerate([("Cu", "Ag"), ("Ag", "Au"), ("Cu", "Au"), ("Cu", "Cu")]):
        atoms = bulk(a, "fcc", a=3.9, cubic=True).repeat((2, 1, 1))
        atoms.symbols[1::2] = b
        atoms.rattle(0.05, seed=i)
        structures.append(atoms)
    ref = evaluate(structures, model)
    held = []
    for atoms, r in zip(structures, ref):
        forces = np.array(r["forces"])
        forces[:, 1] += np.array([offsets[z] for z in atoms.numbers])
        held.append(Sample(atoms=atoms, energy=r["energy"], forces=forces, stress=None))
    errors = element_errors(model, held)
    assert set(errors) == {"Cu", "Ag", "Au"}
    for el, z in (("Cu", 29), ("Ag", 47), ("Au", 79)):
        assert errors[el]["atoms"] == sum(int((a.numbers == z).sum()) for a in structures)
        assert errors[el]["forces_mae"] == pytest.approx(offsets[z] / 3, rel=1e-9)


def test_focus_takes_the_largest_errors_with_enough_atoms():
    errors = {"Cu": {"atoms": 40, "forces_mae": 0.05}, "Ag": {"atoms": 40, "forces_mae": 0.20},
              "Au": {"atoms": MIN_ATOMS - 1, "forces_mae": 9.0},  # too few atoms to act on
              "Pd": {"atoms": 40, "forces_mae": 0.10}}
    assert choose_focus(errors, 0.5, ("Cu", "Ag", "Au", "Pd")) == {"Ag": 0.20, "Pd": 0.10}
    assert choose_focus(errors, 0.01, ("Cu", "Ag", "Au", "Pd")) == {"Ag": 0.20}
    assert choose_focus(errors, 1.0, ("Cu", "Pd")) == {"Pd": 0.10, "Cu": 0.05}


def test_refine_plan_targets_the_focus_in_proportion_and_is_new(tmp_path):
    from geodite_sim.workflows.distill.generate import base_structure, plan

    raw = make_spec("universal", tmp_path / "w")
    raw["data"]["max_atoms"] = 12
    raw["refine"] = {"structures": 300, "epochs": 1}
    spec = load_spec(raw)
    focus = {"Ag": 0.3, "Pd": 0.1}
    bases = refine_plan(spec, focus)
    assert bases == refine_plan(spec, focus)  # deterministic
    assert not set(bases) & set(plan(spec))  # none repeats a round-0 base
    per_el = {"Ag": 0, "Pd": 0}
    for b in bases:
        el = b.key[1] if b.kind in ("prototype", "pyxtal") else b.key[0]
        per_el[el] += b.n_candidates
        if b.kind == "prototype":
            atoms = base_structure(b, spec, [])
            assert atoms is None or el in atoms.get_chemical_symbols()
    assert sum(per_el.values()) >= 300
    assert 2.0 < per_el["Ag"] / per_el["Pd"] < 4.5  # ~3:1, the ratio of their errors (rounded per source)


@pytest.mark.parametrize("refine", [{"structures": 5, "epochs": 0}, {"focus_fraction": 0.0},
                                    {"structures": -1}, {"size": 3}, {"structures": 5, "epochs": 1, "rounds": 0}])
def test_bad_refine_sections_are_refused(refine, tmp_path):
    raw = make_spec("universal", tmp_path / "w")
    raw["refine"] = refine
    with pytest.raises(SpecError, match="refine"):
        load_spec(raw)


def test_domain_refine_runs_follow_the_seed_errors(tmp_path):
    """Domain mode: stage-1-student MD runs shared over the seeds by their held-out error (largest remainders),
    numbered apart from round 0's runs, cycled over the temperatures."""
    from geodite_sim.workflows.distill.generate import plan
    from geodite_sim.workflows.distill.refine import REFINE_RUN_OFFSET, domain_refine_plan

    raw = make_spec("domain", tmp_path / "w")
    raw["domain"]["temperatures"] = [600.0, 900.0]
    raw["refine"] = {"structures": 100, "epochs": 1, "md_steps": 100, "md_frame_every": 10}  # 10 runs of 10 frames
    spec = load_spec(raw)
    bases = domain_refine_plan(spec, {0: 0.3, 1: 0.1, 2: 0.1})
    assert bases == domain_refine_plan(spec, {0: 0.3, 1: 0.1, 2: 0.1})
    assert len(bases) == 10 and all(b.kind == "seed_md" and b.n_candidates == 10 for b in bases)
    runs = {i: [b for b in bases if b.key[0] == i] for i in range(3)}
    assert [len(runs[i]) for i in range(3)] == [6, 2, 2]  # 10 x (0.6, 0.2, 0.2)
    assert {b.key[1] for b in runs[0]} == {600.0, 900.0}
    assert all(b.key[3] >= REFINE_RUN_OFFSET for b in bases) and not set(bases) & set(plan(spec))
    second = domain_refine_plan(spec, {0: 0.3, 1: 0.1, 2: 0.1}, r=2)  # a later round: runs of its own
    assert len(second) == 10 and all(b.key[3] >= 2 * REFINE_RUN_OFFSET for b in second)
    assert not {b.key[3] for b in second} & {b.key[3] for b in bases}


def test_sanity_relaxations_flag_a_blown_volume(tmp_path):
    """Student = teacher: every ratio is 1; a student whose bond length is 30 % longer blows every cell up;
    an unreadable file gets its own row."""
    from geodite_sim.workflows.distill.validate import sanity_relaxations

    from tests.workflows.test_distill import EXAMPLES

    bad = tmp_path / "broken.cif"
    bad.write_text("not a cif\n")
    files = [str(EXAMPLES / "Cu_fcc.cif"), str(EXAMPLES / "Ni_fcc.cif"), str(bad)]
    teacher = MorsePotential(**MORSE).to(torch.float64)
    same = sanity_relaxations(teacher, teacher, files)
    assert same["structures"] == 2 and same["skipped"] == 1 and same["blown"] == 0
    assert all(r["ratio"] == pytest.approx(1.0, abs=1e-6) for r in same["rows"] if "ratio" in r)
    assert "unreadable" in same["rows"][2]["skipped"]
    longer = MorsePotential(**{**MORSE, "r0": 1.3 * MORSE["r0"]}).to(torch.float64)
    blown = sanity_relaxations(longer, teacher, files)
    assert blown["blown"] == 2 and blown["within_10pct"] == 0
    assert all(r["ratio"] == pytest.approx(1.3**3, rel=0.05) for r in blown["rows"] if "ratio" in r)


def test_validate_structures_must_match_files(tmp_path):
    raw = make_spec("universal", tmp_path / "w")
    raw["validate"]["structures"] = [str(tmp_path / "nothing-*.cif")]
    with pytest.raises(SpecError, match="matches no file"):
        load_spec(raw)


def test_refine_round_refuses_other_settings_or_weights(tmp_path):
    """A finished refine round is only reused by the spec and stage-1 weights that made it."""
    import json

    from geodite_sim.workflows.distill import Distillation, run_distill
    from geodite_sim.workflows.distill.refine import focus_of

    raw = make_spec("universal", tmp_path / "w")
    raw["train"].update(stage1_epochs=1, stage2_epochs=0)
    run_distill(load_spec(raw), stages=("data", "train"), log=lambda m: None)
    stage1 = tmp_path / "w" / "train" / "stage1" / "student.ckpt"
    job = Distillation(load_spec(raw), log=lambda m: None)
    assert focus_of(job, stage1)["focus"]  # the cached round, reused
    raw["refine"]["structures"] = 24
    with pytest.raises(SpecError, match="other \\[refine\\] settings"):
        focus_of(Distillation(load_spec(raw), log=lambda m: None), stage1)
    path = tmp_path / "w" / "refine" / "focus.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "weights_hash": "0" * 16}))
    with pytest.raises(SpecError, match="other student weights"):
        focus_of(job, stage1)


def test_a_stage_trained_from_other_weights_is_not_reused(tmp_path):
    """Adding a [refine] round after stage 2 finished: stage 2 started from stage 1, not from the refine stage,
    so it is refused (named) rather than silently kept; once removed, it is trained again from the refine stage."""
    import shutil

    from geodite_sim.workflows.distill import run_distill

    raw = make_spec("universal", tmp_path / "w")
    raw["train"].update(stage1_epochs=1, stage2_epochs=1)
    raw.pop("refine")
    run_distill(load_spec(raw), stages=("data", "train"), log=lambda m: None)
    raw["refine"] = {"structures": 12, "epochs": 1}
    with pytest.raises(SpecError, match="stage2 was trained from other weights"):
        run_distill(load_spec(raw), stages=("data", "train"), log=lambda m: None)
    shutil.rmtree(tmp_path / "w" / "train" / "stage2")
    run_distill(load_spec(raw), stages=("data", "train"), log=lambda m: None)
    import json

    done = json.loads((tmp_path / "w" / "train" / "stage2" / "done.json").read_text())
    refine = json.loads((tmp_path / "w" / "train" / "refine" / "done.json").read_text())
    assert done["init_weights_hash"] == refine["weights_hash"]


def test_absurd_teacher_labels_are_left_out(tmp_path):
    """A finite but absurd label (energy 1e20 eV, or a 1e4 eV/Å force) is neither trained nor validated on."""
    import shutil

    import h5py
    from geodite_sim.workflows.distill import Distillation, run_distill
    from geodite_sim.workflows.distill.shards import load_samples

    spec = load_spec(make_spec("universal", tmp_path / "w"))
    run_distill(spec, stages=("data",), log=lambda m: None)
    job = Distillation(spec, log=lambda m: None)
    train, held = job.samples()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "w" / "labels", copy / "labels")
    first = sorted((copy / "labels").glob("*.h5"))[0]
    with h5py.File(first, "r+") as f:
        f["energy"][0] = 1e20
        f["forces"][0, 0] = 1e4 if f["offsets"][1] > 1 else 0.0
        f["forces"][f["offsets"][1], 1] = 1e4  # the second structure's first atom
    excluded: list[str] = []
    e0 = {int(z): e for z, e in job.manifest()["e0"].items()}
    t2, h2 = load_samples(copy, spec.train.label_limits, e0, excluded)
    assert len(excluded) == 2 and len(t2) + len(h2) == len(train) + len(held) - 2
    t3, h3 = load_samples(copy)  # no limits: everything
    assert len(t3) + len(h3) == len(train) + len(held)


def test_a_second_round_starts_from_the_first_rounds_student(tmp_path):
    """``rounds = 2`` added after a finished one-round run: round 1 is reused as it is, round 2 is made from the
    refine stage's student (its focus records those weights), from bases no earlier round has, and its stage
    starts from the refine stage's weights."""
    import json

    from geodite_sim.workflows.distill import Distillation, run_distill
    from geodite_sim.workflows.distill.refine import refine_plan

    raw = make_spec("universal", tmp_path / "w")
    raw["train"].update(stage1_epochs=1, stage2_epochs=0)
    raw["refine"] = {"structures": 12, "epochs": 1}
    run_distill(load_spec(raw), stages=("data", "train"), log=lambda m: None)
    w = tmp_path / "w"
    round1 = (w / "refine" / "focus.json").read_text()
    raw["refine"]["rounds"] = 2
    spec = load_spec(raw)
    run_distill(spec, stages=("data", "train"), log=lambda m: None)
    assert (w / "refine" / "focus.json").read_text() == round1  # reused, not redone
    manifest = json.loads((w / "manifest.json").read_text())
    assert manifest["refine"]["shards"] and manifest["refine-2"]["shards"]
    refine_done = json.loads((w / "train" / "refine" / "done.json").read_text())
    focus2 = json.loads((w / "refine-2" / "focus.json").read_text())
    assert focus2["weights_hash"] == refine_done["weights_hash"]
    assert json.loads((w / "train" / "refine-2" / "done.json").read_text())["init_weights_hash"] == \
        refine_done["weights_hash"]
    focus = focus2["focus"]
    assert not set(refine_plan(spec, focus, 2)) & set(refine_plan(spec, focus, 1))
    status = Distillation(spec, log=lambda m: None).status()
    assert status["refine"]["refine-2"]["shards_labelled"] == len(manifest["refine-2"]["shards"])
    assert list(status["train"]) == ["stage1", "refine", "refine-2", "stage2"]


def test_teacher_volumes_are_cached_per_structure_and_model(tmp_path, monkeypatch):
    """The teacher's relaxed volumes are kept by structure: a later validation relaxes only new structures, and
    a cache of another model is not used."""
    from geodite_sim.workflows.distill.validate import relaxed_volumes

    import geodite_sim.relax as relax_mod

    teacher = MorsePotential(**MORSE).to(torch.float64)
    cells = [bulk("Cu", "fcc", a=3.7 + 0.05 * i) for i in range(3)]
    cache = tmp_path / "teacher-volumes.json"
    first = relaxed_volumes(cells[:2], teacher, cache)
    assert first == relaxed_volumes(cells[:2], teacher)  # the same numbers as without a cache
    calls = []
    real = relax_mod.relax_many
    monkeypatch.setattr(relax_mod, "relax_many", lambda structures, *a, **k: calls.append(len(structures)) or
                        real(structures, *a, **k))
    again = relaxed_volumes(cells, teacher, cache)
    assert again[:2] == first and calls == [1]  # only the new structure was relaxed
    assert relaxed_volumes(cells, teacher, cache) == again and calls == [1]
    other = MorsePotential(**{**MORSE, "r0": 1.1 * MORSE["r0"]}).to(torch.float64)
    assert relaxed_volumes(cells, other, cache)[0] == pytest.approx(1.1**3 * first[0], rel=0.02)
    assert calls == [1, 3]  # another model's cache is not used


def test_teacher_checks_stage_runs_beside_training_and_is_reused(tmp_path):
    """``--stages teacher-checks`` needs no student: it relaxes the held-out crystals, the [validate] structures
    and the dcdft crystals of the domain with the teacher; the validation later relaxes none of them again."""
    import json

    from geodite_sim.workflows.distill import run_distill

    raw = make_spec("universal", tmp_path / "w")
    raw["validate"]["dcdft"] = True
    raw["train"].update(stage1_epochs=1, stage2_epochs=0)
    raw.pop("refine")
    spec = load_spec(raw)
    run_distill(spec, stages=("data",), log=lambda m: None)
    result = run_distill(spec, stages=("teacher-checks",), log=lambda m: None)
    assert result.finished and not (tmp_path / "w" / "train").exists()
    cache = tmp_path / "w" / "report" / "teacher-volumes.json"
    volumes = json.loads(cache.read_text())["volumes"]
    assert len(volumes) == 1 + 2 + 4  # one held-out crystal, two files, dcdft Cu Ag Au Pd
    stamp = cache.stat().st_mtime_ns
    run_distill(spec, stages=("train", "validate"), log=lambda m: None)
    assert cache.stat().st_mtime_ns == stamp  # nothing the teacher had to relax again
    checks = json.loads((tmp_path / "w" / "report" / "report.json").read_text())["checks"]
    assert {r["teacher"] for r in checks["dcdft"]["rows"]} <= set(volumes.values())
    assert checks["sanity"]["rows"][0]["teacher"] in volumes.values()


def test_interim_checks_measure_the_student_in_training_against_the_cached_teacher(tmp_path):
    """``--stages interim-checks``: the latest training checkpoint's EMA weights relax the held-out and dcdft
    crystals, compared with the teacher's cached volumes (the teacher relaxes nothing); each call appends a row;
    without the teacher's cache it says to run teacher-checks first."""
    import json

    from geodite_sim.workflows.distill import run_distill
    from geodite_sim.workflows.distill import validate as V
    from geodite_sim.workflows.distill.pipeline import Distillation

    from geodite_sim.model import load_model

    raw = make_spec("universal", tmp_path / "w")
    raw["validate"]["dcdft"] = True
    raw["train"].update(stage1_epochs=1, stage2_epochs=0)
    raw.pop("refine")
    spec = load_spec(raw)
    run_distill(spec, stages=("data", "train"), log=lambda m: None)
    with pytest.raises(SpecError, match="run --stages teacher-checks first"):
        run_distill(spec, stages=("interim-checks",), log=lambda m: None)
    run_distill(spec, stages=("teacher-checks",), log=lambda m: None)
    cache = tmp_path / "w" / "report" / "teacher-volumes.json"
    stamp = cache.stat().st_mtime_ns
    lines: list[str] = []
    run_distill(spec, stages=("interim-checks",), log=lines.append)
    run_distill(spec, stages=("interim-checks",), log=lambda m: None)
    assert cache.stat().st_mtime_ns == stamp  # the teacher relaxed nothing
    rows = json.loads((tmp_path / "w" / "report" / "interim.json").read_text())
    assert len(rows) == 2 and rows[0]["stage"] == rows[1]["stage"] and rows[0]["weights"] == "ema"
    last = tmp_path / "w" / "train" / rows[0]["stage"] / "last.ckpt"
    assert rows[0]["volumes"]["crystals"] == 1 and rows[0]["dcdft"]["elements"] == 4  # Cu Ag Au Pd
    assert any("interim-checks" in line and "dcdft vs WIEN2k" in line for line in lines)
    # the same numbers as the EMA student's own relaxation against the cached teacher volume
    job = Distillation(spec, log=lambda m: None)
    crystal = V.pick_crystals(job.samples()[1], spec.validate.relax_crystals)[0]
    (v_student,) = V.relaxed_volumes([crystal], load_model(str(last), use_ema=True))
    v_teacher = json.loads(cache.read_text())["volumes"][V.structure_key(crystal)]
    assert rows[0]["volumes"]["compared"] == 1
    assert rows[0]["volumes"]["median_abs_pct"] == pytest.approx(100 * abs(v_student / v_teacher - 1), rel=1e-9)
