"""Crystal prototypes and the prototype x element combinations of the distillation set.

Each combination is (prototype, elements); ``build(proto, elements, d)`` returns the
primitive cell for a nearest-neighbour bond length ``d`` (Å), and ``bond_estimate``
gives ``d`` from tabulated radii (Shannon ionic radii for ionic prototypes, ASE covalent
radii otherwise). The estimate is only a starting point: generate.py scans the volume
and relaxes each cell with CHGNet before sampling.
"""

from __future__ import annotations

import math

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, covalent_radii
from ase.spacegroup import crystal

# Shannon radii (CN 6, Å) of the ions in the typical oxidation state used here.
IONIC = {
    "Li": 0.76, "Na": 1.02, "K": 1.38, "Cs": 1.67, "Cu": 0.77, "Ag": 1.15, "Mg": 0.72, "Ca": 1.00,
    "Zn": 0.74, "Fe": 0.70, "Ni": 0.69, "Co": 0.70, "Mn": 0.75, "Pb": 1.19, "Sn": 0.90, "Ti": 0.61,
    "Ge": 0.53, "Nb": 0.64, "La": 1.03, "Al": 0.535, "Ga": 0.62, "Bi": 1.03, "Si": 0.40, "B": 0.27,
    "P": 0.38, "Sb": 0.60, "H": 1.30, "O": 1.40, "S": 1.84, "F": 1.33, "Cl": 1.81, "Br": 1.96,
    "I": 2.20, "N": 1.46, "C": 1.60,
}


def rcov(el: str) -> float:
    return float(covalent_radii[atomic_numbers[el]])


def rion(el: str) -> float:
    return IONIC.get(el, rcov(el))


# ------------------------------------------------------------------ builders (primitive cells)
def _rocksalt(e, d):
    return bulk(e[0] + e[1], "rocksalt", a=2 * d)


def _cscl(e, d):
    return bulk(e[0] + e[1], "cesiumchloride", a=2 * d / math.sqrt(3))


def _zincblende(e, d):
    return bulk(e[0] + e[1], "zincblende", a=4 * d / math.sqrt(3))


def _wurtzite(e, d):
    a = d * math.sqrt(8 / 3)
    return bulk(e[0] + e[1], "wurtzite", a=a, c=a * math.sqrt(8 / 3))


def _fluorite(e, d):  # A X2, A on fcc, X in tetrahedral holes
    return bulk(f"{e[0]}{e[1]}2", "fluorite", a=4 * d / math.sqrt(3))


def _antifluorite(e, d):  # A2 X: X on fcc, A in tetrahedral holes
    a = 4 * d / math.sqrt(3)
    return crystal([e[1], e[0]], [(0, 0, 0), (0.25, 0.25, 0.25)], spacegroup=225, cellpar=[a, a, a, 90, 90, 90],
                   primitive_cell=True)


def _perovskite(e, d):  # A B X3, d = B-X
    a = 2 * d
    return crystal(e, [(0.5, 0.5, 0.5), (0, 0, 0), (0.5, 0, 0)], spacegroup=221, cellpar=[a, a, a, 90, 90, 90])


def _antiperovskite(e, d):  # A3 B X (Li3OCl: Li face centres, O body centre, Cl corners), d = A-B
    a = 2 * d
    return crystal([e[0], e[1], e[2]], [(0.5, 0.5, 0), (0.5, 0.5, 0.5), (0, 0, 0)], spacegroup=221,
                   cellpar=[a, a, a, 90, 90, 90])


def _spinel(e, d):  # A B2 X4, d = B-X
    a = 4.19 * d
    return crystal(e, [(0.125, 0.125, 0.125), (0.5, 0.5, 0.5), (0.263, 0.263, 0.263)], spacegroup=227, setting=2,
                   cellpar=[a, a, a, 90, 90, 90], primitive_cell=True)


def _rutile(e, d):
    a = 2.34 * d
    return crystal(e, [(0, 0, 0), (0.305, 0.305, 0)], spacegroup=136, cellpar=[a, a, 0.644 * a, 90, 90, 90])


def _cdi2(e, d):  # A X2 layered (CdI2 / 1T)
    a = 1.42 * d
    return crystal(e, [(0, 0, 0), (1 / 3, 2 / 3, 0.25)], spacegroup=164, cellpar=[a, a, 1.62 * a, 90, 90, 120])


def _delafossite_r3m(e, d):  # A B X2, alpha-NaFeO2 / LiCoO2 (R-3m), d = B-X
    a = 1.47 * d
    return crystal(e, [(0, 0, 0), (0, 0, 0.5), (0, 0, 0.26)], spacegroup=166, cellpar=[a, a, 4.99 * a, 90, 90, 120],
                   primitive_cell=True)


