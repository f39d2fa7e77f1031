"""One settings object per front-end (RelaxSettings, MDSettings): every public parameter of relax_many / run_md
reaches a local-executor run and what the Ray executor sends its actors; an NPT restart with other barostat
settings is refused. (The Ray runs themselves: tests/frontends/test_ray.py.)"""

from __future__ import annotations

import inspect
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from ase.build import bulk

import geodite_sim as gs
from geodite_sim.executors import LocalExecutor, RayExecutor
from geodite_sim.pair_potential import MorsePotential
from geodite_sim.runner import StepConfig
from geodite_sim.settings import DRIVER_KEYS, MDSettings, RelaxSettings

MORSE = dict(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2, dtype=torch.float64)


class Recorder:
    """An observer that records the results it is handed."""

    def __init__(self):
        self.indices: list[int] = []
        self.closed = 0

    def on_result(self, result) -> None:
        self.indices.append(result.index)

    def on_close(self) -> None:
        self.closed += 1


def nondefault_relax(observer) -> dict:
    return dict(fmax=0.02, max_steps=30, relax_cell=[True, True, False], max_atoms=12, max_systems=2,
                memory_budget_bytes=1e12, check_interval=2, optimizer="lbfgs", fire=None, lbfgs={"maxstep": 0.1},
                bfgs=None, cell_factor=2.0, min_distance_factor=0.4, max_volume_ratio=2.5,
                config=StepConfig(skin=0.3), observers=(observer,), allow_unsupported_elements=True,
                fix_symmetry=True, symprec=0.1, threads=1)


def nondefault_md(observer, tmp_path) -> dict:
    return dict(ensemble="npt_mtk_iso", temperature=[300.0, 400.0], timestep=1.0, steps=[5, 6],
                trajectory=str(tmp_path / "md.h5"), frame_every=2, tdamp=50.0, chain_length=4, tloop=2, friction=0.02,
                fix_com=True, seed=3, max_atoms=20, skin=0.3, monitors=False, checkpoint=str(tmp_path / "md.ckpt"),
                checkpoint_every=2, restart=True, save_momenta=True, memory_budget_bytes=1e12, accelerate="eager",
                config=StepConfig(skin=0.4), observers=(observer,), allow_unsupported_elements=True, threads=1,
                ensemble_params={"pressure": [1.0, 2.0], "pdamp": 500.0, "barostat_chain_length": 2, "ploop": 2})


def test_settings_hold_every_public_parameter_and_the_test_sets_every_one(tmp_path):
    relax_params = set(inspect.signature(gs.relax_many).parameters) - set(DRIVER_KEYS)
    assert relax_params == {f.name for f in fields(RelaxSettings)}
    md_sig = inspect.signature(gs.run_md).parameters
    md_params = {k for k, p in md_sig.items() if p.kind != p.VAR_KEYWORD} - set(DRIVER_KEYS)
    assert md_params | {"ensemble_params"} == {f.name for f in fields(MDSettings)}
    # the non-default values used below cover every field, each away from its default
    cases = ((RelaxSettings, nondefault_relax(Recorder())), (MDSettings, nondefault_md(Recorder(), tmp_path)))
    for cls, given in cases:
        assert set(given) == {f.name for f in fields(cls)}
        default = cls()
        for name, value in given.items():
            if value is not None:
                assert getattr(default, name) != value, name


def test_every_relax_setting_reaches_the_local_executor_and_the_ray_actors(monkeypatch):
    import geodite_sim.relax as relax_mod

    rec = Recorder()
    given = nondefault_relax(rec)
    want = RelaxSettings(**given)
    seen = []
    monkeypatch.setattr(relax_mod, "run_relax", lambda s, m, settings, **kw: seen.append(settings) or [])
    gs.relax_many([bulk("Cu")], MorsePotential(**MORSE), executor=LocalExecutor(), **given)
    assert seen == [want]
    sent = {}

    def spy(self, method, structures, model, settings, fix, fail, per_shard=None):
        sent.update(method=method, settings=settings, shard=per_shard(settings, 1, 2) if per_shard else settings)
        return iter([])

    monkeypatch.setattr(RayExecutor, "map_shards", spy)
    gs.relax_many([bulk("Cu")] * 3, MorsePotential(**MORSE), executor=RayExecutor(workers=1), progress=False, **given)
    assert sent["settings"] == replace(want, observers=())  # the observers run on the driver
    assert sent["shard"] == replace(want, observers=(), relax_cell=[True, False])  # per-input values by position
    assert rec.closed == 1


