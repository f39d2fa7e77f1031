"""The one runner: a step that never waits for the host, static shapes, capture, parking and refills.

Counts are taken with :class:`geodite_sim.runner.counting.OpCounter` as the difference of a short and a
long block of steps (set-up cancels); "syncs" are the operations that make a CUDA host wait.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from conftest import tiny_geodite

from geodite_sim.dynamics.bfgs import BFGSParams
from geodite_sim.dynamics.lbfgs import LBFGSParams
from geodite_sim.io.structures import iter_inputs
from geodite_sim.md import md_job, run_md
from geodite_sim.pair_potential import MorsePotential
from geodite_sim.relax import _RelaxJob, relax_many
from geodite_sim.runner import Capacity, FailureChecks, Observer, Runner, StepConfig, get_integrator
from geodite_sim.runner.capture import GraphStep
from geodite_sim.runner.counting import OpCounter
from geodite_sim.runner.registry import FireParams

MD = ["nve", "nvt_nhc", "nvt_langevin"]
RELAX = ["fire", "fire_frechet", "lbfgs", "lbfgs_frechet", "bfgs", "bfgs_frechet"]
#: BFGS's ``torch.linalg.eigh`` checks its error flag on the host (one sync per step on CUDA).
EIGH = ["bfgs", "bfgs_frechet"]


def _cells(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = [bulk("NaCl", "rocksalt", 5.64), bulk("Si", "diamond", 5.43), bulk("Cu", "fcc", 3.61)][i % 3]
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        out.append(a)
    return out


def relax_runner(structures, model, name: str = "fire_frechet", check_interval: int = 1, skin: float = 0.5):
    settings = {"fmax": 1e-6, "max_steps": 10_000, "fire": FireParams(), "lbfgs": LBFGSParams(), "bfgs": BFGSParams(),
                "cell_factor": None}
    job = _RelaxJob(name.endswith("_frechet"), 10_000)
    runner = Runner(model, get_integrator(name), settings, job, Capacity(100_000),
                    StepConfig(check_interval=check_interval, skin=skin, neighbor_backend="torch"),
                    FailureChecks(0.5, 3.0))
    runner.queue = iter_inputs(structures)
    return runner


def md_runner(structures, model, name: str, skin: float = 0.5):
    job = md_job(structures, model, ensemble=name, temperature=300, steps=10_000, skin=skin,
                 config=StepConfig(neighbor_backend="torch"))
    return job.prepare()


def per_step(runner, short: int = 2, long: int = 6) -> tuple[float, float, dict]:
    runner.check()  # admission
    runner.advance(1)  # warm-up (lazy caches)
    with OpCounter() as c1:
        runner.advance(short)
    with OpCounter() as c2:
        runner.advance(long)
    d = long - short
    return (c2.syncs - c1.syncs) / d, (c2.ops - c1.ops) / d, dict(c2.sync_names)


def _runner(kind: str, n: int, model):
    structs = _cells(n)
    return relax_runner(structs, model, kind) if kind in RELAX else md_runner(structs, model, kind)


@pytest.mark.parametrize("kind", [k for k in RELAX if k not in EIGH] + MD)
def test_zero_host_syncs_per_step(kind):
    model = tiny_geodite()
    syncs, ops, names = per_step(_runner(kind, 4, model))
    assert syncs == 0, f"{kind}: {syncs} host syncs per step ({names})"
    assert ops > 0


@pytest.mark.parametrize("kind", EIGH)
def test_bfgs_syncs_only_in_its_eigendecomposition(kind):
    """BFGS's step (ASE's ``eigh`` of the dense Hessian) has one sync: ``torch.linalg.eigh``'s error check."""
    syncs, ops, names = per_step(_runner(kind, 4, tiny_geodite()))
    assert syncs == 1 and set(names) == {"_linalg_eigh"}, f"{kind}: {syncs} host syncs per step ({names})"


@pytest.mark.parametrize("kind", ["fire_frechet", "lbfgs_frechet", "bfgs_frechet", "nvt_nhc"])
def test_operations_per_step_do_not_depend_on_the_number_of_systems(kind):
    model = tiny_geodite()
    counts = {n: per_step(_runner(kind, n, model))[1] for n in (1, 8, 64)}
    assert counts[1] == counts[8] == counts[64], counts


