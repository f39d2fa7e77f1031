"""Property workflows run in shared batches: phonons, equations of state, elastic tensors, diatomics.

Each takes many structures and runs every independent calculation of every material (displaced
supercells, strained cells, dimer distances) through one :func:`geodite_sim.evaluate` or
:func:`geodite_sim.relax_many` call per stage; see ``docs/properties.md``::

    from geodite_sim.workflows.properties import run_diatomics, run_elastic, run_eos, run_phonons
"""

from geodite_sim.workflows.properties.diatomics import DiatomicResult, DiatomicsReport, diatomic_metrics, run_diatomics
from geodite_sim.workflows.properties.elastic import ElasticResult, moduli, run_elastic
from geodite_sim.workflows.properties.eos import EOSResult, fit_eos, run_eos
from geodite_sim.workflows.properties.phonons import PhononResult, run_phonons

__all__ = [
    "DiatomicResult",
    "DiatomicsReport",
    "EOSResult",
    "ElasticResult",
    "PhononResult",
    "diatomic_metrics",
    "fit_eos",
    "moduli",
    "run_diatomics",
    "run_elastic",
    "run_eos",
    "run_phonons",
]
