"""The Geodite interatomic potential: architecture, checkpoint I/O, model registry."""

from geodite_sim.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from geodite_sim.model.config import GeoditeConfig
from geodite_sim.model.geodite import Edges, Geodite
from geodite_sim.model.registry import load_model

__all__ = [
    "CheckpointError",
    "Edges",
    "Geodite",
    "GeoditeConfig",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
]
