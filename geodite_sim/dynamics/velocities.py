"""Initial velocities: Maxwell–Boltzmann at a temperature, seeded per structure.

A structure's velocities depend only on (run seed, structure index, temperature, masses),
never on its batch-mates. The draw is ASE's: ``thermalize_momenta`` (p = ξ sqrt(m kT),
ξ ~ N(0,1)) with ``numpy.random.default_rng([seed, index])``, then ``Stationary`` (zero
total momentum, temperature restored by rescaling), so the same momenta can be produced
in ASE for comparisons.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.md.velocitydistribution import Stationary, thermalize_momenta


def structure_rng(seed: int, index: int) -> np.random.Generator:
    """The numpy generator of structure ``index`` in a run seeded with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def system_seed(seed: int, index: int, stream: int = 1) -> int:
    """A 32-bit per-structure seed for the integrators' random streams (Langevin noise)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, np.uint32)[0])


def maxwell_boltzmann(atoms: Atoms, temperature_K: float, seed: int, index: int) -> np.ndarray:
    """[N, 3] ASE momenta (amu·Å/t) drawn at ``temperature_K`` with zero total momentum.

    The atoms object is not modified. A temperature of 0 (or a single atom) gives zeros. Its
    constraints (FixAtoms, FixCartesian) act as in ASE: fixed components get zero momenta and the
    temperature is that of the remaining degrees of freedom.
    """
    n = len(atoms)
    if temperature_K <= 0 or n < 2:
        return np.zeros((n, 3))
    tmp = Atoms(numbers=atoms.numbers, positions=atoms.positions, masses=atoms.get_masses())
    tmp.set_constraint([c.copy() for c in atoms.constraints])
    if tmp.get_number_of_degrees_of_freedom() <= 0:  # everything fixed
        return np.zeros((n, 3))
    thermalize_momenta(tmp, temperature_K, rng=structure_rng(seed, index))
    Stationary(tmp, preserve_temperature=True)
    return tmp.get_momenta()
