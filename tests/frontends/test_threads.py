"""The CPU thread policy: ``threads=`` in the Python entry points, ``--threads`` on every sub-command, and a warning
when the machine is oversubscribed (issue 27, item 2)."""

from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from ase.build import bulk

import geodite_sim as gs
from geodite_sim import threads as threads_mod


@pytest.fixture()
def fresh_warning(monkeypatch):
    """The once-per-process warning armed again, the machine made to look busy (load 3 on 2 cores)."""
    monkeypatch.setattr(threads_mod, "_WARNED", False)
    monkeypatch.setattr(threads_mod, "load_average", lambda: 3.0)
    monkeypatch.setattr(threads_mod, "available_cores", lambda: 2)


def _leaf_parsers(parser: argparse.ArgumentParser):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def test_every_subcommand_takes_threads():
    from geodite_sim.cli import build_parser

    leaves = list(_leaf_parsers(build_parser()))
    assert len(leaves) >= 12  # evaluate, relax, md run/info/export, screen, campaign, 4 properties, train, ...
    for p in leaves:
        assert "--threads" in p._option_string_actions, p.prog


def test_python_entry_points_take_threads(morse):
    """``threads=N`` runs the call with N torch threads and restores the caller's setting."""
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.cutoff, self.dtype, self.device = inner.cutoff, inner.dtype, inner.device
            self.supported_elements, self.implemented_properties = None, ("energy", "forces", "stress")
            self.conservative, self.uses_edges = True, True

        def forward(self, batch, edges=None, **kw):
            seen.append(torch.get_num_threads())
            return self.inner(batch, edges=edges, **kw)

    warnings.simplefilter("ignore", RuntimeWarning)  # a busy test machine: the warning is tested below
    model = Spy(morse)
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    atoms = bulk("Cu", "fcc", 3.61, cubic=True)
    gs.evaluate([atoms], model, threads=other)
    gs.relax_many([atoms], model, max_steps=2, threads=other, progress=False)
    gs.run_md([atoms], model, temperature=300.0, steps=2, threads=other, progress=False)
    assert seen and set(seen) == {other}
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        gs.evaluate([atoms], model, threads=0)


def test_oversubscription_warns_once(fresh_warning):
    with pytest.warns(RuntimeWarning, match="2 CPU threads on 2 cores with a load average of 3.0.*--threads 1"):
        threads_mod.warn_if_oversubscribed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert threads_mod.warn_if_oversubscribed(2) is None  # once per process
    assert threads_mod.oversubscription_message(1, 2, 3.0) is None  # one thread never oversubscribes
    assert threads_mod.oversubscription_message(2, 2, 0.2) is None  # an idle machine


def test_cli_threads_option(fresh_warning, monkeypatch, capsys, tmp_path):
    """``--threads 1`` sets the process's threads (no warning); the default keeps the policy and warns when busy."""
    from geodite_sim.cli import main

    current = [2]  # torch's threads, as seen through the patched getter/setter
    monkeypatch.setattr(torch, "set_num_threads", lambda n: current.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: current[-1])
    path = tmp_path / "none.cif"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["evaluate", str(path), "--threads", "1", "--no-progress"]) == 1  # a missing file: exit 1
    assert current[-1] == 1
    current.append(2)
    with pytest.warns(RuntimeWarning, match="--threads 1"):
        main(["evaluate", str(path), "--no-progress"])
