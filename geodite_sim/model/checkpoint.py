"""Read and write Geodite checkpoints in the official PyTorch-Lightning format (spec §10).

The file is a dict with ``state_dict`` (keys ``encoder.*`` and ``SnapshotDecoder.*``,
some tensors stored under two names), ``hyper_parameters`` (the training config;
architecture in ``["encoder"]["args"]``), ``hparams_name = "config"`` and the
Lightning bookkeeping keys. Energies' E0/scale/shift live in a ``torch.save``
blob stored as a uint8 tensor (``SnapshotDecoder.constants``).

This package adds one optional top-level key, ``"geodite_model"`` (``METADATA_KEY``), a dict holding
``supported_elements`` (sorted atomic numbers of the training set); official loaders ignore it. A file
without it (the official Geodite-MP format) gets its supported elements from its element table: the
elements with a non-zero reference energy E0 in the fidelity's constants.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from geodite_sim.model.config import GeoditeConfig
from geodite_sim.model.geodite import Geodite

DECODER_PREFIX = "SnapshotDecoder."
BLOB_KEYS = ("SnapshotDecoder.constants", "SnapshotDecoder.context")
DEFAULT_FIDELITY = "MPtrj_"
METADATA_KEY = "geodite_model"


class CheckpointError(ValueError):
    """The file is not a loadable Geodite checkpoint; the message names the problem."""


# ---------------------------------------------------------------- key mapping
def official_to_internal(key: str) -> str:
    """Map an official state_dict key (either duplicate name) to this package's parameter name."""
    if key.startswith(DECODER_PREFIX):
        key = "decoder." + key[len(DECODER_PREFIX) :]
    key = key.replace(".dense_layers.", ".layers.")
    key = key.replace(".gamma_w.1.weight", ".W_edp.weight")
    return key


def internal_to_official(key: str) -> list[str]:
    """All official names under which parameter ``key`` is stored (duplicates included)."""
    if key.startswith("decoder."):
        key = DECODER_PREFIX + key[len("decoder.") :]
    if ".layers." in key:
        return [key.replace(".layers.", ".dense_layers."), key]
    if key.endswith(".W_edp.weight"):
        return [key, key.replace(".W_edp.weight", ".gamma_w.1.weight")]
    return [key]


def _blob_to_object(t: torch.Tensor) -> Any:
    return torch.load(io.BytesIO(t.cpu().numpy().tobytes()), weights_only=True)


def _object_to_blob(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).clone()


def _read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a Geodite checkpoint (torch.load failed: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a Geodite checkpoint: expected a Lightning checkpoint with "
            f"'state_dict' and 'hyper_parameters', found {keys}"
        )
    enc = ckpt["hyper_parameters"].get("encoder", {}) if isinstance(ckpt["hyper_parameters"], dict) else {}
    if enc.get("arch") != "Geodite" or "args" not in enc:
        raise CheckpointError(
            f"{path} is not a Geodite checkpoint: hyper_parameters['encoder']['arch'] is {enc.get('arch')!r}"
        )
    return ckpt


def _state_from_official(sd: dict[str, torch.Tensor], model: Geodite, path) -> dict[str, torch.Tensor]:
    """Map official keys to internal ones, checking duplicates agree; strict on missing/unexpected keys."""
    expected = {k: v for k, v in model.state_dict().items() if k != "decoder.e0"}
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        if key in BLOB_KEYS:
            continue
        ik = official_to_internal(key)
        if ik not in expected:
            unexpected.append(key)
            continue
        if ik in mapped and not torch.equal(mapped[ik], value):
            raise CheckpointError(f"{path}: duplicate entries for {ik} differ ({key})")
        mapped[ik] = value
    missing = sorted(set(expected) - set(mapped))
    problems = []
    if missing:
        problems.append(f"missing keys: {[internal_to_official(k)[0] for k in missing][:10]}")
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)[:10]}")
    for k, v in mapped.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            problems.append(
                f"shape mismatch for {internal_to_official(k)[0]}: checkpoint {tuple(v.shape)}, "
                f"model {tuple(expected[k].shape)}"
            )
    if problems:
        raise CheckpointError(f"{path}: state_dict does not match the Geodite architecture: " + "; ".join(problems))
    return mapped


