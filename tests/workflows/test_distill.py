"""Distillation workflow end to end with a cheap teacher (Morse) and a tiny student, universal and domain mode.

An interrupted run (killed inside the data stage, between stages, inside training and inside
the refine round's data) re-run to the end gives
the same shard hashes and the same trained weights as an uninterrupted run; the same spec and seed always
give the same shards and split; bad specs are refused before any work, a bad seed gets its own error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ase.io import write
from geodite_sim.workflows.distill import SpecError, load_spec, run_distill, verify_shards
from geodite_sim.workflows.distill.generate import plan, shards_of

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "structures"


def make_spec(mode: str, workdir: Path, seeds: list[str] | None = None) -> dict:
    domain = ({"elements": ["Cu", "Ag", "Au", "Pd"]} if mode == "universal" else
              {"seeds": seeds or [str(EXAMPLES / "CuZn_B2.cif")], "temperatures": [600.0], "mobile": "Cu"})
    return {
        "distill": {"name": f"t-{mode}", "seed": 3, "workdir": str(workdir)},
        "teacher": {"model": "morse", "dtype": "float64",
                    "options": {"epsilon": 0.3, "rho0": 4.0, "r0": 2.6, "rcut1": 1.6, "rcut2": 2.0}},
        "domain": domain,
        "data": {"structures": 32, "structures_per_shard": 12, "max_atoms": 8, "relax_steps": 5, "md_steps": 20,
                 "md_frame_every": 10, "supercell_atoms": [4, 16], "heldout_fraction": 0.3},
        "student": {"hidden_channels": 8, "num_layers": 1, "num_heads": 2, "n_rbf": 4, "cutoff": 4.0},
        "train": {"stage1_epochs": 2, "stage2_epochs": 1, "batch_size": 4, "checkpoint_every": 3},
        "refine": ({"structures": 12, "focus_fraction": 0.5, "epochs": 1} if mode == "universal" else
                   {"structures": 4, "epochs": 1, "md_steps": 20, "md_frame_every": 10}),
        "validate": {"relax_crystals": 1, "md_steps": 20, "speed_structures": 1, "long_md_ps": 0.02,
                     "structures": [str(EXAMPLES / "Cu_fcc.cif"), str(EXAMPLES / "NaCl_rocksalt.cif")]},
    }


def shard_hashes(workdir: Path) -> dict:
    return {k: v["hash"] for k, v in json.loads((workdir / "manifest.json").read_text())["shards"].items()}


def _h5_arrays(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def final_weights(workdir: Path) -> str:
    return json.loads((workdir / "train" / "stage2" / "done.json").read_text())["weights_hash"]


class Interrupt(KeyboardInterrupt):
    """Stands in for a kill: raised from inside a stage."""


def _quiet(msg: str) -> None:
    pass


@pytest.mark.parametrize("mode", ["universal", "domain"])
def test_interrupted_run_equals_uninterrupted(mode, tmp_path, monkeypatch, one_thread):
    import geodite_sim.workflows.distill.label as label_mod

    from geodite_sim.training.trainer import Trainer

    # A: uninterrupted, every stage
    a = run_distill(load_spec(make_spec(mode, tmp_path / "a")), log=_quiet)
    assert a.finished and a.stage == "done"
    assert verify_shards(tmp_path / "a") == []
    report = json.loads((tmp_path / "a" / "report" / "report.json").read_text())
    assert report["metrics"]["heldout_structures"] > 0
    assert (tmp_path / "a" / "report" / "parity.png").stat().st_size > 1000
    if mode == "domain":
        assert "md" in report["checks"] and report["metrics"]["md_rdf_min_score"] <= 1.0
        assert 0.0 < report["metrics"]["md_rdf_teacher_halves_min_score"] <= 1.0
        assert 0.0 < report["metrics"]["md_rdf_student_repeat_min_score"] <= 1.0

    # B: killed inside the data stage (while labelling the second shard) ...
    spec_b = load_spec(make_spec(mode, tmp_path / "b"))
    real_label, calls = label_mod.label_shard, {"n": 0}

    def failing_label(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt()
        return real_label(*args, **kw)

    monkeypatch.setattr(label_mod, "label_shard", failing_label)
    with pytest.raises(Interrupt):
        run_distill(spec_b, log=_quiet)
    monkeypatch.setattr(label_mod, "label_shard", real_label)
    assert len(shard_hashes(tmp_path / "b")) == 1
    # ... then stopped between stages (data only) ...
    r = run_distill(spec_b, stages=("data",), log=_quiet)
    assert r.shards_done == r.shards_total
    # ... then killed inside stage-1 training (after a mid-epoch checkpoint), then run to the end
    real_step, steps = Trainer.train_step, {"n": 0}

    def failing_step(self, batch):
        steps["n"] += 1
        if steps["n"] == 5:
            raise Interrupt()
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    with pytest.raises(Interrupt):
        run_distill(spec_b, stages=("data", "train"), log=_quiet)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert (tmp_path / "b" / "train" / "stage1" / "last.ckpt").exists()
    assert not (tmp_path / "b" / "train" / "stage1" / "done.json").exists()
    # ... finishes stage 1, killed while labelling the refine round's first shard ...

    def killed(*args, **kw):
        raise Interrupt()

    monkeypatch.setattr(label_mod, "label_shard", killed)
    with pytest.raises(Interrupt):
        run_distill(spec_b, stages=("data", "train"), log=_quiet)
    monkeypatch.setattr(label_mod, "label_shard", real_label)
    assert (tmp_path / "b" / "train" / "stage1" / "done.json").exists()
    assert (tmp_path / "b" / "refine" / "focus.json").exists()
    assert not list((tmp_path / "b" / "refine").glob("labels/*.h5"))
    run_distill(spec_b, stages=("data", "train"), log=_quiet)

    assert shard_hashes(tmp_path / "b") == shard_hashes(tmp_path / "a")
    refine = [json.loads((tmp_path / w / "manifest.json").read_text())["refine"] for w in "ab"]
    assert refine[0]["shards"] and refine[0] == refine[1]
    assert final_weights(tmp_path / "b") == final_weights(tmp_path / "a")
    split_a = json.loads((tmp_path / "a" / "manifest.json").read_text())["shards"]
    split_b = json.loads((tmp_path / "b" / "manifest.json").read_text())["shards"]
    assert {k: v["heldout"] for k, v in split_a.items()} == {k: v["heldout"] for k, v in split_b.items()}


def test_model_card_is_loaded(tmp_path, one_thread):
    import geodite_sim as gs

    run_distill(load_spec(make_spec("universal", tmp_path / "w")), log=_quiet)
    model = gs.load_model(str(tmp_path / "w" / "student.ckpt"))
    card = model.card
    assert card["teacher"]["name"].startswith("morse")
    assert card["energy_convention"].startswith("Morse")
    assert set(card["supported_elements"]) <= {"Cu", "Ag", "Au", "Pd"}
    assert card["data"]["manifest_hash"] == json.loads((tmp_path / "w" / "manifest.json").read_text())["data_hash"]
    assert card["metrics"]["heldout_structures"] > 0
    refine = json.loads((tmp_path / "w" / "manifest.json").read_text())["refine"]
    assert card["data"]["refine"]["manifest_hash"] == refine["data_hash"] and card["data"]["refine"]["structures"] > 0
    assert [k for k in card["training"]] == ["stage1", "refine", "stage2"]
    assert all(stage["done"] for stage in card["training"].values())
    assert "## Refine round" in (tmp_path / "w" / "report" / "report.md").read_text()
    sanity = json.loads((tmp_path / "w" / "report" / "report.json").read_text())["checks"]["sanity"]
    assert sanity["structures"] == 1 and sanity["skipped"] == 1  # NaCl: outside the student's elements
    assert card["metrics"]["user_structures_blown"] == f"{sanity['blown']}/1"
    focus = json.loads((tmp_path / "w" / "refine" / "focus.json").read_text())
    assert 1 <= len(focus["focus"]) <= 2 and set(focus["focus"]) <= {"Cu", "Ag", "Au", "Pd"}
    assert gs.load_model("geodite-reference-random").card is None


def test_split_is_by_composition_and_deterministic(tmp_path):
    from geodite_sim.workflows.distill.shards import read_shard

    spec = load_spec(make_spec("universal", tmp_path / "w"))
    assert plan(spec) == plan(load_spec(make_spec("universal", tmp_path / "other")))
    assert [len(s) for s in shards_of(plan(spec), 12)] == [len(s) for s in shards_of(plan(spec), 12)]
    run_distill(spec, stages=("data",), log=_quiet)
    held, trained = set(), set()
    for p in sorted((tmp_path / "w" / "labels").glob("*.h5")):
        d = read_shard(p)
        for comp, h in zip(d.compositions, d.heldout):
            (held if h else trained).add(comp)
    assert held and trained and not (held & trained)  # no composition on both sides
    assert all(len([c for c in comp if c.isupper()]) >= 2 for comp in held)  # elements are always trained on


def test_domain_split_holds_out_whole_teacher_runs(tmp_path):
    """Domain mode: per seed one teacher MD run held out with all its frames, static bases by hash; every
    composition of the domain is also trained on (a vacancy composition is not held out as a whole)."""
    from geodite_sim.workflows.distill.shards import read_shard

    spec = make_spec("domain", tmp_path / "w", seeds=[str(EXAMPLES / "CuZn_B2.cif"), str(EXAMPLES / "Cu_fcc.cif")])
    spec["data"].update(structures=60, structures_per_shard=60, md_fraction=0.5)
    run_distill(load_spec(spec), stages=("data",), log=_quiet)
    d = read_shard(tmp_path / "w" / "labels" / "shard-00000.h5")
    runs: dict[str, set[bool]] = {}
    for tag, h in zip(d.tags, d.heldout):
        if tag.startswith("seed_md:"):
            runs.setdefault(tag.rsplit(":", 1)[0], set()).add(bool(h))
    assert all(len(v) == 1 for v in runs.values())  # never split inside a run
    held_runs = sorted(k for k, v in runs.items() if True in v)
    assert [r.split(":")[1] for r in held_runs] == ["0", "1"]  # one per seed
    assert len(runs) > len(held_runs)
    trained = {c for c, h in zip(d.compositions, d.heldout) if not h}
    assert set(d.compositions) == trained
    assert 0 < sum(d.heldout) < 0.6 * len(d.heldout)


def test_unsupported_element_refused_at_spec_time(tmp_path):
    spec = make_spec("universal", tmp_path / "w")
    spec["teacher"] = {"model": "geodite-mini"}
    spec["domain"] = {"elements": ["Li", "Pu", "O"]}
    with pytest.raises(SpecError, match="Pu"):
        run_distill(load_spec(spec), log=_quiet)
    assert not (tmp_path / "w" / "labels").exists()


@pytest.mark.parametrize("bad", [{"distill": {"nmae": "x"}}, {"domain": {"elements": ["Xx"]}},
                                 {"data": {"structures": "many"}}, {"domain": {}}, {"budget": {"until": "25:99"}}])
def test_bad_specs_are_refused(bad, tmp_path):
    spec = make_spec("universal", tmp_path / "w")
    for section, values in bad.items():
        spec[section] = values if section != "distill" else {**spec["distill"], **values}
    with pytest.raises(SpecError):
        load_spec(spec)


def test_bad_seed_gets_its_own_error(tmp_path, one_thread):
    bad = tmp_path / "broken.extxyz"
    bad.write_text("this is not a structure file\n")
    close = tmp_path / "close.extxyz"
    from ase import Atoms

    write(close, Atoms("Cu2", positions=[[0, 0, 0], [0.1, 0, 0]], cell=[5, 5, 5], pbc=True))
    spec = make_spec("domain", tmp_path / "w", seeds=[str(EXAMPLES / "CuZn_B2.cif"), str(bad), str(close)])
    logs: list[str] = []
    r = run_distill(load_spec(spec), stages=("data",), log=logs.append)
    assert r.shards_done == r.shards_total
    info = json.loads((tmp_path / "w" / "seeds" / "done.json").read_text())
    assert info["files"][0] and info["files"][1] is None and info["files"][2] is None
    reasons = " ".join(f["error"] for f in info["failures"])
    assert "broken.extxyz" in reasons and "too close" in reasons
    assert any("broken.extxyz" in line for line in logs)


def test_cli_distill_status_and_models(tmp_path, capsys, one_thread):
    from geodite_sim.cli import main

    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
[distill]
name = "cli"
seed = 1
workdir = "{tmp_path / 'w'}"
[teacher]
model = "morse"
dtype = "float64"
options = {{ epsilon = 0.3, rho0 = 4.0, r0 = 2.6, rcut1 = 1.6, rcut2 = 2.0 }}
[domain]
elements = ["Cu", "Ag"]
[data]
structures = 12
structures_per_shard = 12
relax_steps = 3
sources = {{ elemental = 1.0 }}
""")
    assert main(["distill", str(spec), "--stages", "data", "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert "stage" in quiet.out and "data: shard" not in quiet.err  # --no-progress: outcome only
    assert main(["distill", str(spec), "--stages", "data"]) == 0  # resumes: nothing left, says so
    assert "stage" in capsys.readouterr().out
    assert main(["distill", str(spec), "--status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["shards_labelled"] == status["shards_planned"] >= 1 and status["structures_labelled"] > 0
    assert status["validate"] == {"checks_done": [], "md_in_progress": []}  # data only: nothing validated yet
    bad = tmp_path / "bad.toml"
    bad.write_text('[domain]\nelements = ["Qq"]\n')
    assert main(["distill", str(bad), "--status"]) == 2
    assert "Qq" in capsys.readouterr().err
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    mini = cards["geodite-mini"]
    assert mini["default"] and "corrections included" in mini["card"]["energy_convention"]
    assert cards["geodite-reference-random"]["card"] is None


def test_data_workers_give_the_shards_of_one_process(tmp_path, one_thread):
    """``data_workers=2``: two processes label alternate shards; the shards, their hashes, the split and the data
    hash equal a one-process run (each shard is fixed by the spec, the seed and its index)."""
    one = run_distill(load_spec(make_spec("universal", tmp_path / "one")), stages=("data",), log=_quiet)
    two = run_distill(load_spec(make_spec("universal", tmp_path / "two")), stages=("data",), log=_quiet,
                      data_workers=2)
    assert one.shards_done == two.shards_done == one.shards_total >= 3
    assert shard_hashes(tmp_path / "two") == shard_hashes(tmp_path / "one")
    m1, m2 = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert m1["data_hash"] == m2["data_hash"] and m1["shards"] == m2["shards"]
    assert verify_shards(tmp_path / "two") == []


def test_validation_md_resumes_from_its_checkpoints(tmp_path, monkeypatch, one_thread):
    """The validation's teacher/student MD is checkpointed: a run stopped after the teacher's MD resumes without
    redoing it, and the report's MD comparison equals an uninterrupted run's."""
    import geodite_sim.workflows.distill.validate as validate_mod

    import geodite_sim.md as md_mod

    monkeypatch.setattr(validate_mod, "MD_CHECKPOINT_EVERY", 5)
    a = run_distill(load_spec(make_spec("domain", tmp_path / "a")), log=_quiet)
    assert a.finished
    spec_b = load_spec(make_spec("domain", tmp_path / "b"))
    run_distill(spec_b, stages=("data", "train"), log=_quiet)
    real_run_md = md_mod.run_md

    def stopping_run_md(structures, model, **kw):
        if str(kw.get("checkpoint", "")).endswith("md-student.ckpt"):  # after the teacher's MD finished
            raise Interrupt()
        return real_run_md(structures, model, **kw)

    monkeypatch.setattr(md_mod, "run_md", stopping_run_md)
    with pytest.raises(Interrupt):
        run_distill(spec_b, log=_quiet)
    assert (tmp_path / "b" / "report" / "md-teacher.ckpt").exists()
    teacher_frames = _h5_arrays(tmp_path / "b" / "report" / "md-teacher.h5")
    monkeypatch.setattr(md_mod, "run_md", real_run_md)
    run_distill(spec_b, log=_quiet)
    after = _h5_arrays(tmp_path / "b" / "report" / "md-teacher.h5")  # the finished teacher run is kept as it was
    assert after.keys() == teacher_frames.keys() and all((after[k] == teacher_frames[k]).all() for k in after)
    md = [json.loads((tmp_path / d / "report" / "checks" / "md.json").read_text()) for d in ("a", "b")]
    assert md[0] == md[1]
