"""Campaign spec: the TOML file (materials x temperatures, MD, analysis, transport) as typed settings; refusals
name the key."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from geodite_sim.workflows.sse_transport import TRANSPORT_KEYS, transport_settings

from geodite_sim.md_presets import get_preset

#: Names of the files a campaign writes into its output folder.
TRAJECTORY = "trajectories.h5"
MANIFEST = "campaign.json"
PROGRESS = "progress.json"
ANALYSIS = "analysis.json"

_CAMPAIGN_KEYS = {"name", "output", "model", "model_options", "dtype", "device", "seed"}
_MD_KEYS = {"ensemble", "timestep_fs", "steps", "chain_length", "tdamp_fs", "frame_every", "checkpoint_every",
            "max_atoms", "skin", "monitors", "preset"}
_ANALYSIS_KEYS = {"discard_fs", "rdf_bin_width", "rdf_stride", "msd_fit_fraction", "msd_fit_window_fs",
                  "reference_discard_fs", "device", "remove_com"} | TRANSPORT_KEYS
_MATERIAL_KEYS = {"name", "structure", "temperatures", "mobile", "references"}
_REFERENCE_KEYS = {"file", "discard_fs", "frame_interval_fs", "system", "stride"}


class SpecError(ValueError):
    """A campaign spec that cannot be run; the message says which entry and why."""


# ---------------------------------------------------------------------------------------------- spec
@dataclass
class MDSettings:
    """MD settings shared by every run (defaults: the paper's SSE protocol)."""

    ensemble: str = "nvt_nhc"
    timestep_fs: float = 1.5
    steps: int = 700_000
    chain_length: int = 10
    tdamp_fs: float | None = None  # None: 100 × timestep
    frame_every: int = 10
    checkpoint_every: int = 1000
    max_atoms: int = 0  # 0: the engine's capacity policy (estimate_capacity; on a GPU typically every run at once)
    skin: float = 0.5
    monitors: bool = True


@dataclass
class AnalysisSettings:
    """Analysis settings (changing them re-analyses; the MD is not touched)."""

    discard_fs: float = 5000.0
    rdf_bin_width: float = 0.05
    rdf_stride: int = 1
    msd_fit_fraction: tuple[float, float] = (0.1, 0.5)
    msd_fit_window_fs: tuple[float, float] | None = None
    reference_discard_fs: float = 30000.0
    remove_com: bool = True
    device: str | None = None  # None: the campaign's device
    # transport (geodite_sim.workflows.sse_transport): charges {"Li": 1, ...} (default: pymatgen's guess),
    # extrapolation temperature, R² below which D is "not determined", interval level, frames kept for the MSD
    charges: dict | None = None
    extrapolate_to_K: float = 300.0
    r2_min: float = 0.5
    confidence: float = 0.95
    msd_max_frames: int = 2000


@dataclass
class Reference:
    """A reference trajectory (extxyz, ASE .traj or geodite_sim HDF5) for one run."""

    file: Path
    discard_fs: float
    frame_interval_fs: float | None = None
    system: int | None = None
    stride: int = 1


@dataclass
class Run:
    """One MD run: a material at a temperature; ``index`` is its input index (HDF5 group)."""

    id: str
    index: int
    material: str
    structure: Path
    temperature: float
    mobile: str | None
    reference: Reference | None = None


@dataclass
class CampaignSpec:
    name: str
    output: Path
    model: str
    model_options: dict
    dtype: str
    device: str
    seed: int
    md: MDSettings
    analysis: AnalysisSettings
    runs: list[Run]
    source: Path | None = None

    @property
    def trajectory(self) -> Path:
        return self.output / TRAJECTORY

    @property
    def checkpoint(self) -> Path:
        return self.output / (TRAJECTORY + ".ckpt")

    @property
    def tdamp_fs(self) -> float:
        return self.md.tdamp_fs if self.md.tdamp_fs is not None else 100.0 * self.md.timestep_fs


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _fill(cls, table: dict, where: str):
    obj = cls()
    for k, v in table.items():
        default = getattr(obj, k)
        if isinstance(default, tuple) or k in ("msd_fit_window_fs",):
            if v is not None and (not isinstance(v, list) or len(v) != 2):
                raise SpecError(f"{where}.{k}: expected [start, end], got {v!r}")
            v = tuple(float(x) for x in v) if v is not None else None
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise SpecError(f"{where}.{k}: expected true/false, got {v!r}")
        elif isinstance(default, int) and not isinstance(default, bool):
            if not isinstance(v, int) or isinstance(v, bool):
                raise SpecError(f"{where}.{k}: expected an integer, got {v!r}")
        elif isinstance(default, float) or k == "tdamp_fs":
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise SpecError(f"{where}.{k}: expected a number, got {v!r}")
            v = float(v)
        setattr(obj, k, v)
    return obj


def _reference(value, base: Path, default_discard: float, where: str) -> Reference:
    if isinstance(value, str):
        value = {"file": value}
    if not isinstance(value, dict) or "file" not in value:
        raise SpecError(f"{where}: expected a file name or a table with 'file'")
    _check_keys(value, _REFERENCE_KEYS, where)
    return Reference(file=(base / value["file"]).resolve() if not Path(value["file"]).is_absolute()
                     else Path(value["file"]),
                     discard_fs=float(value.get("discard_fs", default_discard)),
                     frame_interval_fs=None if value.get("frame_interval_fs") is None
                     else float(value["frame_interval_fs"]),
                     system=value.get("system"), stride=int(value.get("stride", 1)))


def load_spec(path_or_dict: str | Path | dict, output: str | Path | None = None,
              base: str | Path | None = None) -> CampaignSpec:
    """Read and validate a campaign spec (a TOML file, or the same content as a dict).

    Structure and reference paths are relative to the spec file's folder (``base`` for a dict);
    ``output`` (default ``[campaign] output``, else ``out/<name>``) is relative to the current
    directory.
    """
    if isinstance(path_or_dict, dict):
        data, source = path_or_dict, None
        base = Path(base or ".").resolve()
    else:
        source = Path(path_or_dict).resolve()
        try:
            data = tomllib.loads(source.read_text())
        except FileNotFoundError:
            raise SpecError(f"campaign spec not found: {path_or_dict}") from None
        except tomllib.TOMLDecodeError as exc:
            raise SpecError(f"{path_or_dict}: invalid TOML: {exc}") from None
        base = source.parent
    _check_keys(data, {"campaign", "md", "analysis", "material"}, "spec")
    camp = data.get("campaign", {})
    _check_keys(camp, _CAMPAIGN_KEYS, "[campaign]")
    _check_keys(data.get("md", {}), _MD_KEYS, "[md]")
    _check_keys(data.get("analysis", {}), _ANALYSIS_KEYS, "[analysis]")
    md_table = dict(data.get("md", {}))
    if "preset" in md_table:  # a named protocol (geodite_sim.md_presets) fills the integrator settings first
        try:
            preset = get_preset(md_table.pop("preset"))
        except ValueError as exc:
            raise SpecError(f"[md].preset: {exc}") from None
        if preset.is_npt:
            raise SpecError(f"[md].preset: {preset.name!r} is an NPT protocol; campaigns run NVT (equilibrate the "
                            "cells with `geodite-sim md run --preset ...` first)")
        given = {k: md_table[k] for k in ("ensemble", "timestep_fs", "chain_length", "tdamp_fs") if k in md_table}
        if given:
            raise SpecError(f"[md]: {sorted(given)} conflict with preset {preset.name!r}; give one or the other")
        md_table.update(ensemble=preset.ensemble, timestep_fs=preset.timestep_fs, chain_length=preset.chain_length,
                        tdamp_fs=preset.tdamp_fs)
        if preset.steps is not None:
            md_table.setdefault("steps", preset.steps)
    md = _fill(MDSettings, md_table, "[md]")
    analysis = _fill(AnalysisSettings, data.get("analysis", {}), "[analysis]")
    try:
        transport_settings(analysis, None)
    except ValueError as exc:
        raise SpecError(str(exc) if str(exc).startswith("[analysis]") else f"[analysis]: {exc}") from None
    from geodite_sim.runner.registry import REGISTRY  # torch: only once a spec is read

    entry = REGISTRY.get(md.ensemble)
    if entry is None or entry.kind != "md":
        raise SpecError(f"[md].ensemble: unknown ensemble {md.ensemble!r}")
    if entry.variable_cell:
        raise SpecError(f"[md].ensemble: {md.ensemble!r} changes the cell (NPT); campaigns run at a fixed cell")
    if md.steps < 1 or md.frame_every < 1 or md.checkpoint_every < 1:
        raise SpecError("[md]: steps, frame_every and checkpoint_every must be >= 1")
    name = str(camp.get("name", source.stem if source else "campaign"))
    out = Path(output or camp.get("output") or Path("out") / name).resolve()

    materials = data.get("material", [])
    if not materials:
        raise SpecError("spec lists no [[material]]")
    runs: list[Run] = []
    seen: set[str] = set()
    for m_i, mat in enumerate(materials):
        where = f"[[material]] #{m_i + 1}"
        _check_keys(mat, _MATERIAL_KEYS, where)
        for key in ("name", "structure", "temperatures"):
            if key not in mat:
                raise SpecError(f"{where}: missing {key!r}")
        where = f"[[material]] {mat['name']!r}"
        structure = Path(mat["structure"])
        structure = structure if structure.is_absolute() else (base / structure).resolve()
        if not structure.exists():
            raise SpecError(f"{where}: structure file not found: {structure}")
        temps = mat["temperatures"]
        if not isinstance(temps, list) or not temps or not all(isinstance(t, (int, float)) and t > 0 for t in temps):
            raise SpecError(f"{where}: temperatures must be a non-empty list of positive numbers (K)")
        refs = mat.get("references", {})
        if not isinstance(refs, dict):
            raise SpecError(f"{where}: references must be a table {{\"<temperature>\" = file or table}}")
        ref_by_t = {}
        for key, value in refs.items():
            try:
                t_ref = float(key)
            except ValueError:
                raise SpecError(f"{where}.references: key {key!r} is not a temperature") from None
            if t_ref not in [float(t) for t in temps]:
                raise SpecError(f"{where}.references: no run at {key} K (temperatures: {temps})")
            ref_by_t[t_ref] = _reference(value, base, analysis.reference_discard_fs, f"{where}.references.{key}")
        for t in temps:
            run_id = f"{mat['name']}-{t:g}K"
            if run_id in seen:
                raise SpecError(f"{where}: duplicate run {run_id}")
            seen.add(run_id)
            runs.append(Run(run_id, len(runs), str(mat["name"]), structure, float(t), mat.get("mobile"),
                            ref_by_t.get(float(t))))
    return CampaignSpec(name, out, str(camp.get("model", "default")), dict(camp.get("model_options", {})),
                        str(camp.get("dtype", "float32")), str(camp.get("device", "cpu")), int(camp.get("seed", 0)),
                        md, analysis, runs, source)


