"""Tests of geodite_sim.training: overfitting, exact resume, checkpoint round trip, E0 fit, data I/O, CLI."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from geodite_sim.batch import Batch
from geodite_sim.evaluate import evaluate
from geodite_sim.model import load_model
from geodite_sim.training import Sample, Trainer, fit_e0, get_preset, read_samples, sample_from_atoms, write_hdf5
from geodite_sim.training.data import composition_matrix


def _strained_emt_sample(a, rng: np.random.Generator, rattle: float) -> Sample:
    """``a`` under a random symmetric strain (up to 3 %), rattled by ``rattle`` Å, labelled with EMT."""
    eps = np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3))
    a.set_cell(a.cell[:] @ (0.5 * (eps + eps.T)), scale_atoms=True)
    a.rattle(rattle, seed=int(rng.integers(1000)))
    a.calc = EMT()
    a.calc = SinglePointCalculator(a, energy=a.get_potential_energy(), forces=a.get_forces(), stress=a.get_stress())
    return sample_from_atoms(a)


def emt_set(n: int, seed: int = 0) -> list[Sample]:
    """Cubic four-atom Cu/Ni/Al cells (one atom substituted in every other), strained and rattled, EMT labels."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        el = ["Cu", "Ni", "Al"][k % 3]
        a = bulk(el, "fcc", a={"Cu": 3.61, "Ni": 3.52, "Al": 4.05}[el], cubic=True)
        if k % 2:
            a[0].symbol = "Ni" if el != "Ni" else "Cu"
        out.append(_strained_emt_sample(a, rng, rattle=0.05))
    return out


def tiny(**train):
    model_cfg, train_cfg = get_preset("tiny", train_overrides=dict(log_every=0, **train))
    return model_cfg, train_cfg


def quiet(msg):
    pass


