"""The model contract: what the engine needs from a model, and the helpers that read it.

Every model the engine drives (Geodite, the Morse test potential, the padded/accelerated step,
:class:`~geodite_sim.model.torchsim_adapter.TorchSimAdapter` around any torch-sim model) offers:

- ``cutoff`` (float, Å), ``dtype``, ``device``;
- ``supported_elements``: ``frozenset`` of atomic numbers, or ``None`` = every Z the model's tables
  cover (no declared restriction);
- ``implemented_properties``: a tuple drawn from ``("energy", "forces", "stress")``;
- ``conservative``: forces are -dE/dr and stress is (1/V) dE/dstrain (True), or direct heads (False);
- ``uses_edges``: True = the runner passes ``edges=`` built at ``cutoff`` and may pass a padded batch
  (padding atoms in a padding system whose only edges join padding atoms); False = the model builds its
  own neighbour list and the runner passes the real systems only;
- the call ``model(batch, edges=None, compute_forces=True, compute_stress=True)`` returning
  ``energy`` [S] eV, ``forces`` [N, 3] eV/Å, ``stress`` [S, 3, 3] eV/Å^3 (ASE sign; zeros unless the
  system is periodic along all three axes).

Engine code reads these through the helpers below (never ``getattr(model, ...)``): wrappers that hold
the real model as ``.model`` (``TorchSimModel``) are looked through for what they do
not declare themselves. See ``docs/model-contract.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

PROPERTIES = ("energy", "forces", "stress")

#: The attributes of the contract (the call is checked separately).
CONTRACT_ATTRIBUTES = ("cutoff", "dtype", "device", "supported_elements", "implemented_properties",
                       "conservative", "uses_edges")

#: Attributes that never enter a fingerprint: names, file provenance, and engine settings a caller may still set on
#: a model object (``neighbor_backend``/``fused_kernels``: the models no longer read them; the step configuration
#: and ``forward``'s keywords carry them).
_NOT_IDENTITY = {"name", "source", "checksum", "card", "neighbor_backend", "fused_kernels", "training",
                 "supported_elements", "implemented_properties", "conservative", "uses_edges"}


@runtime_checkable
class SimModel(Protocol):
    """A model the engine can drive (see the module docstring for the meaning of each member)."""

    cutoff: float
    dtype: torch.dtype
    device: torch.device
    supported_elements: frozenset[int] | None
    implemented_properties: tuple[str, ...]
    conservative: bool
    uses_edges: bool

    def __call__(self, batch: Any, edges: Any = None, compute_forces: bool = True,
                 compute_stress: bool = True) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------ lookup
def _inner(model: Any) -> Any | None:
    """The wrapped model of a wrapper (``TorchSimModel``, ...), or None."""
    inner = model.__dict__.get("model") if hasattr(model, "__dict__") else None
    if inner is None and isinstance(model, torch.nn.Module):
        inner = model._modules.get("model")
    if inner is None or inner is model or not callable(inner):
        return None
    return inner


def contract_attribute(model: Any, name: str) -> Any:
    """``model.<name>``, looking through wrappers (``.model``) that do not declare it; AttributeError if absent."""
    seen = 0
    obj = model
    while obj is not None and seen < 8:
        try:
            return getattr(obj, name)
        except AttributeError:
            obj = _inner(obj)
            seen += 1
    raise AttributeError(f"{type(model).__name__} has no contract attribute {name!r}")


def unwrap(model: Any) -> Any:
    """The innermost model behind wrappers holding it as ``.model``."""
    obj = model
    for _ in range(8):
        inner = _inner(obj)
        if inner is None:
            return obj
        obj = inner
    return obj


def check_model(model: Any) -> None:
    """Raise TypeError naming every contract attribute ``model`` lacks (or holds with a wrong type)."""
    problems = []
    if not callable(model):
        problems.append("it is not callable as model(batch, edges=..., compute_forces=..., compute_stress=...)")
    values = {}
    for name in CONTRACT_ATTRIBUTES:
        try:
            values[name] = contract_attribute(model, name)
        except AttributeError:
            problems.append(f"missing attribute {name!r}")
    if "cutoff" in values and not (isinstance(values["cutoff"], (int, float)) and values["cutoff"] > 0):
        problems.append(f"cutoff must be a positive float (Å), got {values['cutoff']!r}")
    if "dtype" in values and not isinstance(values["dtype"], torch.dtype):
        problems.append(f"dtype must be a torch.dtype, got {values['dtype']!r}")
    if "device" in values and not isinstance(values["device"], (torch.device, str)):
        problems.append(f"device must be a torch.device, got {values['device']!r}")
    se = values.get("supported_elements", None)
    if se is not None and not (isinstance(se, (frozenset, set)) and all(isinstance(z, int) for z in se)):
        problems.append(f"supported_elements must be a frozenset of atomic numbers or None, got {type(se).__name__}")
    props = values.get("implemented_properties")
    if props is not None and ("implemented_properties" in values) and (
            "energy" not in props or any(p not in PROPERTIES for p in props)):
        problems.append(f"implemented_properties must include 'energy' and be drawn from {PROPERTIES}, got {props!r}")
    for name in ("conservative", "uses_edges"):
        if name in values and not isinstance(values[name], bool):
            problems.append(f"{name} must be a bool, got {values[name]!r}")
    if problems:
        raise TypeError(f"{type(model).__name__} does not satisfy the model contract: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------ elements
def supported_elements(model: Any) -> frozenset[int] | None:
    """The atomic numbers ``model`` declares, or None when it declares no restriction."""
    try:
        se = contract_attribute(model, "supported_elements")
    except AttributeError:
        return None
    return None if se is None else frozenset(int(z) for z in se)


def unsupported_elements(model: Any, numbers: Iterable[int] | torch.Tensor) -> list[int]:
    """Sorted distinct atomic numbers of ``numbers`` that ``model`` does not support (host-side check)."""
    allowed = supported_elements(model)
    if isinstance(numbers, torch.Tensor):
        present = {int(z) for z in torch.unique(numbers.detach().cpu()).tolist()}
    else:
        present = {int(z) for z in numbers}
    if allowed is None:
        return sorted(z for z in present if z < 1)
    return sorted(present - allowed)


def unsupported_elements_message(model: Any, numbers: Iterable[int] | torch.Tensor) -> str | None:
    """A per-structure error text naming the unsupported elements and the model, or None if all are supported."""
    bad = unsupported_elements(model, numbers)
    if not bad:
        return None
    from ase.data import chemical_symbols

    names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in bad)
    n = len(supported_elements(model) or ())
    return (f"unsupported element(s) {names} for model {model_name(model)} "
            f"(it declares {n} supported elements; pass allow_unsupported_elements=True to evaluate anyway)")


# ------------------------------------------------------------------------------------------ other members
def implemented_properties(model: Any) -> tuple[str, ...]:
    """The outputs ``model`` computes (default: all three)."""
    try:
        return tuple(contract_attribute(model, "implemented_properties"))
    except AttributeError:
        return PROPERTIES


def uses_edges(model: Any) -> bool:
    """True when the runner must pass ``edges=`` (default True: Geodite-like models)."""
    try:
        return bool(contract_attribute(model, "uses_edges"))
    except AttributeError:
        return True


def is_conservative(model: Any) -> bool:
    try:
        return bool(contract_attribute(model, "conservative"))
    except AttributeError:
        return True


def model_name(model: Any) -> str:
    """A display name: ``model.name`` where set (also on a wrapped model), else the class name."""
    try:
        name = contract_attribute(model, "name")
    except AttributeError:
        name = None
    return str(name) if name else type(unwrap(model)).__name__


# ------------------------------------------------------------------------------------------ fingerprint
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _identity_holder(model: Any) -> Any:
    """The object whose identity the fingerprint hashes: the first one defining ``identity_config``, looking
    through wrappers (``TorchSimModel``) that hold it as ``.model``; else the innermost."""
    obj = model
    for _ in range(8):
        if callable(getattr(type(obj), "identity_config", None)):
            return obj
        inner = _inner(obj)
        if inner is None:
            return obj
        obj = inner
    return obj


def _tensors(inner: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of ``inner``'s ``state_dict`` (when it is an nn.Module), in a canonical (sorted) order."""
    if isinstance(inner, torch.nn.Module):
        return sorted(inner.state_dict(keep_vars=True).items())
    return []


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.numel() <= 64 else f"tensor{tuple(value.shape)}"
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def identity_config(model: Any) -> dict:
    """The non-tensor settings that define ``model``'s function (part of its fingerprint).

    A model may define ``identity_config() -> dict``; otherwise its ``config`` (a dataclass) and its
    public scalar attributes are used (names, file provenance and engine settings excluded).
    """
    inner = _identity_holder(model)
    if callable(getattr(type(inner), "identity_config", None)):
        return _jsonable(inner.identity_config())
    out: dict[str, Any] = {}
    for key, value in sorted(getattr(inner, "__dict__", {}).items()):
        if key.startswith("_") or key in _NOT_IDENTITY:
            continue
        if (key == "config" or isinstance(value, (int, float, str, bool))
                or (isinstance(value, torch.Tensor) and value.numel() <= 64)):
            out[key] = _jsonable(value)
    return out


