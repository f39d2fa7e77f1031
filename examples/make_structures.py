"""Generate the example structures in ``examples/structures/`` (run from the repository root).

A few dozen small crystals (2-40 atoms) of varied chemistry and prototype, written as CIF
or extxyz, each slightly rattled and strained (fixed seed) so that relaxing them does some
work: rock salt, zinc blende, wurtzite, fluorite/antifluorite, perovskite, rutile, bcc,
fcc, hcp, CsCl, diamond, cuprite, Li3N, supercells and a few triclinic distortions.

    python examples/make_structures.py            # rewrites examples/structures/
    python examples/make_structures.py --properties   # rewrites examples/properties/ only

``examples/properties/`` holds ideal (not rattled, not strained) primitive cells for the property workflows'
examples (phonons, EOS, elastic tensors): their symmetry is exact, so spglib and ASE find their lattice (the
phonon band path of an fcc cell is the fcc one) and the workflows' relaxation keeps it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.io import write
from ase.spacegroup import crystal

OUT = Path(__file__).parent / "structures"
PROPERTIES = Path(__file__).parent / "properties"
SEED = 20261121


def property_examples() -> dict[str, Atoms]:
    """name -> ideal primitive cell (examples/properties/)."""
    return {"Si_diamond": bulk("Si", "diamond", 5.43), "NaCl_rocksalt": bulk("NaCl", "rocksalt", 5.64),
            "MgO_rocksalt": bulk("MgO", "rocksalt", 4.21), "Cu_fcc": bulk("Cu", "fcc", 3.61)}


def perovskite(a_site: str, b_site: str, x: str, a: float) -> Atoms:
    return crystal([a_site, b_site, x], basis=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0)],
                   spacegroup=221, cellpar=[a, a, a, 90, 90, 90])


def rutile(m: str, x: str, a: float, c: float, u: float) -> Atoms:
    return crystal([m, x], basis=[(0, 0, 0), (u, u, 0)], spacegroup=136, cellpar=[a, a, c, 90, 90, 90])


def cuprite(a: float) -> Atoms:
    return crystal(["Cu", "O"], basis=[(0, 0, 0), (0.25, 0.25, 0.25)], spacegroup=224, setting=2,
                   cellpar=[a, a, a, 90, 90, 90])


def li3n(a: float, c: float) -> Atoms:
    return crystal(["N", "Li", "Li"], basis=[(0, 0, 0), (0, 0, 0.5), (1 / 3, 2 / 3, 0)], spacegroup=191,
                   cellpar=[a, a, c, 90, 90, 120])


def structures() -> dict[str, Atoms]:
    """name -> Atoms (before rattling)."""
    s = {
        # rock salt
        "NaCl_rocksalt": bulk("NaCl", "rocksalt", 5.64),
        "KBr_rocksalt": bulk("KBr", "rocksalt", 6.60),
        "LiF_rocksalt": bulk("LiF", "rocksalt", 4.03),
        "MgO_rocksalt": bulk("MgO", "rocksalt", 4.21),
        "CaO_rocksalt_conv": bulk("CaO", "rocksalt", 4.81, cubic=True),
        "NaI_rocksalt": bulk("NaI", "rocksalt", 6.47),
        # zinc blende, wurtzite, diamond
        "ZnS_zincblende": bulk("ZnS", "zincblende", 5.41),
        "ZnO_wurtzite": bulk("ZnO", "wurtzite", a=3.25, c=5.21),
        "AlN_wurtzite": bulk("AlN", "wurtzite", a=3.11, c=4.98),
        "Si_diamond": bulk("Si", "diamond", 5.43),
        "Si_diamond_conv": bulk("Si", "diamond", 5.43, cubic=True),
        # fluorite / antifluorite
        "CaF2_fluorite": bulk("CaF2", "fluorite", 5.46),
        "Li2O_antifluorite": bulk("OLi2", "fluorite", 4.62),
        "Li2S_antifluorite": bulk("SLi2", "fluorite", 5.71),
        # perovskite, rutile, cuprite, Li3N
        "CaTiO3_perovskite": perovskite("Ca", "Ti", "O", 3.84),
        "KNiF3_perovskite": perovskite("K", "Ni", "F", 4.01),
        "TiO2_rutile": rutile("Ti", "O", 4.59, 2.96, 0.305),
        "Cu2O_cuprite": cuprite(4.27),
        "Li3N": li3n(3.65, 3.88),
        # CsCl type
        "CsCl": bulk("CsCl", "cesiumchloride", 4.12),
        "CuZn_B2": bulk("CuZn", "cesiumchloride", 2.95),
        # elemental metals
        "Fe_bcc": bulk("Fe", "bcc", 2.87, cubic=True),
        "Li_bcc": bulk("Li", "bcc", 3.49, cubic=True),
        "Na_bcc": bulk("Na", "bcc", 4.23, cubic=True),
        "K_bcc": bulk("K", "bcc", 5.23, cubic=True),
        "Cu_fcc": bulk("Cu", "fcc", 3.61, cubic=True),
        "Al_fcc": bulk("Al", "fcc", 4.05, cubic=True),
        "Ni_fcc": bulk("Ni", "fcc", 3.52, cubic=True),
        "Mg_hcp": bulk("Mg", "hcp", 3.21, 5.21),
        "Ti_hcp": bulk("Ti", "hcp", 2.95, 4.68),
        "Zn_hcp": bulk("Zn", "hcp", 2.66, 4.95),
        # supercells (12-40 atoms)
        "NaCl_rocksalt_2x2x2": bulk("NaCl", "rocksalt", 5.64) * (2, 2, 2),
        "Cu_fcc_2x2x2": bulk("Cu", "fcc", 3.61) * (2, 2, 2),
        "MgO_rocksalt_conv_2x1x1": bulk("MgO", "rocksalt", 4.21, cubic=True) * (2, 1, 1),
        "Si_diamond_conv_1x1x2": bulk("Si", "diamond", 5.43, cubic=True) * (1, 1, 2),
        "ZnO_wurtzite_2x2x1": bulk("ZnO", "wurtzite", a=3.25, c=5.21) * (2, 2, 1),
        "TiO2_rutile_1x1x2": rutile("Ti", "O", 4.59, 2.96, 0.305) * (1, 1, 2),
        "Fe_bcc_2x2x2": bulk("Fe", "bcc", 2.87, cubic=True) * (2, 2, 2),
        "CaF2_fluorite_conv": bulk("CaF2", "fluorite", 5.46, cubic=True),
        "KNiF3_perovskite_2x2x2": perovskite("K", "Ni", "F", 4.01) * (2, 2, 2),
    }
    return s


#: Structures given an extra triclinic distortion of the cell (random strain ~4%).
TRICLINIC = {"Al_fcc", "NaCl_rocksalt", "TiO2_rutile", "Cu2O_cuprite", "Mg_hcp"}
#: Structures written as extxyz (the rest as CIF).
EXTXYZ = {"Cu_fcc_2x2x2", "Fe_bcc_2x2x2", "Li3N", "KNiF3_perovskite_2x2x2", "ZnO_wurtzite_2x2x1", "Zn_hcp"}


def write_property_examples() -> None:
    PROPERTIES.mkdir(parents=True, exist_ok=True)
    for name, atoms in property_examples().items():
        write(PROPERTIES / f"{name}.cif", atoms, format="cif")
    print(f"wrote {len(property_examples())} structures to {PROPERTIES}")


def main() -> None:
    import sys

    if "--properties" in sys.argv[1:]:
        write_property_examples()
        return
    rng = np.random.default_rng(SEED)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        if old.suffix in (".cif", ".extxyz"):
            old.unlink()
    for name, atoms in structures().items():
        assert 2 <= len(atoms) <= 40, (name, len(atoms))
        strain = 0.01 * rng.standard_normal((3, 3))
        if name in TRICLINIC:
            strain += 0.04 * rng.standard_normal((3, 3))
        atoms.set_cell(atoms.cell[:] @ (np.eye(3) + 0.5 * (strain + strain.T)), scale_atoms=True)
        atoms.rattle(0.03, seed=int(rng.integers(1 << 31)))
        atoms.wrap()
        atoms.info.clear()
        ext = "extxyz" if name in EXTXYZ else "cif"
        write(OUT / f"{name}.{ext}", atoms, format=ext)
    print(f"wrote {len(structures())} structures to {OUT}")


if __name__ == "__main__":
    main()
