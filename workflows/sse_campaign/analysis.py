"""Campaign analysis: per-run RDFs, overlap with references, MSD, diffusion and transport, cached in analysis.json."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from geodite_sim.workflows.sse_campaign.runs import RUNS, open_run_store
from geodite_sim.workflows.sse_campaign.spec import ANALYSIS, CampaignSpec, Run
from geodite_sim.workflows.sse_transport import run_transport

from geodite_sim.store import json_default, write_json


# ---------------------------------------------------------------------------------------------- analysis
def _file_key(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def run_locations(spec: CampaignSpec) -> dict[int, tuple[Path, str]]:
    """(HDF5 file, group) of every run's frames: the store's record when it has one (a Ray campaign writes
    one file per shard), else the campaign's ``trajectories.h5`` with group = run index."""
    records = {r.index: r for r in open_run_store(spec, readonly=True).records("run")} \
        if (spec.output / RUNS).exists() else {}
    out = {}
    for run in spec.runs:
        rec = records.get(run.index)
        if rec is not None and rec.trajectory:
            out[run.index] = (Path(rec.trajectory), str(rec.group))
        else:
            out[run.index] = (spec.trajectory, str(run.index))
    return out


def analyse_run(spec: CampaignSpec, run: Run, device: str | None = None,
                location: tuple[Path, str] | None = None) -> dict:
    """RDFs, overlap score with the reference, MSD and diffusion coefficients of one finished run
    (frames at ``location`` = (HDF5 file, group); default the campaign file, group = run index)."""
    import h5py

    from geodite_sim.analysis import compare_rdfs, diffusion_coefficients, load_frames

    a = spec.analysis
    device = device or a.device or spec.device
    file, group = location or (spec.trajectory, str(run.index))
    out: dict[str, Any] = {"id": run.id, "index": run.index, "material": run.material,
                           "temperature": run.temperature, "mobile": run.mobile}
    with h5py.File(file, "r") as f:
        g = f["systems"].get(group)
        if g is None:
            out["status"] = "pending"
            return out
        out.update(status=g.attrs.get("status", ""), error=g.attrs.get("error", "") or None,
                   n_steps=int(g.attrs.get("n_steps", 0)), n_atoms=int(g.attrs.get("n_atoms", 0)),
                   formula=str(g.attrs.get("formula", "")))
        steps = g["step"][()]
        temps = g["temperature"][()]
    keep = steps * spec.md.timestep_fs >= a.discard_fs
    out["mean_temperature"] = float(temps[keep].mean()) if keep.any() else None
    out["std_temperature"] = float(temps[keep].std()) if keep.any() else None
    try:
        frames = load_frames(file, system=int(group), discard_fs=a.discard_fs, stride=a.rdf_stride)
    except ValueError as exc:
        out["analysis_error"] = str(exc)
        return out
    out["n_frames"] = len(frames)
    rdf = frames.rdf(bin_width=a.rdf_bin_width, device=device)
    out["rdf"] = rdf.to_dict()
    if len(frames) >= 4:
        msd = frames.msd(remove_com=a.remove_com, device=device)
        out["msd"] = msd.to_dict()
        try:
            fits = diffusion_coefficients(msd, window_fs=a.msd_fit_window_fs, window_fraction=a.msd_fit_fraction)
            out["diffusion"] = {k: v.to_dict() for k, v in fits.items()}
        except ValueError as exc:
            out["analysis_error"] = f"diffusion fit: {exc}"
    try:
        out["transport"] = run_transport(a, run.mobile, file, group, run.temperature, device)
    except (ValueError, KeyError) as exc:
        out["transport_error"] = f"transport: {exc}"
    if run.reference is not None:
        ref = run.reference
        try:
            ref_frames = load_frames(ref.file, system=ref.system, discard_fs=ref.discard_fs, stride=ref.stride,
                                     frame_interval_fs=ref.frame_interval_fs)
            ref_rdf = ref_frames.rdf(bin_width=a.rdf_bin_width, device=device)
            out["reference"] = {"file": str(ref.file), "n_frames": len(ref_frames), "rdf": ref_rdf.to_dict()}
            out["comparison"] = compare_rdfs(ref_rdf, rdf).to_dict()
        except (ValueError, KeyError, FileNotFoundError) as exc:
            out["reference_error"] = f"{type(exc).__name__}: {exc}"
    return out


def analyse_campaign(spec: CampaignSpec, log: Callable[[str], None] = print, device: str | None = None) -> list[dict]:
    """Analyse every run that has frames; cached in ``analysis.json`` (recomputed when frames,
    analysis settings or reference files change)."""
    import h5py

    cache_path = spec.output / ANALYSIS
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    settings = asdict(spec.analysis)
    settings.pop("device", None)
    results = []
    frames_of = {}
    locations = run_locations(spec)
    for file in sorted({f for f, _ in locations.values()}):
        if not file.exists():
            continue
        with h5py.File(file, "r") as f:
            groups = dict(f["systems"].items())
            for index, (fi, group) in locations.items():
                if fi == file and group in groups:
                    g = groups[group]
                    frames_of[index] = [int(g["step"].shape[0]), str(g.attrs.get("status", ""))]
    for run in spec.runs:
        ref_key = None
        if run.reference is not None:
            ref_file = run.reference.file
            ref_key = [_file_key(ref_file) if ref_file.exists() else None, asdict(run.reference)]
        key = json.dumps({"frames": frames_of.get(run.index), "settings": settings, "timestep": spec.md.timestep_fs,
                          "ref": ref_key}, default=json_default, sort_keys=True)
        hit = cache.get(run.id)
        if hit is not None and hit.get("key") == key:
            results.append(hit["result"])
            continue
        if run.index not in frames_of:
            res = {"id": run.id, "index": run.index, "material": run.material, "temperature": run.temperature,
                   "mobile": run.mobile, "status": "pending"}
        else:
            t = time.perf_counter()
            res = analyse_run(spec, run, device, locations[run.index])
            log(f"[{spec.name}] analysed {run.id}: {res.get('n_frames', 0)} frames in {time.perf_counter() - t:.1f} s")
        cache[run.id] = {"key": key, "result": res}
        results.append(res)
    spec.output.mkdir(parents=True, exist_ok=True)
    write_json(cache_path, cache)
    return results


def summarise(results: list[dict]) -> dict:
    """Mean overlap score over the finished runs with a reference, the worst run, and counts.

    Failed and unfinished runs are analysed (their frames so far) but left out of the mean.
    """
    scored = [r for r in results if r.get("status") == "done" and r.get("comparison")
              and not math.isnan(r["comparison"]["score"])]
    mean = float(np.mean([r["comparison"]["score"] for r in scored])) if scored else None
    worst = min(scored, key=lambda r: r["comparison"]["score"]) if scored else None
    return {"n_runs": len(results), "n_scored": len(scored), "mean_score": mean,
            "worst_run": None if worst is None else worst["id"],
            "worst_score": None if worst is None else worst["comparison"]["score"],
            "n_failed": sum(r.get("status") == "failed" for r in results),
            "n_unfinished": sum(r.get("status") in ("pending", "running") for r in results)}


