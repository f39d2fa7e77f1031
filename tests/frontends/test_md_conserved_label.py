"""The trajectory's ``conserved`` attribute names what its ``conserved`` series holds, per ensemble (it was chosen
by ensemble name: "total_energy" for MTK and Bussi, whose series hold their extended energies)."""

from __future__ import annotations

import pytest
from ase.build import bulk

from geodite_sim.md import run_md
from geodite_sim.pair_potential import MorsePotential
from geodite_sim.runner import REGISTRY
from geodite_sim.trajectory import read_metadata


@pytest.mark.parametrize("ensemble,starts", [("nve", "total_energy"), ("nvt_nhc", "nhc"),
                                             ("nvt_langevin", "total_energy"), ("nvt_bussi", "bussi"),
                                             ("npt_mtk_iso", "mtk"), ("npt_mtk", "mtk")])
def test_conserved_attribute_names_the_series(tmp_path, ensemble, starts):
    model = MorsePotential(epsilon=0.3, rho0=4.0, r0=2.6, rcut1=1.6, rcut2=2.0)
    path = tmp_path / "run.h5"
    run_md([bulk("Cu", "fcc", 3.7)], model, ensemble=ensemble, temperature=300.0, timestep=1.0, steps=2,
           trajectory=str(path), progress=False)
    label = read_metadata(path)["conserved"]
    assert label == REGISTRY[ensemble].conserved_label and label.startswith(starts)
    if ensemble == "nvt_langevin":
        assert "not conserved" in label