def _corundum(e, d):  # A2 X3
    a = 2.49 * d
    return crystal(e, [(0, 0, 0.352), (0.306, 0, 0.25)], spacegroup=167, cellpar=[a, a, 2.73 * a, 90, 90, 120],
                   primitive_cell=True)


def _defect_fluorite(e, d):  # A2 X3 (delta-Bi2O3-like: fluorite conventional cell with 2 of 8 anions removed)
    a = 4 * d / math.sqrt(3)
    at = bulk(f"{e[0]}{e[1]}2", "fluorite", a=a, cubic=True)
    x = [i for i, s in enumerate(at.get_chemical_symbols()) if s == e[1]]
    del at[[x[0], x[7]]]
    return at


def _l12(e, d):  # A3 B, Cu3Au type, d = nearest-neighbour distance
    a = d * math.sqrt(2)
    return crystal(e, [(0.5, 0.5, 0), (0, 0, 0)], spacegroup=221, cellpar=[a, a, a, 90, 90, 90])


def _bcc(e, d):
    return bulk(e[0], "bcc", a=2 * d / math.sqrt(3))


def _fcc(e, d):
    return bulk(e[0], "fcc", a=d * math.sqrt(2))


def _hcp(e, d):
    return bulk(e[0], "hcp", a=d, c=1.62 * d)


def _sc(e, d):
    return bulk(e[0], "sc", a=d)


def _d03(e, d):  # A3 B (BiF3 / Li3Bi / Fe3Al, Fm-3m): B on fcc, A in all tetrahedral + octahedral holes; d = A-B
    a = 4 * d / math.sqrt(3)
    return crystal([e[1], e[0], e[0]], [(0, 0, 0), (0.25, 0.25, 0.25), (0.5, 0.5, 0.5)], spacegroup=225,
                   cellpar=[a, a, a, 90, 90, 90], primitive_cell=True)


def _diamond(e, d):
    return bulk(e[0], "diamond", a=4 * d / math.sqrt(3))


def _nabh4(e, d):  # A B H4, ordered F-43m approximation of cubic NaBH4; d = A-B distance / 2
    a = 2 * d
    x = 1.22 / (a * math.sqrt(3))
    return crystal(e, [(0, 0, 0), (0.5, 0.5, 0.5), (0.5 + x, 0.5 + x, 0.5 + x)], spacegroup=216,
                   cellpar=[a, a, a, 90, 90, 90], primitive_cell=True)


def _na3ps4(e, d):  # A3 B X4, cubic I-43m Na3PS4, d = B-X
    a = d / (math.sqrt(3) * 0.17)
    return crystal(e, [(0, 0.5, 0.5), (0, 0, 0), (0.17, 0.17, 0.17)], spacegroup=217, cellpar=[a, a, a, 90, 90, 90],
                   primitive_cell=True)


def _li3n(e, d):  # A3 X, P6/mmm, d = in-plane A-X
    a = d * math.sqrt(3)
    return crystal([e[0], e[0], e[1]], [(0, 0, 0.5), (1 / 3, 2 / 3, 0), (0, 0, 0)], spacegroup=191,
                   cellpar=[a, a, 1.06 * a, 90, 90, 120])


def _pyrite(e, d):  # A X2, Pa-3, d = A-X
    a = d / 0.418
    return crystal(e, [(0, 0, 0), (0.385, 0.385, 0.385)], spacegroup=205, cellpar=[a, a, a, 90, 90, 90])


def _cab6(e, d):  # A B6, Pm-3m, d = B-B within an octahedron (~1.72)
    a = d / (math.sqrt(2) * 0.3)
    return crystal(e, [(0, 0, 0), (0.2, 0.5, 0.5)], spacegroup=221, cellpar=[a, a, a, 90, 90, 90])