def small_cells(n: int, seed: int = 0) -> list[Sample]:
    """Four-atom fcc Cu/Ni (some with Al) cells, strained and rattled, labelled with EMT."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        el = ["Cu", "Ni", "Al"][k % 3]
        a = bulk(el, "fcc", a={"Cu": 3.61, "Ni": 3.52, "Al": 4.05}[el]).repeat((2, 1, 1))
        if k >= 3:
            a[0].symbol = "Al"
        out.append(_strained_emt_sample(a, rng, rattle=0.08))
    return out


def test_overfit_five_structures(tmp_path):
    samples = small_cells(5)
    model_cfg, cfg = tiny(epochs=100, batch_size=5, lr=2e-2, warmup_steps=5, ema_decay=0.0, val_fraction=0.0,
                          dtype="float64", lr_min_factor=0.01)
    tr = Trainer(samples, model_cfg, cfg, workdir=tmp_path, val_samples=[], log=quiet)
    before = tr.evaluate(samples)
    tr.fit()
    after = tr.evaluate(samples)
    # observed: loss 0.025 -> 0.0011, E 108 -> 0.1 meV/atom, F 0.29 -> 0.023 eV/Å, S 0.031 -> 0.002 eV/Å^3
    assert after["loss"] < 0.06 * before["loss"]
    assert after["energy_mae"] < 1e-3  # eV/atom
    assert after["forces_mae"] < 0.15 * before["forces_mae"]
    assert after["stress_mae"] < 0.15 * before["stress_mae"]
    assert tr.step_losses[-1] < 0.1 * tr.step_losses[0]


def test_resume_reproduces_loss_curve(tmp_path):
    samples = emt_set(6, seed=1)
    model_cfg, cfg = tiny(epochs=3, batch_size=2, dtype="float64", val_fraction=0.0)
    model_cfg = replace(model_cfg, attn_dropout=0.2)  # the RNG state must be restored too
    val = samples[:2]
    full = Trainer(samples, model_cfg, cfg, workdir=tmp_path / "full", val_samples=val, log=quiet)
    full.fit()
    part = Trainer(samples, model_cfg, cfg, workdir=tmp_path / "part", val_samples=val, log=quiet)
    part.fit(until_step=4)  # interrupted mid-epoch (3 steps per epoch)
    assert len(part.step_losses) == 4
    del part
    resumed = Trainer.resume(tmp_path / "part" / "last.ckpt", samples, val_samples=val, log=quiet)
    assert resumed.global_step == 4
    resumed.fit()
    assert len(resumed.step_losses) == len(full.step_losses) == 9
    np.testing.assert_allclose(resumed.step_losses, full.step_losses, rtol=0, atol=1e-10)
    for p, q in zip(resumed.model.parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    for p, q in zip(resumed.ema.shadow, full.ema.shadow):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10)
    assert [h["val_loss"] for h in resumed.history] == pytest.approx([h["val_loss"] for h in full.history],
                                                                      abs=1e-10)


def test_checkpoint_roundtrip_load_model(tmp_path):
    samples = emt_set(6, seed=2)
    model_cfg, cfg = tiny(epochs=2, batch_size=3, val_fraction=0.0)
    tr = Trainer(samples, model_cfg, cfg, workdir=tmp_path, val_samples=samples[:2], log=quiet)
    tr.fit()
    out = tmp_path / "model.ckpt"
    tr.export(out)
    loaded = load_model(str(out))
    ck = torch.load(out, weights_only=True)
    assert len(ck["optimizer_states"][0]["ema"]) == len(list(loaded.parameters()))

    atoms = [s.atoms for s in samples]
    batch = Batch.from_atoms(atoms, dtype=torch.float32)
    ref_model = tr.model
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    with tr.ema.applied(ref_model):
        ref = ref_model(batch)
    got = loaded(batch)
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
    assert loaded.decoder.e_scale == pytest.approx(tr.model.decoder.e_scale)
    torch.testing.assert_close(loaded.decoder.e0, tr.model.decoder.e0.float())

    # the resumable training checkpoint is an official-format file too: raw weights + EMA
    raw = load_model(str(tmp_path / "last.ckpt"))
    ema = load_model(str(tmp_path / "last.ckpt"), use_ema=True)
    for p, q in zip(ema.parameters(), loaded.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(raw.parameters(), ema.parameters()))


def test_fixed_e0_keeps_the_dissociation_limit_at_the_isolated_atoms(tmp_path):
    """With E0 fixed (a teacher's isolated atoms) the decoder's e_shift stays 0, before and after training: an
    isolated atom's energy is exactly its E0 and two atoms beyond the cutoff are 2 E0 — the dissociation limit that
    fixing E0 is for. (A shift by the mean cohesive energy, as once tried, applies to isolated atoms too: every
    isolated atom and far dimer then sat that many eV/atom below E0, which no training can undo.)"""
    from ase import Atoms

    samples = small_cells(6)
    model_cfg, cfg = tiny(epochs=1, batch_size=3, dtype="float64", val_fraction=0.0)
    e0 = np.zeros(119)
    e0[[13, 29]] = [3.5, 3.3]  # "isolated atoms" above the EMT energies: residuals ~ -3.4 eV/atom
    tr = Trainer(samples, model_cfg, cfg, workdir=tmp_path / "fixed", val_samples=[], e0=e0, log=quiet)
    assert tr.model.decoder.e_shift == 0.0
    assert np.array_equal(tr.model.decoder.e0.detach().double().numpy()[[13, 29]], e0[[13, 29]])
    tr.fit()
    tr.export(tmp_path / "student.ckpt")
    model = load_model(str(tmp_path / "student.ckpt"), dtype=torch.float64)
    far = 1.5 * model.config.cutoff
    cases = [(Atoms("Al", cell=np.eye(3) * 20.0), e0[13]), (Atoms("Cu", cell=np.eye(3) * 20.0), e0[29]),
             (Atoms("AlCu", positions=[[0, 0, 0], [0, 0, far]], cell=np.eye(3) * 30.0), e0[13] + e0[29])]
    for atoms, expected in cases:
        assert evaluate([atoms], model)[0]["energy"] == pytest.approx(expected, abs=1e-5), atoms
    free = Trainer(samples, model_cfg, cfg, workdir=tmp_path / "free", val_samples=[], log=quiet)
    assert free.model.decoder.e_shift == 0.0
    # a checkpoint of the old rule (e_shift = the mean cohesive energy) resumes with e_shift 0, saying so; any
    # other shift (e.g. a fine-tuned Geodite-MP's own) is kept
    for shift, kept in ((tr.norm["energy_mean"], 0.0), (-0.25, -0.25)):
        tr.model.decoder.e_shift = shift
        tr.save(tmp_path / "old.ckpt")
        lines: list[str] = []
        again = Trainer.resume(tmp_path / "old.ckpt", samples, workdir=tmp_path / "again", val_samples=[],
                               log=lines.append)
        assert again.model.decoder.e_shift == kept
        assert any("set to 0" in line for line in lines) == (kept == 0.0)


def test_e0_least_squares_recovers_offsets():
    rng = np.random.default_rng(3)
    true = {3: -1.9, 8: -4.9, 17: -1.8, 26: -8.3}
    samples = []
    for _ in range(40):
        counts = {z: int(rng.integers(0, 6)) for z in true}
        counts[8] += 1
        numbers = [z for z, c in counts.items() for _ in range(c)]
        energy = sum(true[z] for z in numbers) + rng.normal(0, 1e-3) * len(numbers)
        from ase import Atoms

        samples.append(Sample(Atoms(numbers=numbers, positions=rng.uniform(0, 5, (len(numbers), 3))), energy))
    e0 = fit_e0(samples)
    for z, v in true.items():
        assert e0[z] == pytest.approx(v, abs=2e-3)
    absent = np.ones(119, bool)
    absent[list(true)] = False
    assert np.all(e0[absent] == 0)
    assert composition_matrix(samples).sum() == sum(len(s.atoms) for s in samples)


def test_extxyz_and_hdf5_roundtrip(tmp_path):
    from ase.io import write

    samples = emt_set(4, seed=4)
    frames = []
    for s in samples:
        a = s.atoms.copy()
        a.calc = SinglePointCalculator(a, energy=s.energy, forces=s.forces, stress=s.stress)
        frames.append(a)
    write(tmp_path / "d.extxyz", frames, format="extxyz")
    write_hdf5(samples, tmp_path / "d.h5")
    for path in ("d.extxyz", "d.h5"):
        got = read_samples(tmp_path / path)
        assert len(got) == 4
        for g, s in zip(got, samples):
            assert g.energy == pytest.approx(s.energy, abs=1e-8)
            np.testing.assert_allclose(g.forces, s.forces, atol=1e-8)
            np.testing.assert_allclose(g.stress, s.stress, atol=1e-8)
            np.testing.assert_allclose(g.atoms.positions, s.atoms.positions, atol=1e-8)


def test_cli_trains_and_writes_loadable_checkpoint(tmp_path, capsys):
    from ase.io import write

    from geodite_sim.training.cli import main

    frames = []
    for s in emt_set(6, seed=5):
        a = s.atoms.copy()
        a.calc = SinglePointCalculator(a, energy=s.energy, forces=s.forces, stress=s.stress)
        frames.append(a)
    write(tmp_path / "d.extxyz", frames, format="extxyz")
    out = tmp_path / "m.ckpt"
    assert main([str(tmp_path / "d.extxyz"), "--config", "tiny", "--epochs", "1", "--out", str(out),
                 "--log-every", "1", "--no-progress"]) == 0  # --no-progress wins
    assert re.search(r"^\s+step\s+\d+/\d+ epoch", capsys.readouterr().out, re.M) is None  # no per-step lines
    model = load_model(str(out))
    assert model.config.hidden_channels == get_preset("tiny")[0].hidden_channels
    assert (tmp_path / "m.ckpt.train" / "last.ckpt").exists()


def test_add_train_parser_registers_subcommand():
    import argparse

    from geodite_sim.training.cli import add_train_parser, run_train

    parser = argparse.ArgumentParser(prog="geodite-sim")
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    args = parser.parse_args(["train", "a.extxyz", "b.h5", "--config", "tiny", "--out", "m.ckpt", "--epochs", "3"])
    assert args.func is run_train
    assert args.data == ["a.extxyz", "b.h5"] and args.epochs == 3 and args.config == "tiny"
