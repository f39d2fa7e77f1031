"""geodite_sim: a batched simulation engine for the Geodite interatomic potential.

Public API (see docs/ and README)::

    import geodite_sim as gs
    model = gs.load_model()                         # packaged default model
    out = gs.evaluate(structures, model)            # energies, forces, stress
    results = gs.relax_many(structures, model)     # batched FIRE (+ cell), list[RelaxResult]
    batch = gs.Batch.from_structures(structures)
    edges = gs.neighbor_list(batch, cutoff=6.0)
    md = gs.run_md(structures, model, temperature=600, steps=2000, trajectory="run.h5")  # list[MDResult]
"""

import warnings as _warnings

# Import-time noise of dependencies: torch-sim's use of the deprecated torch.jit.script, and Warp's
# notice that no CUDA driver exists (expected on CPU machines).
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
try:
    import warp as _warp

    _warp.config.quiet = True
except ImportError:  # nvalchemiops (and Warp) are optional at import time
    pass

from geodite_sim.batch import Batch  # noqa: E402
from geodite_sim.calculators import GeoditeCalculator, TorchSimModel
from geodite_sim.evaluate import evaluate
from geodite_sim.io.structures import StructureError
from geodite_sim.md import MDResult, run_md
from geodite_sim.model import CheckpointError, Geodite, GeoditeConfig, load_model
from geodite_sim.neighbors import neighbor_list
from geodite_sim.relax import RelaxResult, relax_many

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CheckpointError",
    "Geodite",
    "GeoditeCalculator",
    "GeoditeConfig",
    "MDResult",
    "TorchSimModel",
    "StructureError",
    "evaluate",
    "load_model",
    "neighbor_list",
    "RelaxResult",
    "relax_many",
    "run_md",
]
