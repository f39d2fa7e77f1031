"""Generate the inputs of the small stability screen (committed output: candidates/, references/).

Candidates: simple prototypes (rocksalt, CsCl, zincblende, wurtzite, (anti)fluorite, L1_2, rutile,
cristobalite, perovskite, spinel) in the Li-O, Na-Cl, Li-S, Mg-O-Si systems, plus substitutions
(Na -> Li in the Na-Cl prototypes, Li -> Na in Li-O ones), and three inputs that must be reported,
not screened: KCl (K is outside the reference chemical space), Li2Po (Po has no trained reference
energy in the packaged model) and a corrupt CIF.

References (self-consistent; relaxed with the same model by the screen): the elements (metals and
Si in their ground-state lattices; O2, Cl2, S2 as molecules in a box, a simplification of MP's
molecular crystals) and known binaries (Li2O, Li2O2, LiCl, Na2O, NaCl, Li2S, MgO, SiO2
(idealised beta-cristobalite), Mg2Si).

    python workflows/examples/screen_small/generate.py            # writes next to this file
    python workflows/examples/screen_small/generate.py --out DIR
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.io import write
from ase.spacegroup import crystal

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ prototypes (primitive cells)
def rocksalt(a: str, b: str, lat: float) -> Atoms:
    return bulk(a + b, "rocksalt", a=lat)


def cscl(a: str, b: str, lat: float) -> Atoms:
    return bulk(a + b, "cesiumchloride", a=lat)


def zincblende(a: str, b: str, lat: float) -> Atoms:
    return bulk(a + b, "zincblende", a=lat)


def wurtzite(a: str, b: str, lat: float) -> Atoms:
    return bulk(a + b, "wurtzite", a=lat, c=lat * math.sqrt(8 / 3), u=0.375)


def fluorite(cation: str, anion: str, lat: float) -> Atoms:
    """CaF2 type, formula cation anion2 (the antifluorite A2X is ``fluorite(X, A)`` relabelled)."""
    return bulk(cation + anion + anion, "fluorite", a=lat)


def antifluorite(cation: str, anion: str, lat: float) -> Atoms:
    """A2X (Li2O type): anion on the Ca site, cations on the F sites."""
    at = bulk("CaF2", "fluorite", a=lat)
    at.set_chemical_symbols([anion, cation, cation])
    return at


def l12(majority: str, minority: str, lat: float) -> Atoms:
    """Cu3Au type A3B (4 atoms, simple cubic)."""
    return Atoms([minority, majority, majority, majority], cell=[lat] * 3, pbc=True,
                 scaled_positions=[[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def perovskite(a: str, b: str, x: str, lat: float) -> Atoms:
    """Cubic ABX3 (5 atoms)."""
    return Atoms([a, b, x, x, x], cell=[lat] * 3, pbc=True,
                 scaled_positions=[[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def rutile(m: str, x: str, a: float, c: float, u: float = 0.306) -> Atoms:
    return crystal([m, x], [(0, 0, 0), (u, u, 0)], spacegroup=136, cellpar=[a, a, c, 90, 90, 90])


def _primitive(at: Atoms) -> Atoms:
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_atoms(AseAtomsAdaptor.get_structure(at).get_primitive_structure())


def cristobalite(a: float = 7.16) -> Atoms:
    """Idealised beta-cristobalite SiO2 (Fd-3m, 6-atom primitive cell)."""
    conv = crystal(["Si", "O"], [(0, 0, 0), (0.125, 0.125, 0.125)], spacegroup=227, setting=1,
                   cellpar=[a, a, a, 90, 90, 90])
    return _primitive(conv)


def spinel(a: str = "Mg", b: str = "Si", x: str = "O", lat: float = 8.07, u: float = 0.26) -> Atoms:
    """Normal spinel A2BX4 with A on 16d, B on 8a (Mg2SiO4 ringwoodite-like), 14-atom primitive cell."""
    conv = crystal([b, a, x], [(0.125, 0.125, 0.125), (0.5, 0.5, 0.5), (u, u, u)], spacegroup=227, setting=2,
                   cellpar=[lat] * 3 + [90] * 3)
    return _primitive(conv)


def li2o2() -> Atoms:
    """Li2O2 (P6_3/mmc, 8 atoms)."""
    return crystal(["Li", "Li", "O"], [(0, 0, 0), (1 / 3, 2 / 3, 0.25), (1 / 3, 2 / 3, 0.649)], spacegroup=194,
                   cellpar=[3.14, 3.14, 7.65, 90, 90, 120])


def molecule_in_box(symbol: str, bond: float, box: float = 6.0) -> Atoms:
    return Atoms(symbol * 2, positions=[[0, 0, 0], [0, 0, bond]], cell=[box, box * 1.05, box * 1.1], pbc=True)


# ------------------------------------------------------------------ the sets
def candidates() -> dict[str, Atoms]:
    c: dict[str, Atoms] = {}
    # Li-O
    c["Li2O_antifluorite"] = antifluorite("Li", "O", 4.61)
    c["Li2O_antifluorite_expanded"] = antifluorite("Li", "O", 4.90)
    c["LiO_rocksalt"] = rocksalt("Li", "O", 4.30)
    c["LiO_zincblende"] = zincblende("Li", "O", 4.60)
    c["LiO_cscl"] = cscl("Li", "O", 2.70)
    c["LiO2_fluorite"] = fluorite("Li", "O", 4.80)
    c["Li3O_L12"] = l12("Li", "O", 3.90)
    # Na-Cl
    c["NaCl_rocksalt"] = rocksalt("Na", "Cl", 5.64)
    c["NaCl_cscl"] = cscl("Na", "Cl", 3.40)
    c["NaCl_zincblende"] = zincblende("Na", "Cl", 6.00)
    c["NaCl_wurtzite"] = wurtzite("Na", "Cl", 4.20)
    c["Na2Cl_antifluorite"] = antifluorite("Na", "Cl", 6.00)
    c["NaCl2_fluorite"] = fluorite("Na", "Cl", 6.00)
    c["Na3Cl_L12"] = l12("Na", "Cl", 4.80)
    # substitutions: Na -> Li in the Na-Cl prototypes, Li -> Na in Li-O ones
    c["LiCl_rocksalt"] = rocksalt("Li", "Cl", 5.13)
    c["LiCl_cscl"] = cscl("Li", "Cl", 3.10)
    c["LiCl_zincblende"] = zincblende("Li", "Cl", 5.60)
    c["Na2O_antifluorite"] = antifluorite("Na", "O", 5.55)
    c["NaO_rocksalt"] = rocksalt("Na", "O", 4.90)
    # Li-S
    c["Li2S_antifluorite"] = antifluorite("Li", "S", 5.71)
    c["LiS_rocksalt"] = rocksalt("Li", "S", 5.00)
    c["LiS_zincblende"] = zincblende("Li", "S", 5.50)
    c["LiS_cscl"] = cscl("Li", "S", 3.10)
    c["LiS2_fluorite"] = fluorite("Li", "S", 5.70)
    c["Li3S_L12"] = l12("Li", "S", 4.30)
    # Mg-O-Si
    c["MgO_rocksalt"] = rocksalt("Mg", "O", 4.21)
    c["MgO_wurtzite"] = wurtzite("Mg", "O", 3.30)
    c["MgO_cscl"] = cscl("Mg", "O", 2.60)
    c["MgO_zincblende"] = zincblende("Mg", "O", 4.60)
    c["SiO2_rutile"] = rutile("Si", "O", 4.18, 2.67)
    c["SiO2_cristobalite"] = cristobalite()
    c["MgSiO3_perovskite"] = perovskite("Mg", "Si", "O", 3.50)
    c["Mg2SiO4_spinel"] = spinel()
    c["Mg2Si_antifluorite"] = antifluorite("Mg", "Si", 6.35)
    c["MgSi_cscl"] = cscl("Mg", "Si", 3.10)
    # reported, not screened
    c["KCl_rocksalt"] = rocksalt("K", "Cl", 6.29)  # K: outside the reference chemical space
    c["Li2Po_antifluorite"] = antifluorite("Li", "Po", 6.50)  # Po: E0 = 0 in the packaged model
    return c


def references() -> dict[str, Atoms]:
    r: dict[str, Atoms] = {}
    r["Li_bcc"] = bulk("Li", "bcc", a=3.44)
    r["Na_bcc"] = bulk("Na", "bcc", a=4.23)
    r["Mg_hcp"] = bulk("Mg", "hcp", a=3.21, c=5.21)
    r["Si_diamond"] = bulk("Si", "diamond", a=5.43)
    r["O2_box"] = molecule_in_box("O", 1.21)
    r["Cl2_box"] = molecule_in_box("Cl", 1.99)
    r["S2_box"] = molecule_in_box("S", 1.89)
    r["Li2O"] = antifluorite("Li", "O", 4.61)
    r["Li2O2"] = li2o2()
    r["LiCl"] = rocksalt("Li", "Cl", 5.13)
    r["Na2O"] = antifluorite("Na", "O", 5.55)
    r["NaCl"] = rocksalt("Na", "Cl", 5.64)
    r["Li2S"] = antifluorite("Li", "S", 5.71)
    r["MgO"] = rocksalt("Mg", "O", 4.21)
    r["SiO2_cristobalite"] = cristobalite()
    r["Mg2Si"] = antifluorite("Mg", "Si", 6.35)
    return r


def generate(out: Path = HERE, rattle: float = 0.02, seed: int = 0) -> tuple[Path, Path]:
    """Write ``out/candidates/*.cif`` (rattled, so relaxations have work to do) and ``out/references/*.cif``."""
    cdir, rdir = out / "candidates", out / "references"
    for d in (cdir, rdir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for name, at in candidates().items():
        at = at.copy()
        at.rattle(rattle, seed=int(rng.integers(1 << 30)))
        write(cdir / f"{name}.cif", at, format="cif")
    (cdir / "corrupt.cif").write_text("data_corrupt\n_cell_length_a 4.0\n_cell_length_b\n# truncated file\n")
    for name, at in references().items():
        write(rdir / f"{name}.cif", at, format="cif")
    return cdir, rdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    cdir, rdir = generate(args.out)
    print(f"{len(list(cdir.iterdir()))} candidates in {cdir}, {len(list(rdir.iterdir()))} references in {rdir}")


if __name__ == "__main__":
    main()
