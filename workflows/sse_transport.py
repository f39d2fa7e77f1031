"""Transport part of the SSE campaign: per-run tracer D (:mod:`geodite_sim.analysis.transport`), per-material
Arrhenius fit and extrapolation (:mod:`geodite_sim.analysis.arrhenius`), the report's transport tables and
Arrhenius plots. Called by :mod:`geodite_sim.workflows.sse_campaign` (``analyse_run``, ``write_report``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from geodite_sim.analysis.arrhenius import ArrheniusFit, fit_arrhenius

#: ``[analysis]`` keys of the transport analysis (beyond discard_fs, msd_fit_*, remove_com, device).
TRANSPORT_KEYS = {"charges", "extrapolate_to_K", "r2_min", "confidence", "msd_max_frames"}


def check_charges(charges, where: str = "[analysis].charges") -> dict[str, float] | None:
    """``{"Li": 1, "N": -3}`` (element symbols → numbers) or None; raises ValueError naming the bad entry."""
    from ase.data import chemical_symbols

    if charges is None:
        return None
    if not isinstance(charges, dict):
        raise ValueError(f"{where}: expected a table {{Li = 1, ...}}, got {charges!r}")
    for el, q in charges.items():
        if el not in chemical_symbols[1:] or isinstance(q, bool) or not isinstance(q, (int, float)):
            raise ValueError(f"{where}: {el} = {q!r} is not ELEMENT = number")
    return {el: float(q) for el, q in charges.items()}


def transport_settings(analysis, mobile: str | None):
    """:class:`TransportSettings` of a campaign's ``[analysis]`` for a run whose mobile ion is ``mobile``."""
    from geodite_sim.analysis.transport import TransportSettings

    return TransportSettings(mobile=(mobile,) if mobile else (), discard_fs=analysis.discard_fs,
                             fit_fraction=tuple(analysis.msd_fit_fraction),
                             fit_window_fs=tuple(analysis.msd_fit_window_fs) if analysis.msd_fit_window_fs else None,
                             drift="com" if analysis.remove_com else "none", r2_min=analysis.r2_min,
                             confidence=analysis.confidence, max_frames=analysis.msd_max_frames,
                             charges=check_charges(analysis.charges))


def run_transport(analysis, mobile: str | None, file: Path, group: str, temperature: float, device: str) -> dict:
    """The transport result of one run (streamed from ``file``, HDF5 group ``group``), as a dict."""
    from geodite_sim.analysis.transport import analyse_transport

    settings = replace(transport_settings(analysis, mobile), temperature_K=temperature)
    return analyse_transport(file, int(group), settings, device=device).to_dict()


def material_transport(results: list[dict], analysis) -> dict[str, dict]:
    """Per material: the Arrhenius fit of the mobile ion's determined D over the finished runs, D and the
    Nernst–Einstein conductivity at ``extrapolate_to_K`` with intervals, and the flags."""
    from geodite_sim.analysis.transport import conversion_factor

    out: dict[str, dict] = {}
    for material in dict.fromkeys(r["material"] for r in results):
        runs = [r for r in results if r["material"] == material and r.get("status") == "done" and r.get("transport")]
        mobile = next((r.get("mobile") for r in runs if r.get("mobile")), None)
        entry: dict = {"mobile": mobile, "temperature_K": analysis.extrapolate_to_K, "excluded": []}
        out[material] = entry
        if not mobile:
            entry["flags"] = ["no mobile ion given: no Arrhenius fit"]
            continue
        use = []
        for r in sorted(runs, key=lambda r: r["temperature"]):
            tr = r["transport"]["tracer"].get(mobile)
            if tr and tr["D_cm2_per_s"] is not None and tr["se_cm2_per_s"]:
                use.append((r, tr))
            else:
                entry["excluded"].append(f"{r['id']}: {tr['reason'] if tr else 'no ' + mobile}")
        fit = fit_arrhenius([r["temperature"] for r, _ in use], [t["D_cm2_per_s"] for _, t in use],
                            [t["se_cm2_per_s"] for _, t in use], confidence=analysis.confidence)
        entry["fit"] = fit.to_dict()
        entry["flags"] = list(fit.flags)
        at = fit.D_at(analysis.extrapolate_to_K)
        if at is None:
            continue
        d, ci = at
        entry["D_cm2_per_s"], entry["D_ci_cm2_per_s"] = d, ci
        r0 = use[0][0]["transport"]
        charge = (r0["conductivity"].get(mobile) or {}).get("charge")
        if charge and importlib.util.find_spec("pymatgen.analysis.diffusion") is None:
            entry["flags"].append("pymatgen-analysis-diffusion is not installed: no conductivity")
        elif charge:
            numbers = [z for sym, n in r0["composition"].items() for z in [_z(sym)] * n]
            f = conversion_factor(np.array(numbers), r0["volume_A3"], mobile, charge, analysis.extrapolate_to_K)
            entry["sigma_mS_per_cm"], entry["sigma_ci_mS_per_cm"] = d * f, (ci[0] * f, ci[1] * f)
        else:
            entry["flags"].append(f"no charge for {mobile}: no conductivity (give [analysis].charges)")
    return out


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers

    return atomic_numbers[symbol]


