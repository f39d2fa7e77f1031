"""Campaign report: Markdown + HTML tables, RDF / score / MSD / Arrhenius plots, status lines."""

from __future__ import annotations

import json
import math
import time
from html import escape
from pathlib import Path

import numpy as np
from geodite_sim.workflows import sse_transport
from geodite_sim.workflows.sse_campaign.runs import RunState, _format_duration
from geodite_sim.workflows.sse_campaign.spec import MANIFEST, TRAJECTORY, CampaignSpec


# ---------------------------------------------------------------------------------------------- report
def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def plot_rdf(res: dict, path: Path) -> Path | None:
    """Partial RDFs of one run (solid) over the reference's (dashed), one panel per element pair."""
    from geodite_sim.analysis import RDFResult

    if "rdf" not in res:
        return None
    model = RDFResult.from_dict(res["rdf"])
    ref = RDFResult.from_dict(res["reference"]["rdf"]) if res.get("reference") else None
    pairs = model.pairs
    ncols = min(3, len(pairs))
    nrows = math.ceil(len(pairs) / ncols)
    fig = _figure(3.6 * ncols, 2.6 * nrows)
    scores = (res.get("comparison") or {}).get("pair_scores", {})
    for k, pair in enumerate(pairs):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        if ref is not None and pair in ref.g:
            ax.plot(ref.r, ref.g[pair], "--", color="0.3", lw=1.2, label="reference")
        ax.plot(model.r, model.g[pair], "-", color="C0", lw=1.2, label="model")
        title = pair + (f"  d = {scores[pair]:.3f}" if pair in scores and not math.isnan(scores[pair]) else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("r (Å)", fontsize=8)
        ax.set_ylabel("g(r)", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7, frameon=False)
    score = (res.get("comparison") or {}).get("score")
    fig.suptitle(f"{res['id']}" + (f"  (score {score:.3f})" if score is not None and not math.isnan(score) else ""),
                 fontsize=10)
    fig.savefig(path)
    return path


def plot_scores(results: list[dict], path: Path) -> Path | None:
    """Strip plot of the system scores, one column per mobile ion, coloured by temperature."""
    scored = [r for r in results if r.get("status") == "done" and r.get("comparison")
              and not math.isnan(r["comparison"]["score"])]
    if not scored:
        return None
    ions = sorted({r.get("mobile") or "?" for r in scored})
    fig = _figure(max(3.5, 1.2 * len(ions) + 2), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    temps = [r["temperature"] for r in scored]
    lo, hi = min(temps), max(temps)
    rng = np.random.default_rng(0)
    from matplotlib import colormaps

    cmap = colormaps["coolwarm"]
    for r in scored:
        x = ions.index(r.get("mobile") or "?") + rng.uniform(-0.15, 0.15)
        c = cmap(0.5 if hi == lo else (r["temperature"] - lo) / (hi - lo))
        ax.scatter([x], [r["comparison"]["score"]], color=c, s=30, edgecolor="k", lw=0.4, zorder=3)
    values = [r["comparison"]["score"] for r in scored]
    mean = float(np.mean(values))
    ax.axhline(mean, ls="--", color="0.4", lw=1, label=f"mean {mean:.3f}")
    ax.set_ylim(min(0.8, min(values) - 0.03), 1.005)
    ax.set_xticks(range(len(ions)), ions)
    ax.set_xlim(-0.6, len(ions) - 0.4)
    ax.set_xlabel("mobile ion")
    ax.set_ylabel("RDF overlap score (min over pairs)")
    ax.set_title(f"{len(scored)} run{'s' if len(scored) > 1 else ''}, colour = temperature "
                 f"({lo:g}–{hi:g} K)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.savefig(path)
    return path


def plot_msd(results: list[dict], material: str, path: Path) -> Path | None:
    """MSD of the mobile ion (or every species) of one material, one curve per temperature, with the fit."""
    from geodite_sim.analysis import MSDResult

    runs = [r for r in results if r["material"] == material and "msd" in r]
    if not runs:
        return None
    fig = _figure(5.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    for k, r in enumerate(sorted(runs, key=lambda r: r["temperature"])):
        msd = MSDResult.from_dict(r["msd"])
        species = [r["mobile"]] if r.get("mobile") in msd.msd else list(msd.msd)
        color = cmap(0.85 * k / max(1, len(runs) - 1))
        for sp in species:
            t_ps = msd.t_fs / 1000.0
            ax.plot(t_ps, msd.msd[sp], color=color, lw=1.2,
                    label=f"{r['temperature']:g} K" + (f" {sp}" if len(species) > 1 else ""))
            fit = ((r.get("transport") or {}).get("tracer") or {}).get(sp)  # the transport table's fit
            if fit and math.isfinite(fit["slope_D_cm2_per_s"]):
                t0, t1 = fit["window_fs"]
                tt = np.linspace(t0, t1, 20)
                ax.plot(tt / 1000.0, 6.0 * fit["slope_D_cm2_per_s"] * 1e4 * tt / 1000.0 + fit["intercept_A2"], "--",
                        color=color, lw=0.9)
    mobile = runs[0].get("mobile")
    ax.set_xlabel("lag time (ps)")
    ax.set_ylabel(f"MSD{' of ' + mobile if mobile else ''} (Å²)")
    ax.set_title(f"{material}: MSD (dashed: 6Dt + b, weighted 1/t, over the fit window)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.savefig(path)
    return path


def _fmt(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _tables(headers: list[str], rows: list[list[str]]) -> tuple[str, str]:
    """The same table as Markdown and as HTML."""
    md = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]

    html = ["<table>", "<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"]
    html += ["<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows]
    html.append("</table>")
    return "\n".join(md), "\n".join(html)


def write_report(spec: CampaignSpec, results: list[dict], summary: dict, states: list[RunState]) -> dict:
    """report.md, report.html and plots/*.png in the campaign's output folder; returns their paths."""
    out = spec.output
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    state_of = {s.id: s for s in states}
    plots: dict[str, Path] = {}
    p = plot_scores(results, plots_dir / "scores.png")
    if p:
        plots["scores"] = p
    for material in dict.fromkeys(r["material"] for r in results):
        p = plot_msd(results, material, plots_dir / f"msd_{_slug(material)}.png")
        if p:
            plots[f"msd:{material}"] = p
    for r in results:
        p = plot_rdf(r, plots_dir / f"rdf_{_slug(r['id'])}.png")
        if p:
            plots[f"rdf:{r['id']}"] = p

    transport = sse_transport.material_transport(results, spec.analysis)
    for material, entry in transport.items():
        p = sse_transport.plot_arrhenius(material, entry, results, plots_dir / f"arrhenius_{_slug(material)}.png",
                                         _figure)
        if p:
            plots[f"arrhenius:{material}"] = p

    md_parts: list[str] = []
    html_parts: list[str] = []

    def text(md: str, html: str | None = None) -> None:
        md_parts.append(md)
        html_parts.append(html if html is not None else f"<p>{escape(md)}</p>")

    def table(headers, rows) -> None:
        m, h = _tables(headers, rows)
        md_parts.append(m)
        html_parts.append(h)

    def image(key: str, caption: str) -> None:
        if key in plots:
            rel = plots[key].relative_to(out).as_posix()
            md_parts.append(f"![{caption}]({rel})")
            html_parts.append(f'<figure><img src="{escape(rel)}" alt="{escape(caption)}">'
                              f"<figcaption>{escape(caption)}</figcaption></figure>")

    md = spec.md
    a = spec.analysis
    text(f"# SSE campaign report: {spec.name}", f"<h1>SSE campaign report: {escape(spec.name)}</h1>")
    text(f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from `{spec.source or 'spec'}`; "
         f"trajectories in `{TRAJECTORY}` (group = run index).")
    text(f"Model `{spec.model}` ({spec.dtype}, {spec.device}). MD: {md.ensemble}, chain {md.chain_length}, "
         f"damping {spec.tdamp_fs:g} fs, dt {md.timestep_fs:g} fs, {md.steps:,} steps "
         f"({md.steps * md.timestep_fs / 1e6:g} ns), a frame every {md.frame_every} steps. "
         f"Analysis: first {a.discard_fs / 1000:g} ps discarded (references: their own discard, default "
         f"{a.reference_discard_fs / 1000:g} ps), RDF bins {a.rdf_bin_width} Å up to half the shortest "
         f"periodic-image separation, D from MSD = 6Dt + b over "
         + (f"{a.msd_fit_window_fs[0] / 1000:g}–{a.msd_fit_window_fs[1] / 1000:g} ps" if a.msd_fit_window_fs
            else f"{100 * a.msd_fit_fraction[0]:g}–{100 * a.msd_fit_fraction[1]:g} % of the analysed span")
         + (", centre-of-mass drift removed." if a.remove_com else "."))

    text("## Summary", "<h2>Summary</h2>")
    lines = [f"- runs: {summary['n_runs']} ({summary['n_failed']} failed, {summary['n_unfinished']} unfinished)",
             f"- finished runs with a reference (scored): {summary['n_scored']}"]
    if summary["mean_score"] is not None:
        lines.append(f"- **mean overlap score: {summary['mean_score']:.3f}** "
                     f"(worst: {summary['worst_run']}, {summary['worst_score']:.3f}); the Geodite paper reports "
                     "0.958 for Geodite-MP over its 49 runs")
    else:
        lines.append("- no reference trajectories given: no overlap scores (add `references` to the spec)")
    md_parts.append("\n".join(lines))
    html_parts.append("<ul>" + "".join(f"<li>{escape(x[2:].replace('**', ''))}</li>" for x in lines) + "</ul>")

    text("## Runs", "<h2>Runs</h2>")
    rows = []
    for r in results:
        st = state_of.get(r["id"])
        d = ((r.get("transport") or {}).get("tracer") or {}).get(r.get("mobile") or "")
        d = {"D_cm2_per_s": d["D_cm2_per_s"], "D_A2_per_ps": d["D_cm2_per_s"] * 1e4} \
            if d and d["D_cm2_per_s"] is not None else None
        comp = r.get("comparison") or {}
        rows.append([
            r["id"], r["material"], f"{r['temperature']:g}", str(st.n_atoms if st else r.get("n_atoms", "")),
            f"{st.steps_done:,}/{st.steps_target:,}" if st else "", r.get("status", ""),
            _fmt(r.get("mean_temperature"), ".0f"), str(r.get("n_frames", "–")), r.get("mobile") or "–",
            _fmt(d["D_cm2_per_s"], ".3e") if d else "–", _fmt(d["D_A2_per_ps"], ".4g") if d else "–",
            _fmt(comp.get("score")), comp.get("worst_pair") or "–",
        ])
    table(["run", "material", "T (K)", "atoms", "steps", "status", "⟨T⟩ (K)", "frames", "mobile",
           "D mobile (cm²/s)", "D mobile (Å²/ps)", "score", "worst pair"], rows)

    text("## Diffusion coefficients, all species (cm²/s)", "<h2>Diffusion coefficients, all species (cm²/s)</h2>")
    rows = []
    for r in results:
        tracer = (r.get("transport") or {}).get("tracer") or {}
        if tracer:
            rows.append([r["id"], "; ".join(
                f"{sp}: {v['D_cm2_per_s']:.3e} [{v['ci_cm2_per_s'][0]:.2e}, {v['ci_cm2_per_s'][1]:.2e}] "
                f"(R² {v['r2']:.2f})" if v["D_cm2_per_s"] is not None and v["ci_cm2_per_s"]
                else f"{sp}: {v['D_cm2_per_s']:.3e} (R² {v['r2']:.2f})" if v["D_cm2_per_s"] is not None
                else f"{sp}: not determined ({v['reason']})" for sp, v in tracer.items())])
    if rows:
        table(["run", f"D per species [{100 * a.confidence:g} % interval]"], rows)
    else:
        text("No run has enough frames after the discarded time for an MSD yet.")

    for item in sse_transport.report_tables(results, transport, a.confidence):
        if item[0] == "heading":
            text(f"## {item[1]}", f"<h2>{escape(item[1])}</h2>")
        elif item[0] == "text":
            text(item[1])
        else:
            table(item[1], item[2])

    keys = ("error", "analysis_error", "reference_error", "transport_error")
    problems = [r for r in results if any(r.get(k) for k in keys)]
    if problems:
        text("## Problems", "<h2>Problems</h2>")
        table(["run", "message"], [[r["id"], "; ".join(str(r[k]) for k in keys if r.get(k))] for r in problems])

    text("## Plots", "<h2>Plots</h2>")
    image("scores", "RDF overlap score per run, by mobile ion")
    for material in dict.fromkeys(r["material"] for r in results):
        image(f"arrhenius:{material}", f"{material}: Arrhenius plot of the mobile ion's tracer D")
        image(f"msd:{material}", f"{material}: mean-squared displacement")
    for r in results:
        image(f"rdf:{r['id']}", f"{r['id']}: partial RDFs, model (solid) vs reference (dashed)")

    md_path = out / "report.md"
    md_path.write_text("\n\n".join(md_parts) + "\n")
    html_path = out / "report.html"
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #bbb;padding:2px 6px}"
             "th{background:#eee}img{max-width:100%}figure{margin:1em 0}")
    html_path.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(spec.name)}</title>"
                         f"<style>{style}</style></head><body>\n" + "\n".join(html_parts) + "\n</body></html>\n")
    return {"markdown": md_path, "html": html_path, "plots": sorted(plots.values())}


def format_status(spec: CampaignSpec, states: list[RunState], us_per_atom_step: float | None = None) -> str:
    """A table of every run's status and, given a throughput, the estimated time left."""
    lines = [f"{'run':24s} {'atoms':>6s} {'steps':>19s} {'status':>8s}"]
    for s in states:
        lines.append(f"{s.id:24s} {s.n_atoms:6d} {s.steps_done:>9,}/{s.steps_target:<9,} {s.status:>8s}"
                     + (f"  {s.error}" if s.error else ""))
    left = sum((s.steps_target - min(s.steps_done, s.steps_target)) * s.n_atoms for s in states
               if s.status in ("pending", "running"))
    lines.append(f"{sum(s.status in ('done', 'failed') for s in states)}/{len(states)} runs finished; "
                 f"{left:,} atom-steps left")
    if us_per_atom_step and left:
        lines.append(f"at the last measured {us_per_atom_step:.4g} µs/atom/step: about "
                     f"{_format_duration(left * us_per_atom_step * 1e-6)} left")
    return "\n".join(lines)


def last_throughput(spec: CampaignSpec) -> float | None:
    """µs/atom/step of the most recent MD session of this campaign (from its manifest), if any."""
    path = spec.output / MANIFEST
    if not path.exists():
        return None
    sessions = [s for s in json.loads(path.read_text()).get("sessions", []) if s.get("us_per_atom_step")]
    return sessions[-1]["us_per_atom_step"] if sessions else None
