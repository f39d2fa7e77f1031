"""Every documented error path names its problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from conftest import tiny_geodite

import geodite_sim as gs
from geodite_sim.batch import Batch
from geodite_sim.model import CheckpointError, load_model
from geodite_sim.model.registry import packaged_model_path


@pytest.fixture(scope="module")
def official():
    return torch.load(packaged_model_path("geodite-reference-random"), map_location="cpu", weights_only=True)


def _save(tmp_path, obj, name="x.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_not_a_checkpoint_file(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="is not a Geodite checkpoint"):
        load_model(path)


def test_torch_file_without_state_dict(tmp_path):
    path = _save(tmp_path, {"weights": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="expected a Lightning checkpoint"):
        load_model(path)


def test_other_architecture(tmp_path, official):
    ckpt = dict(official)
    ckpt["hyper_parameters"] = {"encoder": {"arch": "MACE", "args": {}}}
    with pytest.raises(CheckpointError, match="arch"):
        load_model(_save(tmp_path, ckpt))


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model("/nonexistent/model.ckpt")


def test_unknown_name():
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a packaged model"):
        load_model("no-such-model")


def test_missing_keys(tmp_path, official):
    sd = dict(official["state_dict"])
    del sd["encoder.ec_list.2.W_vu.weight"]
    ckpt = dict(official, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"missing keys: \['encoder.ec_list.2.W_vu.weight'\]"):
        load_model(_save(tmp_path, ckpt))


def test_unexpected_keys(tmp_path, official):
    sd = dict(official["state_dict"])
    sd["encoder.extra_head.weight"] = torch.zeros(2)
    ckpt = dict(official, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"unexpected keys: \['encoder.extra_head.weight'\]"):
        load_model(_save(tmp_path, ckpt))


def test_shape_mismatch(tmp_path, official):
    sd = dict(official["state_dict"])
    sd["encoder.interaction_list.1.W_q.weight"] = torch.zeros(192, 100)
    ckpt = dict(official, state_dict=sd)
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder.interaction_list.1.W_q.weight"):
        load_model(_save(tmp_path, ckpt))


def test_duplicate_keys_disagree(tmp_path, official):
    sd = dict(official["state_dict"])
    sd["encoder.node_init.W_ndp.layers.0.weight"] = sd["encoder.node_init.W_ndp.layers.0.weight"] + 1.0
    ckpt = dict(official, state_dict=sd)
    with pytest.raises(CheckpointError, match="duplicate entries"):
        load_model(_save(tmp_path, ckpt))


def test_ema_weights_are_used_when_asked(tmp_path, official):
    model = load_model("geodite-reference-random", dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    ema = tuple(p.detach().float() * 0.5 if n.endswith("readout.linears.0.weight") else p.detach().float()
                for n, p in model.named_parameters())
    ckpt = dict(official, optimizer_states=[{"ema": ema}])
    path = _save(tmp_path, ckpt)
    plain = load_model(path, dtype=torch.float64)
    with_ema = load_model(path, dtype=torch.float64, use_ema=True)
    k = names.index("decoder.readout.linears.0.weight")
    torch.testing.assert_close(list(with_ema.parameters())[k], list(plain.parameters())[k] * 0.5)
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_model(packaged_model_path("geodite-reference-random"), use_ema=True)


def test_element_out_of_range_at_evaluation():
    model = tiny_geodite()
    atoms = Atoms(numbers=[100, 1], positions=[[0, 0, 0], [1.0, 0, 0]])
    with pytest.raises(gs.StructureError, match=r"unsupported element Fm: not supported by model 'Geodite'"):
        gs.evaluate([atoms], model, on_error="raise")
    # The model itself also refuses such a batch (e.g. built by hand).
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    with pytest.raises(ValueError, match="outside the model's range"):
        model(batch)


def test_nan_positions():
    atoms = bulk("Si", "diamond", 5.43)
    atoms.positions[1, 0] = np.nan
    with pytest.raises(gs.StructureError, match="NaN or Inf"):
        gs.evaluate([bulk("Cu", "fcc", 3.6), atoms], tiny_geodite(), on_error="raise")
    batch = Batch.from_atoms([bulk("Cu", "fcc", 3.6)], dtype=torch.float64)
    batch.positions[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"positions contain NaN or Inf \(systems \[0\]\)"):
        tiny_geodite()(batch)


def test_singular_cell_on_periodic_system():
    atoms = Atoms("Cu2", positions=[[0, 0, 0], [1.0, 1.0, 0]], cell=[[3, 0, 0], [3, 0, 0], [0, 0, 3]], pbc=True)
    with pytest.raises(gs.StructureError, match="singular cell"):
        gs.evaluate([atoms], tiny_geodite(), on_error="raise")
    batch = Batch.from_atoms([atoms], dtype=torch.float64)
    with pytest.raises(ValueError, match="singular cell"):
        tiny_geodite()(batch)


def test_empty_structure():
    with pytest.raises(gs.StructureError, match="empty structure"):
        gs.evaluate([Atoms()], tiny_geodite(), on_error="raise")


def test_dtype_mismatch():
    batch = Batch.from_atoms([bulk("Cu", "fcc", 3.6)], dtype=torch.float32)
    with pytest.raises(TypeError, match="differs from model dtype"):
        tiny_geodite(torch.float64)(batch)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "broken.cif"
    bad.write_text("data_x\n_cell_length_a nonsense\n")
    with pytest.raises(gs.StructureError, match="could not read"):
        gs.evaluate([str(bad)], tiny_geodite(), on_error="raise")


def test_checkpoint_roundtrip(tmp_path):
    from geodite_sim.model import save_checkpoint

    model = tiny_geodite()
    path = tmp_path / "tiny.ckpt"
    save_checkpoint(model, path)
    again = load_model(path, dtype=torch.float64)
    atoms = bulk("NaCl", "rocksalt", 5.5)
    atoms.rattle(0.05, seed=1)
    a, b = gs.evaluate([atoms], model)[0], gs.evaluate([atoms], again)[0]
    assert a["energy"] == pytest.approx(b["energy"], abs=1e-6)  # weights are stored in float32