def _e(x, spec=".2e") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ci(ci, spec=".2e") -> str:
    return "–" if not ci else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def plot_arrhenius(material: str, entry: dict, results: list[dict], path: Path, figure) -> Path | None:
    """ln D of the mobile ion vs 1000/T: runs with their intervals, the fit with its band, the extrapolation."""
    fit = entry.get("fit")
    if not fit or not fit["temperatures_K"]:
        return None

    f = ArrheniusFit(**fit)
    mobile = entry["mobile"]
    fig = figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    conf = 100 * f.confidence
    for r in results:
        if r["material"] != material or not r.get("transport"):
            continue
        tr = r["transport"]["tracer"].get(mobile) or {}
        if tr.get("D_cm2_per_s") is not None and tr.get("ci_cm2_per_s"):
            lo, hi = tr["ci_cm2_per_s"]
            d = tr["D_cm2_per_s"]
            ax.errorbar([1000.0 / r["temperature"]], [d], yerr=[[d - max(lo, d * 1e-3)], [hi - d]], fmt="o",
                        color="C0", capsize=3, ms=5)
    if f.Ea_eV is not None:
        t_star = entry["temperature_K"]
        inv = np.linspace(1000.0 / max(f.temperatures_K), 1000.0 / min(t_star, min(f.temperatures_K)), 60)
        band = [f.D_at(1000.0 / x) for x in inv]
        ax.plot(inv, [b[0] for b in band], "-", color="C1",
                label=f"Ea = {f.Ea_eV:.3f} ± {f.Ea_se_eV:.3f} eV")
        ax.fill_between(inv, [b[1][0] for b in band], [b[1][1] for b in band], color="C1", alpha=0.2,
                        label=f"{conf:g} % band")
        d, (lo, hi) = f.D_at(t_star)
        ax.errorbar([1000.0 / t_star], [d], yerr=[[d - lo], [hi - d]], fmt="s", color="C3", capsize=3,
                    label=f"{t_star:g} K: {d:.2e} cm²/s")
    ax.set_yscale("log")
    ax.set_xlabel("1000 / T (1/K)")
    ax.set_ylabel(f"tracer D of {mobile} (cm²/s)")
    title = f"{material}: Arrhenius fit of D({mobile}), {conf:g} % intervals"
    ax.set_title(title + ("\n" + "; ".join(entry.get("flags", [])) if entry.get("flags") else ""), fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, frameon=False)
    fig.savefig(path)
    return path


def report_tables(results: list[dict], materials: dict[str, dict], confidence: float) -> list[tuple]:
    """The transport section as ("text", md) / ("table", headers, rows) items for the campaign report."""
    conf = f"{100 * confidence:g} %"
    items: list[tuple] = [("heading", "Transport"),
                          ("text", f"Tracer D of the mobile ion from the 1/t-weighted MSD slope (pymatgen-analysis-"
                                   f"diffusion's estimator) with its {conf} interval from the spread of the per-atom "
                                   "slopes; σ by Nernst–Einstein (Haven ratio 1); collective D and Haven ratio from "
                                   "blocks of the run where resolved (docs/sse-campaign.md, Transport).")]
    rows = []
    for r in results:
        tr = r.get("transport")
        mob = r.get("mobile")
        if not tr or not mob or mob not in tr["tracer"]:
            if r.get("transport_error"):
                rows.append([r["id"], f"{r['temperature']:g}", "–", "–", "–", "–", r["transport_error"]])
            continue
        d = tr["tracer"][mob]
        c = tr["conductivity"].get(mob) or {}
        h = tr["charge"].get(mob) or {}
        haven = (f"{h['haven_ratio']:.2f} {_ci(h['haven_ci'], '.2f')}" if h.get("haven_ratio") is not None
                 else f"not determined: {h.get('reason')}")
        if d["D_cm2_per_s"] is None:
            rows.append([r["id"], f"{r['temperature']:g}", f"not determined: {d['reason']}", "–", _e(d["r2"], ".2f"),
                         "–", haven])
        else:
            sigma = f"{_e(c.get('sigma_mS_per_cm'), '.3g')} {_ci(c.get('ci_mS_per_cm'), '.3g')}"
            rows.append([r["id"], f"{r['temperature']:g}", _e(d["D_cm2_per_s"]), _ci(d["ci_cm2_per_s"]),
                         _e(d["r2"], ".2f"), sigma, haven])
    if rows:
        items.append(("table", ["run", "T (K)", "D* mobile (cm²/s)", f"{conf} interval", "R²",
                                f"σ Nernst–Einstein (mS/cm) [{conf}]", "Haven ratio"], rows))
    rows = []
    for material, e in materials.items():
        fit = e.get("fit") or {}
        t_star = e["temperature_K"]
        temps = ", ".join(f"{t:g}" for t in fit.get("temperatures_K", [])) or "–"
        rows.append([material, e.get("mobile") or "–", temps,
                     f"{_e(fit.get('Ea_eV'), '.3f')} ± {_e(fit.get('Ea_se_eV'), '.3f')}" if fit.get("Ea_eV") is not None
                     else "–", _ci(fit.get("Ea_ci_eV"), ".3f"), _e(fit.get("D0_cm2_per_s")),
                     f"{_e(e.get('D_cm2_per_s'))} {_ci(e.get('D_ci_cm2_per_s'))}" if e.get("D_cm2_per_s") else "–",
                     f"{_e(e.get('sigma_mS_per_cm'), '.3g')} {_ci(e.get('sigma_ci_mS_per_cm'), '.3g')}"
                     if e.get("sigma_mS_per_cm") else "–",
                     "; ".join(e.get("flags", []) + e.get("excluded", [])) or "–"])
        extrapolated = t_star
    if rows:
        items.append(("table", ["material", "mobile", "T used (K)", "Ea ± σ (eV)", f"Ea {conf}", "D0 (cm²/s)",
                                f"D({extrapolated:g} K) (cm²/s) [{conf}]", f"σ({extrapolated:g} K) (mS/cm) [{conf}]",
                                "flags / runs left out"], rows))
    return items