#: prototype -> (builder, bond-length rule). The rule maps elements to the builder's d.
PROTOTYPES = {
    "rocksalt": (_rocksalt, lambda e, r: r(e[0]) + r(e[1])),
    "cscl": (_cscl, lambda e, r: r(e[0]) + r(e[1])),
    "zincblende": (_zincblende, lambda e, r: rcov(e[0]) + rcov(e[1])),
    "wurtzite": (_wurtzite, lambda e, r: rcov(e[0]) + rcov(e[1])),
    "fluorite": (_fluorite, lambda e, r: r(e[0]) + r(e[1])),
    "antifluorite": (_antifluorite, lambda e, r: r(e[0]) + r(e[1])),
    "perovskite": (_perovskite, lambda e, r: r(e[1]) + r(e[2])),
    "antiperovskite": (_antiperovskite, lambda e, r: r(e[0]) + r(e[1])),
    "spinel": (_spinel, lambda e, r: r(e[1]) + r(e[2])),
    "rutile": (_rutile, lambda e, r: r(e[0]) + r(e[1])),
    "cdi2": (_cdi2, lambda e, r: r(e[0]) + r(e[1])),
    "layered_r3m": (_delafossite_r3m, lambda e, r: r(e[1]) + r(e[2])),
    "corundum": (_corundum, lambda e, r: r(e[0]) + r(e[1])),
    "defect_fluorite": (_defect_fluorite, lambda e, r: r(e[0]) + r(e[1])),
    "l12": (_l12, lambda e, r: rcov(e[0]) + rcov(e[1])),
    "bcc": (_bcc, lambda e, r: 2 * rcov(e[0])),
    "fcc": (_fcc, lambda e, r: 2 * rcov(e[0])),
    "hcp": (_hcp, lambda e, r: 2 * rcov(e[0])),
    "diamond": (_diamond, lambda e, r: 2 * rcov(e[0])),
    "sc": (_sc, lambda e, r: 2 * rcov(e[0])),
    "d03": (_d03, lambda e, r: r(e[0]) + r(e[1])),
    "nabh4": (_nabh4, lambda e, r: r(e[0]) + 2.05),
    "na3ps4": (_na3ps4, lambda e, r: rcov(e[1]) + rcov(e[2])),
    "li3n": (_li3n, lambda e, r: r(e[0]) + r(e[1])),
    "pyrite": (_pyrite, lambda e, r: r(e[0]) + r(e[1])),
    "cab6": (_cab6, lambda e, r: 1.72),
}

#: Cubic prototypes whose relaxed primitive cells are "simple crystals" for the lattice-constant test.
SIMPLE = {"rocksalt", "cscl", "zincblende", "fluorite", "antifluorite", "perovskite", "antiperovskite", "l12",
          "bcc", "fcc", "diamond", "spinel", "pyrite", "na3ps4", "nabh4", "cab6", "sc", "d03"}

_COMBOS = {
    "rocksalt": "Li F;Li Cl;Li Br;Li I;Na F;Na Cl;Na Br;Na I;K F;K Cl;K Br;K I;Cs F;Ag F;Ag Cl;Ag Br;Mg O;Ca O;"
                "Ni O;Co O;Mn O;Fe O;Zn O;Mg S;Ca S;Pb S;Sn S;Mn S;La N;Ti N;Nb N;Ti C;Nb C;Li H;Na H;K H",
    "cscl": "Cs Cl;Cs Br;Cs I;Ni Al;Co Al;Fe Al;Cu Zn;Ag Mg;Ni Ti;Fe Co;Co Ti;Li Ag;Cu Pb",
    "zincblende": "Zn S;Ga P;Al P;Ga Sb;Al Sb;B N;Si C;B P;Cu Cl;Cu Br;Cu I;Ag I;Ga N;Zn O",
    "wurtzite": "Zn O;Ga N;Al N;Zn S;Ag I;Cu Cl",
    "fluorite": "Ca F;Pb F;La H;Ni Si;Co Si;Ca Cl",
    "antifluorite": "Li O;Li S;Na O;Na S;K O;K S;Cu S;Ag S;Mg Si;Mg Ge;Mg Sn;Li N",
    "perovskite": "Cs Pb Br;Cs Pb Cl;Cs Pb I;Cs Sn I;Cs Sn Br;Cs Sn Cl;K Mg F;K Zn F;K Ni F;K Co F;K Mn F;"
                  "Na Mg F;Cs Ca F;Cs Pb F;Ca Ti O;K Nb O;Na Nb O;La Al O;La Ga O;La Ni O;La Co O;La Mn O;"
                  "La Fe O;Bi Fe O;Pb Ti O;Ca Sn O;Ca Ge O;Li Nb O",
    "antiperovskite": "Li O Cl;Li O Br;Li O I;Na O Cl;Na O Br;Na O I;K O I;Ag S I;Ag S Br;Ni C Mg;Fe C Al;"
                      "Co C Al;Mn N Ga;Mn N Zn;Li S I",
    "spinel": "Mg Al O;Zn Al O;Co Al O;Ni Al O;Fe Al O;Mn Al O;Mg Ga O;Zn Ga O;Li Mn O;Li Ti O;Mg Ti O;"
              "Co Co O;Fe Fe O;Mn Mn O;Zn Fe O;Mg Fe O;Ni Fe O",
    "rutile": "Ti O;Sn O;Ge O;Pb O;Mn O;Nb O;Si O;Mg F;Zn F;Ni F;Co F;Fe F;Mn F;Mg H",
    "cdi2": "Pb I;Mg I;Mg Br;Ca I;Ni Br;Fe Br;Co Br;Ti S;Sn S;Nb S;Mg Cl",
    "layered_r3m": "Li Co O;Li Ni O;Li Mn O;Na Co O;Na Fe O;Li Ti S;Na Ti S;Li Fe O;Na Ni O;Na Mn O;Li Nb S",
    "corundum": "Al O;Ga O;Fe O;Ti O;Mn O",
    "defect_fluorite": "Bi O;La O;Sb O",
    "l12": "Ni Al;Ni Ga;Ni Si;Ni Ge;Ni Fe;Ni Mn;Co Ti;Cu Al;Fe Ga;Cu Zn",
    # bcc Cs is left out: its nearest neighbours (5.3 Å) lie beyond a 5 Å cutoff
    "bcc": "Li;Na;K;Fe;Nb;Ti;Cu;Ag;Al;Ni;Co;Mg;Ca;Zn;Mn;Pb;Sn;Bi;La;Ga",
    "fcc": "Cu;Ag;Al;Ni;Ca;Pb;Co;La;Li;Na;K;Fe;Nb;Ti;Mg;Zn;Mn;Sn;Bi;Ga",
    "hcp": "Mg;Zn;Ti;Co;La;Li;Na;Cu;Ag;Al;Ni;Fe;Ca;Nb;Pb;Mn;Sn;Bi",
    "sc": "Sb;Bi;P;Sn;Ge;Si;Ca",
    "d03": "Li Bi;Li Sb;Na Bi;Fe Al;Fe Si;F Bi;H La;Cu Al;Li P",
    "diamond": "C;Si;Ge;Sn",
    "nabh4": "Li B H;Na B H;K B H",
    "na3ps4": "Na P S;Na Sb S;Li P S;K Sb S",
    "li3n": "Li N;Na N;Li P;Na P",
    "pyrite": "Fe S;Ni S;Co S;Mn S",
    "cab6": "Ca B;La B",
}

