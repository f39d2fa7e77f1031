"""One batch-capacity policy (issue 24): every front-end without an explicit ``max_atoms`` asks
:func:`geodite_sim.runner.capacity.estimate_capacity`; an explicit value wins; the CLI's defaults defer to it."""

from __future__ import annotations

import importlib

import pytest
from ase.build import bulk

import geodite_sim as gs
import geodite_sim.runner.capacity as capacity
from geodite_sim.cli import build_parser
from geodite_sim.pair_potential import MorsePotential

evaluate_module = importlib.import_module("geodite_sim.evaluate")  # the package re-exports the function

POLICY_ATOMS = 40  # what the patched CPU rule answers: far from any front-end's former constant


@pytest.fixture()
def patched_policy(monkeypatch):
    monkeypatch.setattr(capacity, "_cpu_heuristic", lambda model: POLICY_ATOMS)
    seen: list[int] = []
    original = evaluate_module._chunks

    def recording(atoms_list, max_atoms):
        seen.append(max_atoms)
        return original(atoms_list, max_atoms)

    monkeypatch.setattr(evaluate_module, "_chunks", recording)
    return seen


def cells(n: int = 12):
    return [bulk("Cu", "fcc", 3.61) * (2, 2, 2) for _ in range(n)]  # 8 atoms each, 96 in all (> one-batch size)


def test_evaluate_defaults_to_the_policy_and_an_explicit_value_wins(patched_policy):
    model = MorsePotential()
    default = gs.evaluate(cells(), model)
    explicit = gs.evaluate(cells(), model, max_atoms=16)
    assert patched_policy == [POLICY_ATOMS, 16]
    assert [r["energy"] for r in default] == [r["energy"] for r in explicit]


def test_small_workloads_run_as_one_batch(patched_policy):
    gs.evaluate(cells(3), MorsePotential())  # 24 atoms <= SMALL_WORKLOAD_ATOMS
    assert patched_policy == [capacity.SMALL_WORKLOAD_ATOMS]


CLI_COMMANDS = [
    ["evaluate", "x.xyz"],
    ["md", "run", "x.xyz", "--steps", "1"],
    ["relax", "x.xyz", "--out", "o"],
    ["screen", "x.xyz", "--references", "r", "--out", "o"],
    ["eos", "x.xyz", "--out", "o"],
    ["phonons", "x.xyz", "--out", "o"],
]


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_cli_max_atoms_defaults_defer_to_the_policy(command):
    args = build_parser().parse_args(command)
    assert args.max_atoms is None