def test_non_model_operations_per_step_are_few():
    """The integrator, edge masking/staleness and checks around the model call (the model's own count is
    reported, not bounded: it is the model's business)."""
    model = tiny_geodite()
    report = {}
    for kind in RELAX + MD:
        runner = _runner(kind, 4, model)
        _, ops, _ = per_step(runner)
        b = runner.state.batch
        edges = runner.edges.masked(b.positions, b.cell, b.system_index)
        runner.evaluate(b, edges)
        with OpCounter() as c:
            runner.evaluate(b, edges)
        report[kind] = (ops - c.ops, c.ops)
    print("non-model / model operations per step:", report)
    # NHC: the chain sweep is one operation whatever the chain length (geodite_sim::nhc_chain)
    assert report["nvt_nhc"][0] - report["nve"][0] < 60, report


def test_nhc_operations_do_not_grow_with_chain_length():
    model = tiny_geodite()
    counts = []
    for m in (1, 10):
        job = md_job(_cells(2), model, ensemble="nvt_nhc", temperature=300, steps=100, chain_length=m,
                     config=StepConfig(neighbor_backend="torch"))
        counts.append(per_step(job.prepare())[1])
    assert counts[0] == counts[1], counts


def test_syncs_per_check_do_not_depend_on_the_number_of_systems():
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    counts = []
    for n in (2, 16):
        runner = md_runner([bulk("Cu", "fcc", 3.61) * (2, 1, 1) for _ in range(n)], model, "nve", skin=2.0)
        runner.check()
        runner.advance(2)
        with OpCounter() as c:
            runner.check()  # nothing to retire, rebuild or admit
        counts.append(c.syncs)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("kind", ["fire_frechet", "nvt_langevin", pytest.param("lbfgs_frechet", marks=pytest.mark.slow),
                                  pytest.param("bfgs_frechet", marks=pytest.mark.slow)])
def test_step_compiles_fullgraph(kind):
    """torch.compile(fullgraph=True) of the whole step (integrator, edge masking, model, checks): capturable."""
    model = tiny_geodite(channels=8, layers=1)
    ref = _runner(kind, 2, model)
    ref.config.fused_kernels = False
    ref.model_call.no_fused_kernels()
    ref.check()
    torch._dynamo.config.trace_autograd_ops = True
    compiled = torch.compile(ref.step_fn, fullgraph=True, dynamic=False, backend="aot_eager")
    state, slots = compiled(ref.state, ref.slots, ref.edges)
    state_e, slots_e = ref.step_fn(ref.state, ref.slots, ref.edges)
    torch.testing.assert_close(state.batch.positions, state_e.batch.positions, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.forces, state_e.forces, rtol=1e-8, atol=1e-10)


def test_parking_does_not_change_trajectories():
    """A skin so small that systems park (and wait for a rebuild) all the time gives the same trajectory."""
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    structs = [bulk("Cu", "fcc", 3.61) * (2, 2, 1), bulk("Cu", "fcc", 3.7) * (2, 1, 1)]
    kw = dict(ensemble="nvt_nhc", temperature=600, steps=60, progress=False, seed=3)
    big = run_md(structs, model, skin=1.0, **kw)
    tiny = run_md(structs, model, skin=0.002, **kw)
    for a, b in zip(big, tiny, strict=True):
        assert a.n_steps == b.n_steps == 60
        np.testing.assert_allclose(a.final.positions, b.final.positions, rtol=0, atol=1e-12)
    relaxed = [relax_many(structs, model, fmax=0.01, progress=False, config=StepConfig(skin=s)) for s in (1.0, 0.002)]
    for a, b in zip(*relaxed, strict=True):
        assert a.n_steps == b.n_steps
        np.testing.assert_allclose(a.structure.positions, b.structure.positions, rtol=0, atol=1e-12)


def test_graph_step_replays_the_step():
    """Whole-step capture logic (static buffers advanced in place, re-load on re-pack) with an emulated graph."""

    class FakeGraph:
        def __init__(self, fn, device):
            self.fn = fn
            fn()  # a warm-up run, as the real capture does

        def replay(self):
            self.fn()

    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    structs = [bulk("Cu", "fcc", 3.61) * (2, 1, 1), bulk("Cu", "fcc", 3.65)]
    eager = md_runner(structs, model, "nvt_nhc")
    eager.check()
    eager.advance(5)
    graphed = md_runner(structs, model, "nvt_nhc")
    graphed.check()
    step = GraphStep(graphed.step_fn)
    step.graph_factory = FakeGraph
    state, slots = graphed.state, graphed.slots
    for _ in range(5):
        state, slots = step(state, slots, graphed.edges)
    assert step.n_captures == 1
    torch.testing.assert_close(state.batch.positions, eager.state.batch.positions, rtol=0, atol=0)
    torch.testing.assert_close(state.momenta, eager.state.momenta, rtol=0, atol=0)


