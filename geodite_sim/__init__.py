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

import sys as _sys
import types as _types
import warnings as _warnings
from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from geodite_sim.version import __version__ as __version__

# Import-time noise of dependencies: torch-sim's use of the deprecated torch.jit.script.
_warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

#: Public names, imported on first access (PEP 562) so that ``import geodite_sim`` and the command
#: line start fast: torch, torch-sim, Warp and pymatgen load only when a name that needs them is used.
_LAZY = {
    "Batch": "geodite_sim.batch",
    "GeoditeCalculator": "geodite_sim.calculators",
    "TorchSimModel": "geodite_sim.calculators",
    "evaluate": "geodite_sim.evaluate",
    "StructureError": "geodite_sim.io.structures",
    "MDResult": "geodite_sim.md",
    "run_md": "geodite_sim.md",
    "CheckpointError": "geodite_sim.model",
    "Geodite": "geodite_sim.model",
    "GeoditeConfig": "geodite_sim.model",
    "load_model": "geodite_sim.model",
    "neighbor_list": "geodite_sim.neighbors",
    "RelaxResult": "geodite_sim.relax",
    "relax_many": "geodite_sim.relax",
    "Status": "geodite_sim.status",
    "admit": "geodite_sim.io.admission",
}
#: Modules that import Warp (through torch-sim / nvalchemiops): its CUDA-driver notice is silenced first.
_USES_WARP = {"geodite_sim.calculators"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geodite_sim' has no attribute {name!r}")
    if module in _USES_WARP:
        from geodite_sim._warp import import_warp_quietly

        import_warp_quietly()
    value = getattr(_import_module(module), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """The package module: importing the submodule ``geodite_sim.evaluate`` must not replace the
    function ``geodite_sim.evaluate`` (the import system binds submodules as package attributes)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # static analysers see the real names
    from geodite_sim.batch import Batch
    from geodite_sim.calculators import GeoditeCalculator, TorchSimModel
    from geodite_sim.evaluate import evaluate
    from geodite_sim.io.admission import admit
    from geodite_sim.io.structures import StructureError
    from geodite_sim.md import MDResult, run_md
    from geodite_sim.model import CheckpointError, Geodite, GeoditeConfig, load_model
    from geodite_sim.neighbors import neighbor_list
    from geodite_sim.relax import RelaxResult, relax_many
    from geodite_sim.status import Status


__all__ = [
    "Batch",
    "CheckpointError",
    "Geodite",
    "GeoditeCalculator",
    "GeoditeConfig",
    "MDResult",
    "RelaxResult",
    "Status",
    "StructureError",
    "TorchSimModel",
    "admit",
    "evaluate",
    "load_model",
    "neighbor_list",
    "relax_many",
    "run_md",
]