def test_every_md_setting_reaches_the_local_executor_and_the_ray_actors(monkeypatch, tmp_path):
    import geodite_sim.md as md_mod

    rec = Recorder()
    given = nondefault_md(rec, tmp_path)
    want = MDSettings(**given)
    seen = []
    monkeypatch.setattr(md_mod, "run_md_settings", lambda s, m, settings, **kw: seen.append(settings) or [])
    flat = {k: v for k, v in given.items() if k != "ensemble_params"} | given["ensemble_params"]
    gs.run_md([bulk("Cu"), bulk("Cu")], MorsePotential(**MORSE), executor=LocalExecutor(), **flat)
    assert seen == [want]
    sent = {}

    def spy(self, method, structures, model, settings, fix, fail, per_shard=None):
        sent.update(settings=settings, shard=per_shard(settings, 1, 1))
        return iter([])

    monkeypatch.setattr(RayExecutor, "map_shards", spy)
    gs.run_md([bulk("Cu"), bulk("Cu")], MorsePotential(**MORSE), executor=RayExecutor(workers=1), progress=False,
              **flat)
    assert sent["settings"] == replace(want, observers=())
    shard = sent["shard"]
    assert shard.temperature == [400.0] and shard.steps == [6] and shard.ensemble_params["pressure"] == [2.0]
    assert shard.trajectory.endswith("md.shard000001-000001.h5")
    assert replace(shard, temperature=want.temperature, steps=want.steps, ensemble_params=want.ensemble_params,
                   trajectory=want.trajectory, checkpoint=want.checkpoint) == replace(want, observers=())


def _relax_inputs():
    a = bulk("Cu", "fcc", 3.62, cubic=True)
    a.rattle(0.02, seed=1)
    b = bulk("Cu", "fcc", 3.55) * (2, 1, 1)
    b.rattle(0.03, seed=2)
    c = bulk("NaCl", "rocksalt", 5.5)  # outside the model's declared elements
    c.rattle(0.02, seed=3)
    return [a, b, c]


def _relax_kwargs(rec) -> dict:
    kw = nondefault_relax(rec)
    kw.pop("memory_budget_bytes")  # results do not depend on it (the spy test above covers it)
    return kw


def _same(a, b) -> None:
    assert a.index == b.index and a.error == b.error and a.n_steps == b.n_steps and a.warnings == b.warnings
    assert a.energy == b.energy
    np.testing.assert_array_equal(a.structure.positions, b.structure.positions)
    np.testing.assert_array_equal(a.structure.cell[:], b.structure.cell[:])


def cu_only_morse() -> MorsePotential:
    m = MorsePotential(**MORSE)
    m.supported_elements = frozenset({29})
    return m


def test_relax_many_through_the_local_executor_equals_a_direct_run():
    model = cu_only_morse()
    direct_rec, via_rec = Recorder(), Recorder()
    direct = gs.relax_many(_relax_inputs(), model, progress=False, **_relax_kwargs(direct_rec))
    via = gs.relax_many(_relax_inputs(), model, progress=False, executor=LocalExecutor(), **_relax_kwargs(via_rec))
    for a, b in zip(direct, via, strict=True):
        _same(a, b)
    assert sorted(direct_rec.indices) == sorted(via_rec.indices) == [0, 1, 2]
    assert direct[2].n_steps > 0 and direct[2].warnings  # allowed, with a warning
    # the settings matter: without the symmetry constraint the rattled cell relaxes elsewhere
    kw = _relax_kwargs(Recorder()) | {"fix_symmetry": False}
    free = gs.relax_many(_relax_inputs(), model, progress=False, **kw)
    assert not np.array_equal(free[0].structure.positions, direct[0].structure.positions)


def test_npt_restart_with_other_barostat_settings_is_refused(tmp_path):
    a = bulk("Cu", "fcc", 3.6) * (2, 1, 1)
    a.rattle(0.03, seed=5)
    kw = dict(ensemble="npt_mtk_iso", temperature=300, timestep=1.0, steps=6, checkpoint_every=3,
              trajectory=tmp_path / "npt.h5", progress=False, monitors=False, pressure=1.0)
    gs.run_md([a], MorsePotential(**MORSE), **kw)
    for change in ({"pressure": 2.0}, {"pdamp": 500.0}, {"barostat_chain_length": 4}, {"ploop": 2}):
        with pytest.raises(ValueError, match="cannot restart.*" + next(iter(change))):
            gs.run_md([a], MorsePotential(**MORSE), **(kw | change), restart=True)
    again = gs.run_md([a], MorsePotential(**MORSE), **kw, restart=True)  # the same settings resume
    assert again[0].error is None and again[0].n_steps == 6