def test_one_step_too_large_for_the_skin_grows_it():
    """A single FIRE + cell step that moves atoms beyond the skin: the system's skin grows instead of parking
    forever, and the relaxation equals the one with a comfortable skin."""
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    a = bulk("Cu", "fcc", 3.9)
    ref = relax_many([a], model, fmax=0.01, progress=False, config=StepConfig(skin=2.0))[0]
    small = relax_many([a], model, fmax=0.01, progress=False, config=StepConfig(skin=0.01))[0]
    assert ref.converged and small.converged and ref.n_steps == small.n_steps
    np.testing.assert_allclose(small.structure.cell[:], ref.structure.cell[:], rtol=0, atol=1e-10)


def _padded(structures, dtype=torch.float64):
    from geodite_sim.batch import Batch
    from geodite_sim.runner.edges import padding_cell
    from geodite_sim.runner.slots import Bare, pad_state

    b = Batch.from_atoms(structures, dtype=dtype)
    return pad_state(Bare(batch=b), b.n_atoms + 1, b.n_systems, padding_cell(3.0, dtype, "cpu")).batch


def _same_buffer(a, b):
    assert a.n_valid == b.n_valid
    for name in ("sender", "receiver", "shifts", "real", "ref_positions", "ref_full_cell", "ref_cell_inv", "skin"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_remap_and_drop_give_the_fresh_edge_list():
    """``edges.remap`` (survivors keep their edges, indices remapped, no search) and ``edges.drop`` give exactly
    the buffer a fresh build of the same systems at the same positions gives (canonical order, references)."""
    from geodite_sim.runner.edges import drop, make_buffer, remap

    structs = _cells(4)
    old = _padded(structs)
    skin = torch.full((5,), 0.5, dtype=torch.float64)
    buf = make_buffer(old, torch.arange(4), 2.2, skin, "torch", static=False)
    keep = [0, 2, 3]
    new = _padded([structs[k] for k in keep])
    fresh = make_buffer(new, torch.arange(3), 2.2, skin[:4], "torch", static=False)
    for rebuilt in ([], [1], [0, 2]):  # survivors rebuilt at unchanged positions: the same edges again
        out = remap(buf, old, torch.tensor(keep), new, torch.tensor(rebuilt, dtype=torch.long), skin[:4], "torch",
                    static=False)
        _same_buffer(out, fresh)
    dropped = drop(buf, old, torch.tensor([1]), static=False)
    only = make_buffer(old, torch.tensor([0, 2, 3]), 2.2, skin, "torch", static=False)
    assert dropped.n_valid == only.n_valid
    for name in ("sender", "receiver", "shifts", "real"):
        assert torch.equal(getattr(dropped, name), getattr(only, name)), name


class _Steps(Observer):
    """Observer: engine steps run (sum over checks) and the runner."""

    def __init__(self):
        self.steps, self.runner, self.vacated = 0, None, 0

    def on_start(self, runner):
        self.runner = runner
        original = runner.vacate

        def vacate(slots, n_atoms):
            self.vacated += len(slots)
            return original(slots, n_atoms)

        runner.vacate = vacate

    def on_check(self, event):
        self.steps += event.steps


def test_a_relaxation_takes_one_model_call_per_step():
    """Convergence is tested right after each evaluation (ASE's ``irun``): a structure alone takes exactly
    ``n_steps`` engine steps (no extra step to find out it has converged), and one converged at the start
    takes none."""
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    a = bulk("Cu", "fcc", 3.7) * (2, 1, 1)
    a.rattle(0.05, seed=2)
    cfg = StepConfig(skin=1.0, inner_skin=None)  # a skin that never parks: every engine step is a FIRE step
    obs = _Steps()
    res = relax_many([a], model, fmax=0.01, progress=False, observers=[obs], config=cfg)[0]
    assert res.converged and res.n_steps > 5
    assert obs.steps == res.n_steps
    again = _Steps()
    res2 = relax_many([res.structure], model, fmax=0.01, progress=False, observers=[again], config=cfg)[0]
    assert res2.converged and res2.n_steps == 0 and again.steps == 0
    assert res2.energy == pytest.approx(res.energy, abs=1e-12)


def test_vacated_slots_and_deferred_refills_do_not_change_results():
    """Retired systems that leave their atoms in the batch (vacated, edges dropped) and refills deferred until
    enough atoms are free give every structure the result of an immediate re-pack and refill, bit for bit."""
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    structs = []
    for k in range(12):
        s = bulk("Cu", "fcc", 3.55 + 0.02 * k) * ((1, 1, 1), (2, 1, 1), (2, 2, 1))[k % 3]
        s.rattle(0.03 + 0.01 * (k % 4), seed=k)
        structs.append(s)
    kw = dict(fmax=0.01, progress=False, max_atoms=16)
    eager = relax_many(structs, model, config=StepConfig(vacant_fraction=0.0, refill_fraction=0.0), **kw)
    obs = _Steps()
    lazy = relax_many(structs, model, config=StepConfig(vacant_fraction=0.9, refill_fraction=0.5), observers=[obs],
                      **kw)
    assert obs.vacated > 0
    for a, b in zip(eager, lazy, strict=True):
        assert a.converged and a.n_steps == b.n_steps
        np.testing.assert_array_equal(a.structure.positions, b.structure.positions)
        np.testing.assert_array_equal(a.structure.cell[:], b.structure.cell[:])


def test_inner_list_is_the_fresh_list_at_its_margin():
    """``edges.inner`` (a filter of the outer list, no search) = a fresh build at ``cutoff + margin`` of the moved
    atoms, edge for edge in canonical order, with references at the current positions, whenever the outer list can
    supply the margin (its staleness bound + margin <= its skin)."""
    from geodite_sim.runner.edges import inner, make_buffer

    structs = _cells(3)
    b0 = _padded(structs)
    outer = make_buffer(b0, torch.arange(3), 2.2, 0.5, "torch", static=False)
    moved = [s.copy() for s in structs]
    for k, s in enumerate(moved):
        s.rattle(0.02, seed=10 + k)
        s.set_cell(s.cell[:] * 1.005, scale_atoms=True)
    b1 = _padded(moved)
    margin = torch.tensor([0.1, 0.15, 0.2, 0.0], dtype=torch.float64)
    bound = outer.stale_bound(b1.positions, b1.cell, b1.pbc, b1.system_index)
    assert bool((bound[:3] + margin[:3] <= outer.skin[:3]).all())
    got = inner(outer, b1, margin, static=False)
    want = make_buffer(b1, torch.arange(3), 2.2, margin, "torch", static=False)
    assert got.n_valid == want.n_valid < outer.n_valid
    _same_buffer(got, want)


def test_two_level_lists_do_not_change_relaxations():
    """Relaxations with the inner list (the CPU default) equal those with the single Verlet list, bit for bit, and
    the inner list holds fewer edges than the outer one."""
    model = MorsePotential(epsilon=0.35, rho0=4.5, r0=2.55, rcut1=1.6, rcut2=2.2)
    structs = _cells(6, seed=4)

    class Sizes(_Steps):
        sizes: list = []

        def on_check(self, event):
            r = self.runner
            if r.state is not None and r.verlet.inner is not None:
                self.sizes.append((r.verlet.inner.n_valid, r.edges.n_valid))

    obs = Sizes()
    two = relax_many(structs, model, fmax=0.01, progress=False, observers=[obs])
    one = relax_many(structs, model, fmax=0.01, progress=False, config=StepConfig(inner_skin=None))
    assert obs.runner.verlet.two_level and obs.sizes and all(i < o for i, o in obs.sizes)
    for a, b in zip(one, two, strict=True):
        assert a.n_steps == b.n_steps and a.converged
        np.testing.assert_array_equal(a.structure.positions, b.structure.positions)
        np.testing.assert_array_equal(a.structure.cell[:], b.structure.cell[:])


def test_observers_need_only_the_hooks_they_use():
    """Observers are :class:`Observer` subclasses or any object with some of its hooks: the runner calls every hook
    of the wrapper, which forwards to the object's own and does nothing for the others."""
    from geodite_sim.runner.hooks import Job, as_observer

    class Partial:
        def __init__(self):
            self.results = []

        def on_result(self, result):
            self.results.append(result)

    plain = Partial()
    obs = as_observer(plain)
    assert isinstance(obs, Observer)
    obs.on_start(None)
    obs.on_check(None)
    obs.on_result("r")
    obs.on_close()
    assert plain.results == ["r"]
    typed = Observer()
    assert as_observer(typed) is typed
    job = Job()  # the optional job hooks default to "nothing to do"
    assert job.at_check(None, {}) == {} and job.after_check(None) is False
    assert int(job.horizon(None, torch.zeros(3, dtype=torch.long), [])[0]) > 10**15


def test_runner_modules_stay_small():
    """One concept per module: the engine core at most 400 lines, every runner module and front-end at most 500."""
    from pathlib import Path

    import geodite_sim

    root = Path(geodite_sim.__file__).parent
    sizes = {p.relative_to(root).as_posix(): len(p.read_text().splitlines())
             for p in [*root.glob("runner/*.py"), *root.glob("md*.py"), root / "relax.py", root / "executors.py",
                       root / "ray_cluster.py", root / "accelerate.py"]}
    assert sizes["runner/engine.py"] <= 400, sizes
    assert max(sizes.values()) <= 500, sizes