#: Elements outside the target set slipped into the table above are dropped here.
ELEMENTS = ("Li Na K Cs Cu Ag B N O F S Cl Br I P Ge Sn Sb Ga La Ti Nb Bi Pb H C Si Al Mg Ca Zn Fe Ni Co Mn").split()


def combos() -> list[tuple[str, tuple[str, ...]]]:
    """All (prototype, elements) pairs, in a fixed order, restricted to ELEMENTS."""
    out = []
    for proto, spec in _COMBOS.items():
        for item in spec.split(";"):
            els = tuple(item.split())
            if all(e in ELEMENTS for e in els):
                out.append((proto, els))
    return out


def combo_id(proto: str, els: tuple[str, ...]) -> str:
    return f"{proto}-{''.join(els)}"


#: Elements treated as anions: a compound holding one is sized with ionic radii, otherwise covalent ones.
ANIONS = {"O", "S", "F", "Cl", "Br", "I", "N", "H"}


def build(proto: str, els: tuple[str, ...], scale: float = 1.0) -> Atoms:
    """Primitive cell of ``proto`` with ``els`` at the radius-estimated size times ``scale``."""
    fn, rule = PROTOTYPES[proto]
    d = rule(els, rion if ANIONS & set(els) else rcov)
    atoms = fn(els, d * scale)
    atoms.pbc = True
    return atoms


def heldout_split(all_combos, fraction: float = 0.18, seed: int = 2024) -> set[str]:
    """Held-out combination ids: ~``fraction`` of each prototype, chosen so that the test stays fair.

    Candidates are visited in a seeded random order; one is held out only if afterwards
    (1) its prototype keeps >= 3 training combinations, (2) each of its elements keeps >= 3
    training combinations, and (3) for an elemental crystal, the element keeps another elemental
    training crystal. So every held-out combination is a new pairing of a seen prototype with
    seen elements, never an element or bonding type the model has not met.
    """
    rng = np.random.default_rng(seed)
    ids = {combo_id(p, e): (p, e) for p, e in all_combos}
    order = rng.permutation(sorted(ids)).tolist()
    per_proto: dict[str, int] = {}
    for p, _ in all_combos:
        per_proto[p] = per_proto.get(p, 0) + 1
    quota = {p: int(round(fraction * n)) if n >= 4 else 0 for p, n in per_proto.items()}
    train_proto = dict(per_proto)
    train_el: dict[str, int] = {}
    elemental: dict[str, int] = {}
    for _p, e in all_combos:
        for el in set(e):
            train_el[el] = train_el.get(el, 0) + 1
        if len(e) == 1:
            elemental[e[0]] = elemental.get(e[0], 0) + 1
    held: set[str] = set()
    taken = {p: 0 for p in per_proto}
    for cid in order:
        p, e = ids[cid]
        if taken[p] >= quota[p] or train_proto[p] - 1 < 3:
            continue
        if any(train_el[el] - 1 < 3 for el in set(e)):
            continue
        if len(e) == 1 and elemental[e[0]] - 1 < 1:
            continue
        held.add(cid)
        taken[p] += 1
        train_proto[p] -= 1
        for el in set(e):
            train_el[el] -= 1
        if len(e) == 1:
            elemental[e[0]] -= 1
    return held
