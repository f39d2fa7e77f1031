"""Base structures of the universal mode, from the field's libraries (nothing re-implemented here).

- elemental lattices (fcc, bcc, hcp, sc, diamond) from ASE's ``bulk``;
- pymatgen's 288 AFLOW prototypes (``pymatgen.analysis.prototypes``), each site species replaced by a
  domain species of the same oxidation state drawn with pymatgen's ion-substitution probabilities
  (``SubstitutionProbability``, Hautier et al. 2011), so charge balance is kept; prototypes without an
  oxidation-state assignment (intermetallics) are decorated uniformly;
- pyxtal random symmetric crystals (random space group) for pymatgen's 2,135 experimental compositions
  (``exp_compounds.json.gz``) whose elements all lie in the domain;
- dimers (two atoms in a large box) and isolated atoms.

Every builder takes a :class:`numpy.random.Generator` and is deterministic for a given one. Cells are
scaled so that the closest pair sits at the sum of the two covalent radii (the teacher relaxes them).
"""

from __future__ import annotations

import functools
import gzip
import json
import warnings
from importlib import resources

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_numbers, covalent_radii
from ase.neighborlist import neighbor_list

LATTICES = ("fcc", "bcc", "hcp", "sc", "diamond")
#: Box edge (Å) of dimers; pbc off.
DIMER_BOX = 20.0


def rcov(symbol: str) -> float:
    return float(covalent_radii[atomic_numbers[symbol]])


def scale_to_contact(atoms: Atoms, factor: float = 1.0) -> Atoms:
    """Scale a periodic cell isotropically so the closest pair is at ``factor`` x its covalent-radius sum."""
    atoms = atoms.copy()
    cutoff = 2.5 * max(rcov(s) for s in set(atoms.get_chemical_symbols())) * 2 + 1.0
    for _ in range(4):
        i, j, d = neighbor_list("ijd", atoms, cutoff)
        if len(d):
            break
        atoms.set_cell(atoms.cell * 0.7, scale_atoms=True)
    if not len(d):
        return atoms
    z = atoms.numbers
    ratio = np.min(d / (covalent_radii[z[i]] + covalent_radii[z[j]]))
    atoms.set_cell(atoms.cell * (factor / ratio), scale_atoms=True)
    return atoms


def elemental(symbol: str, lattice: str) -> Atoms:
    """An elemental crystal at its covalent-radius contact distance."""
    d = 2 * rcov(symbol)
    a = {"fcc": d * np.sqrt(2), "bcc": 2 * d / np.sqrt(3), "sc": d, "diamond": 4 * d / np.sqrt(3)}
    if lattice == "hcp":
        atoms = bulk(symbol, "hcp", a=d, c=d * np.sqrt(8 / 3))
    else:
        atoms = bulk(symbol, lattice, a=a[lattice], cubic=lattice == "sc")
    return atoms


@functools.cache
def _prototypes() -> list:
    from pymatgen.core import Structure

    path = resources.files("pymatgen") / "analysis" / "prototypes" / "aflow_prototypes.json.gz"
    with gzip.open(str(path)) as f:
        data = json.load(f)
    out = []
    for entry in data:
        s = Structure.from_dict(entry["snl"])
        out.append((entry["tags"]["aflow"], s))
    return out


def prototype_names(max_atoms: int) -> list[str]:
    """AFLOW labels of the prototypes with at least two species and at most ``max_atoms`` atoms."""
    return [name for name, s in _prototypes() if len(s) <= max_atoms and len(s.composition.elements) >= 2]


@functools.cache
def _oxidation_species(name: str) -> dict | None:
    """{element symbol of the prototype: Species with its guessed oxidation state}, or None."""
    s = dict(_prototypes())[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = s.composition.oxi_state_guesses(max_sites=-50)
    if not guesses:
        return None
    from pymatgen.core import Species

    return {el: Species(el, float(q)) for el, q in guesses[0].items()}


@functools.cache
def _substitution_table():
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionProbability

    return SubstitutionProbability()


def decorate_prototype(name: str, elements: tuple[str, ...], rng: np.random.Generator,
                       include: str | None = None) -> Atoms | None:
    """The prototype ``name`` with its species replaced by distinct domain elements (None if impossible);
    ``include``: one of its species (drawn at random) becomes this element, the others are chosen as usual."""
    proto = dict(_prototypes())[name]
    original = [el.symbol for el in proto.composition.elements]
    if len(original) > len(elements):
        return None
    species = _oxidation_species(name)
    table = _substitution_table()
    chosen: dict[str, str] = {}
    if include is not None:
        chosen[original[int(rng.integers(len(original)))]] = include
    for el in original:
        if el in chosen:
            continue
        free = [e for e in elements if e not in chosen.values()]
        weights = None
        if species is not None:
            target = species[el]
            cands, w = [], []
            for sp in table.species:
                if sp.symbol in free and sp.oxi_state == target.oxi_state:
                    cands.append(sp.symbol)
                    w.append(table.prob(target, sp))
            if cands and sum(w) > 0:
                free, weights = cands, np.asarray(w) / sum(w)
        chosen[el] = str(free[rng.choice(len(free), p=weights)])
    atoms = Atoms(symbols=[chosen[site.specie.symbol] for site in proto], positions=proto.cart_coords,
                  cell=proto.lattice.matrix, pbc=True)
    return scale_to_contact(atoms)


@functools.cache
def experimental_compositions() -> list[dict[str, float]]:
    """pymatgen's experimental compositions (element -> amount), in file order."""
    from pymatgen.core import Composition

    path = resources.files("pymatgen") / "analysis" / "compatibility" / "exp_compounds.json.gz"
    with gzip.open(str(path)) as f:
        data = json.load(f)
    out = []
    for entry in data:
        comp = Composition(entry["formula"]).reduced_composition
        out.append({el.symbol: float(n) for el, n in comp.items()})
    return out


def pyxtal_crystal(composition: dict[str, float], max_atoms: int, rng: np.random.Generator) -> Atoms | None:
    """A random symmetric crystal of ``composition`` (Z chosen to fit ``max_atoms``) from pyxtal, or None."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pyxtal import pyxtal

    counts = [int(round(n)) for n in composition.values()]
    if any(abs(c - n) > 1e-6 for c, n in zip(counts, composition.values())) or sum(counts) > max_atoms:
        return None
    zmax = max(1, max_atoms // sum(counts))
    for _ in range(5):
        z = int(rng.integers(1, zmax + 1))
        sg = int(rng.integers(2, 231))
        crystal = pyxtal()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                crystal.from_random(3, sg, list(composition), [c * z for c in counts],
                                    random_state=int(rng.integers(2**31)))
        except Exception:  # noqa: BLE001 - pyxtal refuses impossible Wyckoff combinations by raising
            continue
        if crystal.valid:
            atoms = crystal.to_ase()
            if 0 < len(atoms) <= max_atoms:
                return scale_to_contact(Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True))
    return None


def dimer(a: str, b: str, distance: float) -> Atoms:
    """Two atoms ``distance`` Å apart in a non-periodic box."""
    c = DIMER_BOX / 2
    return Atoms([a, b], positions=[[c, c, c - distance / 2], [c, c, c + distance / 2]], cell=[DIMER_BOX] * 3,
                 pbc=False)