def model_fingerprint(model: Any) -> str:
    """One identity (16 hex digits) for every resume and restart check.

    sha256 over the model's class, :func:`identity_config` and the bytes of every tensor of its
    ``state_dict`` (sorted by name, dtype included; device-independent). A weight changed in memory gives
    a new fingerprint; wrappers (``TorchSimModel``) share their model's. The hash is
    cached per model, keyed on the tensors' ``_version`` counters and storage, so repeated calls are cheap.
    """
    inner = _identity_holder(model)
    tensors = _tensors(inner)
    config = json.dumps(identity_config(inner), sort_keys=True, default=repr)
    key = (config, tuple((k, t._version, t.data_ptr(), t.dtype, tuple(t.shape)) for k, t in tensors))
    try:
        cached = _FINGERPRINTS.get(inner)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256()
    cls = type(inner)
    h.update(f"{cls.__module__}.{cls.__qualname__}\n".encode())
    h.update(config.encode())
    for name, t in tensors:
        t = t.detach()
        h.update(f"\n{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        data = t.cpu().contiguous().reshape(-1)
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    digest = h.hexdigest()[:16]
    try:
        _FINGERPRINTS[inner] = (key, digest)
    except TypeError:
        pass
    return digest


__all__ = [
    "PROPERTIES",
    "SimModel",
    "check_model",
    "contract_attribute",
    "identity_config",
    "implemented_properties",
    "is_conservative",
    "model_fingerprint",
    "model_name",
    "supported_elements",
    "unsupported_elements",
    "unsupported_elements_message",
    "unwrap",
    "uses_edges",
]
