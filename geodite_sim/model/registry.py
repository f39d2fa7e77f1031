"""Named models shipped with the package, and ``load_model``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from geodite_sim.model.checkpoint import load_checkpoint
from geodite_sim.model.geodite import Geodite

#: Name -> file inside ``geodite_sim/models_data``.
PACKAGED_MODELS = {
    "geodite-reference-random": "geodite-reference-random.ckpt",
}
DEFAULT_MODEL = "geodite-reference-random"


def packaged_model_path(name: str) -> Path:
    """Path of a model shipped with the package."""
    if name not in PACKAGED_MODELS:
        raise KeyError(f"unknown model name {name!r}; packaged models: {sorted(PACKAGED_MODELS)}")
    return Path(str(resources.files("geodite_sim") / "models_data" / PACKAGED_MODELS[name]))


def load_model(
    path_or_name: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
) -> Geodite:
    """Load a Geodite model for inference.

    ``path_or_name`` is a checkpoint file in the official Geodite-MP format, or
    the name of a packaged model; ``None`` gives the packaged default,
    currently ``geodite-reference-random``: the official-format conformance
    checkpoint with **random weights** (its energies are meaningless; it exists
    to exercise the engine). ``use_ema`` takes the EMA copy of the weights when
    the file holds one. The model is returned in eval mode with frozen weights.
    """
    if path_or_name is None:
        path_or_name = DEFAULT_MODEL
    if isinstance(path_or_name, str) and path_or_name in PACKAGED_MODELS:
        path = packaged_model_path(path_or_name)
        model = load_checkpoint(path, device=device, dtype=dtype, use_ema=use_ema)
        model.name = path_or_name
        return model
    if isinstance(path_or_name, str) and not Path(path_or_name).exists() and "/" not in path_or_name:
        raise FileNotFoundError(
            f"{path_or_name!r} is neither a checkpoint file nor a packaged model ({sorted(PACKAGED_MODELS)})"
        )
    model = load_checkpoint(path_or_name, device=device, dtype=dtype, use_ema=use_ema)
    model.name = Path(path_or_name).stem
    return model
