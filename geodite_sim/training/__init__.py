"""Training Geodite models on labelled structures (energy, forces, stress).

    from geodite_sim.training import Trainer, get_preset, read_samples
    samples = read_samples("train.extxyz")
    model_cfg, train_cfg = get_preset("small", train_overrides={"epochs": 10})
    trainer = Trainer(samples, model_cfg, train_cfg, workdir="run")
    trainer.fit()
    trainer.export("model.ckpt")        # geodite_sim.load_model("model.ckpt")

Command line: ``geodite-sim train DATA --config small --out model.ckpt`` (``python -m geodite_sim.training``).
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING

#: Public names, imported on first access (PEP 562) so ``geodite-sim train --help`` needs no torch.
_LAZY = {
    **dict.fromkeys(("PRESETS", "TrainConfig", "get_preset"), "geodite_sim.training.configs"),
    **dict.fromkeys(("Sample", "collate", "dataset_statistics", "fit_e0", "precompute_edges", "read_samples",
                     "sample_from_atoms", "write_hdf5"), "geodite_sim.training.data"),
    **dict.fromkeys(("EMA", "Trainer"), "geodite_sim.training.trainer"),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geodite_sim.training' has no attribute {name!r}")
    value = getattr(_import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from geodite_sim.training.configs import PRESETS, TrainConfig, get_preset
    from geodite_sim.training.data import (
        Sample,
        collate,
        dataset_statistics,
        fit_e0,
        precompute_edges,
        read_samples,
        sample_from_atoms,
        write_hdf5,
    )
    from geodite_sim.training.trainer import EMA, Trainer

__all__ = [
    "EMA",
    "PRESETS",
    "Sample",
    "TrainConfig",
    "Trainer",
    "collate",
    "dataset_statistics",
    "fit_e0",
    "get_preset",
    "precompute_edges",
    "read_samples",
    "sample_from_atoms",
    "write_hdf5",
]
