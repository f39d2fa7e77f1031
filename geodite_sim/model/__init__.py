"""The Geodite interatomic potential: architecture, checkpoint I/O, model registry, the model contract."""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

#: Public names, imported on first access (PEP 562): ``geodite_sim.model.config`` stays torch-free,
#: so the command line can build its parsers without importing torch.
_LAZY = {
    **dict.fromkeys(("CheckpointError", "load_checkpoint", "save_checkpoint"), "geodite_sim.model.checkpoint"),
    "GeoditeConfig": "geodite_sim.model.config",
    "Edges": "geodite_sim.core.graph",
    "Geodite": "geodite_sim.model.geodite",
    "load_model": "geodite_sim.model.registry",
    **dict.fromkeys(("SimModel", "check_model", "model_fingerprint", "model_name", "supported_elements",
                     "unsupported_elements", "unsupported_elements_message", "uses_edges"),
                    "geodite_sim.model.contract"),
    "TorchSimAdapter": "geodite_sim.model.torchsim_adapter",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geodite_sim.model' has no attribute {name!r}")
    if module == "geodite_sim.model.torchsim_adapter":  # imports torch-sim, hence Warp: no CUDA-driver notice
        from geodite_sim._warp import import_warp_quietly

        import_warp_quietly()
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from geodite_sim.core.graph import Edges
    from geodite_sim.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from geodite_sim.model.config import GeoditeConfig
    from geodite_sim.model.contract import (
        SimModel,
        check_model,
        model_fingerprint,
        model_name,
        supported_elements,
        unsupported_elements,
        unsupported_elements_message,
        uses_edges,
    )
    from geodite_sim.model.geodite import Geodite
    from geodite_sim.model.registry import load_model
    from geodite_sim.model.torchsim_adapter import TorchSimAdapter

__all__ = [
    "CheckpointError",
    "Edges",
    "Geodite",
    "GeoditeConfig",
    "SimModel",
    "TorchSimAdapter",
    "check_model",
    "load_checkpoint",
    "load_model",
    "model_fingerprint",
    "model_name",
    "save_checkpoint",
    "supported_elements",
    "unsupported_elements",
    "unsupported_elements_message",
    "uses_edges",
]
