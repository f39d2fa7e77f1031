"""Named models shipped with the package, and ``load_model``."""

from __future__ import annotations

import importlib
import json
from importlib import resources
from pathlib import Path

import torch

from geodite_sim.devices import resolve_device
from geodite_sim.model.checkpoint import load_checkpoint
from geodite_sim.model.geodite import Geodite
from geodite_sim.model.torchsim_adapter import SEVENNET_NAMES, TorchSimAdapter, load_sevennet
from geodite_sim.pair_potential import MorsePotential

#: Name -> file inside ``geodite_sim/models_data``.
PACKAGED_MODELS = {
    "geodite-mini": "geodite-mini.ckpt",
    "geodite-reference-random": "geodite-reference-random.ckpt",
}
DEFAULT_MODEL = "geodite-mini"


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
) -> Geodite | TorchSimAdapter:
    """Load a model for inference.

    ``path_or_name`` is a checkpoint file in the official Geodite-MP format, the name of a
    packaged model, or ``"sevennet-0"`` / ``"7net-0"``: SevenNet-0 (11 July 2024, MIT licence) loaded
    offline from the optional ``sevenn`` wheel, returned as a
    :class:`~geodite_sim.model.torchsim_adapter.TorchSimAdapter` (float32 network; ``dtype=float64``
    runs the engine in float64 around it). Packaged models:

    - ``"geodite-mini"`` (the default, ``None``): a compact Geodite (48 channels, 2 layers, 5 Å,
      119,370 parameters) **distilled from CHGNet 0.3.0** for demonstration and testing. It is
      *not* Geodite-MP and was never trained on DFT. Measured against CHGNet on 644 held-out
      structures of the distillation generator: energy MAE 79.6 meV/atom (16 on chemistries
      like its training set, 136 on new prototype x element pairings), forces 120 meV/Å, stress
      0.0066 eV/Å^3; 13 of 20 held-out cubic crystals relax to within 3 % of CHGNet's lattice
      constant, and a few relax to a wrong volume (``docs/default-model.md``). On top of these
      come CHGNet's own errors against DFT.
    - ``"geodite-reference-random"``: the Geodite-MP architecture (192 channels, 4 layers, 6 Å) in
      the official checkpoint format with **random weights**: meaningless energies; it exists to
      test loading and to time the full-size model.

    ``use_ema`` takes the EMA copy of the weights when the file holds one (the packaged
    geodite-mini already stores its EMA weights as its weights). The model is returned in eval
    mode with frozen weights, on ``device`` in ``dtype``; ``device="auto"`` is CUDA when available, else the CPU
    (as on the command line), and a CUDA device this machine lacks raises
    :class:`~geodite_sim.devices.DeviceError` saying so.
    """
    if path_or_name is None:
        path_or_name = DEFAULT_MODEL

    device = resolve_device(device)  # "auto": CUDA when available; a missing CUDA device: DeviceError saying so
    if isinstance(path_or_name, str) and path_or_name.lower() in SEVENNET_NAMES:
        return load_sevennet(path_or_name, device=device, dtype=dtype)
    if isinstance(path_or_name, str) and path_or_name in PACKAGED_MODELS:
        path = packaged_model_path(path_or_name)
        model = load_checkpoint(path, device=device, dtype=dtype, use_ema=use_ema)
        model.name = path_or_name
        return model
    if isinstance(path_or_name, str) and not Path(path_or_name).exists() and "/" not in path_or_name:
        raise FileNotFoundError(
            f"{path_or_name!r} is neither a checkpoint file nor a packaged model ({sorted(PACKAGED_MODELS)}) "
            f"nor SevenNet-0 ('sevennet-0')"
        )
    model = load_checkpoint(path_or_name, device=device, dtype=dtype, use_ema=use_ema)
    model.name = Path(path_or_name).stem
    return model


def resolve_model(spec: str, options: dict | None = None, dtype: str | torch.dtype = "float32",
                  device: str | torch.device = "cpu"):
    """A model named the way specs and the CLI name them.

    ``spec``: ``"default"`` (the packaged default), a packaged name, ``"sevennet-0"``, a checkpoint path,
    ``"morse"`` (:class:`~geodite_sim.pair_potential.MorsePotential` with ``options``) or
    ``"package.module:factory"`` (called with ``options``, ``dtype`` and ``device``; a torch-sim
    ``ModelInterface`` it returns is wrapped in :class:`TorchSimAdapter`).
    """
    options = dict(options or {})
    if isinstance(dtype, str):
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        dtype = torch.float32 if dtype == "float32" else torch.float64
    if spec == "morse":
        model = MorsePotential(**options, dtype=dtype, device=device)
        model.name = "morse:" + json.dumps(options, sort_keys=True)
        return model
    if ":" in spec and not Path(spec).exists() and not spec.startswith(("/", ".")):
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        model = factory(**options, dtype=dtype, device=device)
        try:
            from torch_sim.models.interface import ModelInterface
        except ImportError:  # pragma: no cover - torch-sim is a dependency
            ModelInterface = ()  # noqa: N806
        if ModelInterface and isinstance(model, ModelInterface) and not isinstance(model, TorchSimAdapter):
            model = TorchSimAdapter(model, name=spec)
        if getattr(model, "name", None) is None:
            model.name = spec
        return model
    if options:
        raise ValueError(f"options {sorted(options)} are only for 'morse' or a 'package.module:factory' model")
    return load_model(None if spec == "default" else spec, device=device, dtype=dtype)
