"""One typed settings object per front-end: :class:`RelaxSettings` (``relax_many``) and :class:`MDSettings`
(``run_md``).

The public functions build one from their keyword arguments; the executors (local and Ray), the CLI and the
workflows pass it on whole, so a new option reaches every path by being a field here. The keywords a caller
keeps for itself (``stream``, ``progress``, ``total``, ``executor``) are not settings. An MD restart compares the
fields marked ``restart`` (:meth:`MDSettings.restart_keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

#: Keywords of relax_many / run_md that the caller (driver) handles itself; never settings.
DRIVER_KEYS = ("structures", "model", "stream", "progress", "total", "executor")


def _restart(default: Any = None, name: str | None = None) -> Any:
    """A field an MD restart must match, recorded in the checkpoint as ``name`` (default: the field's name)."""
    return field(default=default, metadata={"restart": name or True})


def _engine(default: Any = None) -> Any:
    """A field results do not depend on (capacity, check schedule, observers, threads): not in a fingerprint."""
    return field(default=default, metadata={"result": False})


def _plain(value: Any) -> Any:
    """A JSON-able form of a setting value (dataclasses as dicts, sequences as lists)."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _kwargs(cls, given: Mapping[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} got unexpected setting(s) {unknown}")
    return cls(**given)


@dataclass(frozen=True)
class RelaxSettings:
    """Every setting of :func:`geodite_sim.relax_many` (same names, same defaults, same meaning; see its docstring).

    Units: ``fmax`` eV/Å, ``memory_budget_bytes`` bytes; ``fire``/``lbfgs``/``bfgs`` the chosen optimiser's
    parameters (a params object, a dict of its fields, or None for ASE's defaults).
    """

    fmax: float = 0.05
    max_steps: int = 500
    relax_cell: bool | Sequence[bool] | Callable[[Any], bool] = True
    max_atoms: int | None = _engine()
    max_systems: int | None = _engine()
    memory_budget_bytes: float | None = _engine()
    check_interval: int | None = _engine()
    optimizer: str = "fire"
    fire: Any = None
    lbfgs: Any = None
    bfgs: Any = None
    cell_factor: float | None = None
    min_distance_factor: float | None = 0.5
    max_volume_ratio: float | None = 3.0
    config: Any = _engine()
    observers: Sequence = _engine(())
    allow_unsupported_elements: bool = False
    fix_symmetry: bool = False
    symprec: float = 0.01
    threads: int | None = _engine()

    @classmethod
    def from_kwargs(cls, **given: Any) -> RelaxSettings:
        """Settings from ``relax_many``-style keywords (TypeError names an unknown one)."""
        return _kwargs(cls, given)

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as ``relax_many`` keywords."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def record(self) -> dict[str, Any]:
        """The settings results depend on, JSON-able, for a resume fingerprint: ``fmax``, ``max_steps`` and
        ``relax_cell`` always, every other such field when it is not its default (so records written before a
        field existed still match a run that leaves it at its default)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("result", True) and (f.name in ("fmax", "max_steps", "relax_cell")
                                                   or f.default is MISSING or value != f.default):
                out[f.name] = _plain(value)
        return out


@dataclass(frozen=True)
class MDSettings:
    """Every setting of :func:`geodite_sim.run_md` (same names, defaults and meaning; see its docstring).

    Units: ``temperature`` K, ``timestep``/``tdamp`` fs, ``friction`` 1/fs. ``temperature``, ``steps`` and the
    registry entry's per-system parameters (e.g. NPT's ``pressure``, GPa) are a value or one per input.
    ``ensemble_params``: the parameters of the chosen registry entry beyond the common ones (NPT: ``pressure``,
    ``pdamp`` fs, ``barostat_chain_length``, ``ploop``); they are part of the restart fingerprint.
    """

    ensemble: str = _restart("nvt_nhc")
    temperature: float | Sequence[float] | None = None
    timestep: float = _restart(1.5, "timestep_fs")
    steps: int | Sequence[int] = 1000
    trajectory: str | Path | None = None
    frame_every: int = _restart(10)
    tdamp: float | None = _restart(None, "tdamp_fs")
    chain_length: int | None = _restart(None)
    tloop: int = _restart(1)
    friction: float = _restart(0.01, "friction_per_fs")
    fix_com: bool = _restart(False)
    seed: int = _restart(0)
    max_atoms: int | None = _restart(None)
    skin: float | None = None  # trajectories do not depend on it (docs/runner.md)
    monitors: Any = True
    checkpoint: str | Path | None = None
    checkpoint_every: int | None = _restart(None)
    restart: bool = False
    save_momenta: bool = False
    memory_budget_bytes: float | None = None
    accelerate: str = "auto"
    config: Any = None
    observers: Sequence = ()
    allow_unsupported_elements: bool = False
    threads: int | None = None
    ensemble_params: Mapping[str, Any] = field(default_factory=dict, metadata={"restart": "ensemble_params"})

    @classmethod
    def from_kwargs(cls, **given: Any) -> MDSettings:
        """Settings from ``run_md``-style keywords; keywords that are not fields go to ``ensemble_params``."""
        names = {f.name for f in fields(cls)}
        extra = {k: given.pop(k) for k in list(given) if k not in names}
        if extra:
            given["ensemble_params"] = {**dict(given.get("ensemble_params") or {}), **extra}
        return _kwargs(cls, given)

    def as_kwargs(self) -> dict[str, Any]:
        """The settings as ``run_md`` keywords (``ensemble_params`` spread out, as run_md takes them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "ensemble_params"}
        out.update(self.ensemble_params)
        return out

    @classmethod
    def restart_keys(cls) -> tuple[str, ...]:
        """Names, in the checkpoint's settings record, of the fields a restart must match (``ensemble_params``
        stands for all of the entry's parameters; the job adds the resolved ones, the dtype and the model)."""
        return tuple(f.name if f.metadata["restart"] is True else f.metadata["restart"]
                     for f in fields(cls) if f.metadata.get("restart"))


__all__ = ["DRIVER_KEYS", "MDSettings", "RelaxSettings"]
