"""Build the example SSE campaign's starting structures from published lattice parameters and Wyckoff positions.

    python workflows/sse/build_structures.py            # writes workflows/sse/structures/*.extxyz

Each material is built as its conventional cell with pymatgen's ``Structure.from_spacegroup``
and repeated into (a) a supercell at the atom count of the Geodite paper's SSE benchmark
(SI Table S5; ``full.toml``) and (b) a small supercell for the quick variant (``short.toml``).
Files are named ``<material>_<atoms>.extxyz``. Re-running the script rewrites identical files.

Sources of the lattice parameters (room temperature unless stated):

- γ-CuI, zincblende F-43m (216), a = 6.05 Å: D. A. Keen and S. Hull, J. Phys.: Condens. Matter 7,
  5793 (1995), "The high-temperature structural behaviour of copper(I) iodide".
  Cu 4a (0,0,0), I 4c (1/4,1/4,1/4).
- Li3N, P6/mmm (191), a = 3.648 Å, c = 3.875 Å: A. Rabenau and H. Schulz, J. Less-Common Met. 50,
  155 (1976), "Re-evaluation of the lithium nitride structure".
  N 1a (0,0,0), Li(1) 1b (0,0,1/2), Li(2) 2c (1/3,2/3,0).
- Li3OCl, antiperovskite Pm-3m (221), a = 3.91 Å: Y. Zhao and L. L. Daemen, J. Am. Chem. Soc. 134,
  15042 (2012), "Superionic conductivity in lithium-rich anti-perovskites".
  Cl 1a (0,0,0), O 1b (1/2,1/2,1/2), Li 3c (0,1/2,1/2).
- CsPbBr3, cubic perovskite Pm-3m (221), a = 5.874 Å (stable above ~130 °C): C. K. Møller,
  Nature 182, 1436 (1958), "Crystal structure and photoconductivity of caesium plumbohalides".
  Pb 1a (0,0,0), Cs 1b (1/2,1/2,1/2), Br 3d (1/2,0,0).
- NaBH4, cubic (rock-salt Na/B) Fm-3m (225), a = 6.151 kX = 6.16 Å: A. M. Soldate, J. Am. Chem.
  Soc. 69, 987 (1947), "Crystal structure of sodium borohydride". The BH4 tetrahedra are
  orientationally disordered over two orientations (H on 32f at half occupancy); the ordered
  approximant used here takes one orientation for all of them: F-43m (216) with Na 4a (0,0,0),
  B 4b (1/2,1/2,1/2), H 16e (x,x,x), x = 1/2 + d(B-H) / (sqrt(3) a), d(B-H) = 1.21 Å.
- δ-Bi2O3, defect fluorite Fm-3m (225), a = 5.65 Å (stable ~1000-1100 K): H. A. Harwig,
  Z. Anorg. Allg. Chem. 444, 151 (1978), "On the structure of bismuthsesquioxide: the α, β,
  γ, and δ-phase". Bi 4a (0,0,0), O 8c (1/4,1/4,1/4) at 3/4 occupancy. Ordered approximant:
  in every conventional cell the O sites (1/4,1/4,1/4) and (3/4,3/4,3/4) are left empty
  (vacancy pairs along <111>), which leaves every Bi with 6 of its 8 O neighbours (Bi4O6 per cell).

These starting points are then equilibrated by the MD itself (the protocol discards 5 ps).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from ase import Atoms
from pymatgen.core import Lattice, Structure
from pymatgen.io.ase import AseAtomsAdaptor

HERE = Path(__file__).resolve().parent

#: d(B-H) used to place the hydrogens of BH4, Å.
B_H = 1.21


def cui() -> Structure:
    return Structure.from_spacegroup("F-43m", Lattice.cubic(6.05), ["Cu", "I"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def li3n() -> Structure:
    return Structure.from_spacegroup("P6/mmm", Lattice.hexagonal(3.648, 3.875), ["N", "Li", "Li"],
                                     [[0, 0, 0], [0, 0, 0.5], [1 / 3, 2 / 3, 0]])


def li3ocl() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.91), ["Cl", "O", "Li"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0, 0.5, 0.5]])


def cspbbr3() -> Structure:
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(5.874), ["Pb", "Cs", "Br"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])


def nabh4() -> Structure:
    a = 6.16
    x = 0.5 + B_H / (math.sqrt(3.0) * a)
    return Structure.from_spacegroup("F-43m", Lattice.cubic(a), ["Na", "B", "H"],
                                     [[0, 0, 0], [0.5, 0.5, 0.5], [x, x, x]])


def bi2o3_delta() -> Structure:
    s = Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.65), ["Bi", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    vacancies = [np.array([0.25, 0.25, 0.25]), np.array([0.75, 0.75, 0.75])]
    remove = [i for i, site in enumerate(s) if site.specie.symbol == "O"
              and any(np.allclose(site.frac_coords % 1.0, v, atol=1e-6) for v in vacancies)]
    assert len(remove) == 2, remove
    s.remove_sites(remove)
    return s


#: material -> (builder, supercell at the protocol's atom count, small supercell for short runs,
#:              protocol temperatures in K, mobile ion)
MATERIALS = {
    "CuI": (cui, (3, 3, 3), (2, 2, 2), (500, 700, 900), "Cu"),
    "Li3N": (li3n, (4, 4, 4), (2, 2, 2), (300, 500, 700, 900, 1100), "Li"),
    "Li3OCl": (li3ocl, (4, 4, 4), (2, 2, 2), (1250,), "Li"),
    "CsPbBr3": (cspbbr3, (3, 3, 4), (2, 2, 2), (500, 700), "Br"),
    "NaBH4": (nabh4, (3, 2, 2), (1, 1, 1), (300, 450, 600, 750), "Na"),
    "Bi2O3": (bi2o3_delta, (3, 3, 2), (1, 1, 1), (500,), "O"),
}

#: atoms per material in the paper's benchmark (SI Table S5).
PROTOCOL_ATOMS = {"CuI": 216, "Li3N": 256, "Li3OCl": 320, "CsPbBr3": 180, "NaBH4": 288, "Bi2O3": 180}


def build(name: str, supercell: tuple[int, int, int]) -> Atoms:
    """ASE Atoms of ``name`` repeated by ``supercell`` (conventional cell, sorted by element as built)."""
    builder = MATERIALS[name][0]
    atoms = AseAtomsAdaptor.get_atoms(builder()) * supercell
    atoms.pbc = True
    atoms.info = {"material": name, "supercell": list(supercell)}
    return atoms


def write_all(out: Path = HERE / "structures") -> list[Path]:
    from ase.io import write

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (_, big, small, _, _) in MATERIALS.items():
        for sc in (big, small):
            atoms = build(name, sc)
            path = out / f"{name}_{len(atoms)}.extxyz"
            write(path, atoms, format="extxyz")
            paths.append(path)
        assert len(build(name, big)) == PROTOCOL_ATOMS[name], name
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "structures", help="output folder")
    args = p.parse_args(argv)
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
