"""Speed protocol plumbing (benchmarks/speed_protocol.py): FLOP accounting (counter vs hand count), acceptance
checks, a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_geodite

from geodite_sim.batch import Batch
from geodite_sim.neighbors import neighbor_list

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # benchmark helpers live there
from benchmarking import count_flops  # noqa: E402
from speed_protocol import _layer_flops_counted, acceptance_checks, layer_flops_by_hand, main, silicon  # noqa: E402


@pytest.mark.parametrize("channels,layers", [(16, 2), (24, 3)])
def test_hand_count_equals_flop_counter(channels, layers):
    model = tiny_geodite(torch.float32, channels=channels, layers=layers)
    atoms = silicon(1)
    batch = Batch.from_atoms([atoms], dtype=model.dtype)
    edges = neighbor_list(batch, model.cutoff)
    counted = _layer_flops_counted(model, batch, edges)
    assert counted == layer_flops_by_hand(model.config, len(atoms), int(edges.sender.shape[0]))
    # the whole evaluation (forward + input-gradient backward) is more than twice one layer's forward
    assert count_flops(lambda: model(batch, edges=edges)) > 2 * counted


def _row(model, engine, atoms, us, systems=1):
    return {"model": model, "engine": engine, "atoms": atoms, "systems": systems, "us_per_atom_step": us}


def test_acceptance_checks():
    rows = [
        _row("m", "run_md", 8, 100.0), _row("m", "run_md_batched", 8, 101.0),  # one cell: not compared
        _row("m", "run_md", 64, 50.0), _row("m", "run_md_batched", 64, 40.0, systems=8),
        _row("m", "ase", 8, 120.0),
        _row("CHGNet-0.3.0", "chgnet", 8, 300.0), _row("CHGNet-0.3.0", "chgnet", 64, 30.0),
    ]
    c = acceptance_checks(rows, "m")
    assert [x["atoms"] for x in c["batched_vs_single"]] == [64]
    assert c["batched_vs_single"][0]["speedup"] == pytest.approx(1.25)
    assert c["batched_vs_ase_small"] == [{"model": "m", "atoms": 8, "batch_atoms": 64, "speedup": 3.0}]
    assert c["default_vs_chgnet"][0]["speedup_best_engine"] == pytest.approx(3.0)
    assert c["default_vs_chgnet"][1]["speedup_best_engine"] == pytest.approx(0.75)
    assert c["met"] == {"batched_at_least_as_fast_as_single": True, "batched_2x_faster_than_ase_small": True,
                        "default_faster_than_chgnet": False}


def test_tiny_protocol_run_writes_results(tmp_path):
    """One 8-atom size, two engines, the default model: JSON, table and plot are written."""
    out = tmp_path / "speed"
    assert main(["--sizes", "1", "--engines", "run_md", "ase", "--models", "geodite-mini",
                 "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert {r["engine"] for r in result["rows"]} == {"run_md", "ase"}
    assert all(r["us_per_atom_step"] > 0 for r in result["rows"])
    fa = result["flops"]
    assert fa["layer0_forward_mflop_counted"] == pytest.approx(fa["layer0_forward_mflop_by_hand"])
    assert 0 < fa["fraction_of_peak_reference_count"] < 1
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Targets met" in out.with_suffix(".md").read_text()