def _ema_state(ckpt: dict, model: Geodite, path) -> dict[str, torch.Tensor]:
    """EMA weights from ``optimizer_states[0]['ema']`` (a tuple in named_parameters order)."""
    try:
        ema = ckpt["optimizer_states"][0]["ema"]
    except (KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"{path} holds no EMA weights (optimizer_states[0]['ema'])") from exc
    names = [n for n, _ in model.named_parameters()]
    if len(ema) != len(names):
        raise CheckpointError(f"{path}: EMA holds {len(ema)} tensors, the model has {len(names)} parameters")
    return dict(zip(names, ema))


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool = False,
    fidelity: str = DEFAULT_FIDELITY,
) -> Geodite:
    """Load a Geodite checkpoint strictly; return an inference-ready model (eval mode, frozen)."""
    ckpt = _read_file(path)
    try:
        config = GeoditeConfig.from_encoder_args(ckpt["hyper_parameters"]["encoder"]["args"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unsupported architecture: {exc}") from exc
    model = Geodite(config)
    sd = ckpt["state_dict"]
    state = _state_from_official(sd, model, path)
    if use_ema:
        ema = _ema_state(ckpt, model, path)
        for k, v in ema.items():
            if tuple(v.shape) != tuple(state[k].shape):
                raise CheckpointError(f"{path}: EMA tensor for {k} has shape {tuple(v.shape)}")
            state[k] = v
    if "SnapshotDecoder.constants" not in sd:
        raise CheckpointError(f"{path}: missing keys: ['SnapshotDecoder.constants'] (E0/scale blob)")
    constants = _blob_to_object(sd["SnapshotDecoder.constants"])
    if fidelity not in constants:
        raise CheckpointError(f"{path}: fidelity {fidelity!r} not in constants (has {list(constants)})")
    c = constants[fidelity]
    state["decoder.e0"] = torch.as_tensor(c["e0"], dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    head = model.decoder
    head.e_scale = float(c["e_scale"])
    head.e_shift = float(c["e_shift"])
    head.constants = constants
    head.fidelity = fidelity
    if "SnapshotDecoder.context" in sd:
        head.context = _blob_to_object(sd["SnapshotDecoder.context"])
    model.supported_elements = checkpoint_elements(ckpt, c["e0"], config.max_z)
    meta = ckpt.get(METADATA_KEY)
    model.card = meta.get("card") if isinstance(meta, dict) and isinstance(meta.get("card"), dict) else None
    model.source = str(path)
    model.checksum = file_checksum(path)
    return prepare_for_inference(model, device, dtype)


def checkpoint_elements(ckpt: dict, e0, max_z: int) -> frozenset[int] | None:
    """Supported atomic numbers of a checkpoint: the recorded training elements, else E0's non-zero entries.

    Returns None when neither tells (E0 all zero). Elements at or above ``max_z`` (the embedding size)
    are never supported.
    """
    meta = ckpt.get(METADATA_KEY)
    if isinstance(meta, dict) and meta.get("supported_elements") is not None:
        return frozenset(int(z) for z in meta["supported_elements"] if 0 < int(z) < max_z)
    table = torch.as_tensor(e0, dtype=torch.float64).reshape(-1)
    nonzero = [z for z, v in enumerate(table.tolist()) if v != 0.0 and 0 < z < max_z]
    return frozenset(nonzero) if nonzero else None


def prepare_for_inference(model: Geodite, device, dtype) -> Geodite:
    """eval mode, frozen parameters (enables the vacuum cache), device and dtype set."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def file_checksum(path: str | Path) -> str:
    """sha256 (first 16 hex digits) of a file, recorded in trajectory metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_checkpoint(
    model: Geodite,
    path: str | Path,
    hyper_parameters: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write ``model`` in the official Lightning format (duplicate keys included, float32).

    ``hyper_parameters`` is merged over a minimal config whose ``encoder`` block
    describes the architecture; ``extra`` adds top-level keys (e.g. ``optimizer_states``).
    """
    sd: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "decoder.e0":
            continue
        for name in internal_to_official(key):
            sd[name] = value.detach().to("cpu", torch.float32).clone()
    head = model.decoder
    constants = dict(head.constants) if head.constants else {}
    entry = dict(constants.get(head.fidelity, {}))
    entry.update(
        e_shift=float(head.e_shift),
        e_scale=float(head.e_scale),
        e0=head.e0.detach().to("cpu", torch.float32).clone(),
    )
    for k in ("force_std", "stress_mean", "stress_std"):
        entry.setdefault(k, 1.0 if k != "stress_mean" else 0.0)
    constants[head.fidelity] = entry
    sd["SnapshotDecoder.constants"] = _object_to_blob(constants)
    sd["SnapshotDecoder.context"] = _object_to_blob(head.context)
    hp = {
        "encoder": {"arch": "Geodite", "args": model.config.to_encoder_args()},
        "decoder": {"in_channels": model.config.hidden_channels, "num_residues": model.config.num_layers},
        "dataset": {"cutoff": model.config.cutoff, "datasets": {"MPtrj": ["Snapshot"]}},
    }
    if hyper_parameters:
        for k, v in hyper_parameters.items():
            if k == "encoder":
                continue
            hp[k] = v
    ckpt = {
        "state_dict": sd,
        "hyper_parameters": hp,
        "hparams_name": "config",
        "pytorch-lightning_version": "2.4.0",
        "epoch": 0,
        "global_step": 0,
    }
    elements = model.supported_elements
    meta: dict = {}
    if elements is not None:
        meta["supported_elements"] = sorted(int(z) for z in elements)
    if getattr(model, "card", None):
        meta["card"] = model.card
    if meta:
        ckpt[METADATA_KEY] = meta
    if extra:
        ckpt.update(extra)
    torch.save(ckpt, str(path))
