"""Solid-state-electrolyte MD campaign: materials × temperatures on one device, RDF overlap scores, diffusion, report.

    geodite-sim campaign workflows/sse/short.toml            # run (or resume), analyse, report
    geodite-sim campaign workflows/sse/short.toml --status   # what is done, what is left

    from geodite_sim.workflows.sse_campaign import run_campaign
    result = run_campaign("workflows/sse/full.toml")

A campaign spec (TOML, see ``docs/sse-campaign.md`` and ``workflows/sse/*.toml``) lists
materials (a structure file each) × temperatures, the MD settings (default: the Geodite paper's
protocol — Nosé–Hoover chain of 10, damping 100 × dt, dt = 1.5 fs, 700,000 steps, a frame every
10 steps) and the analysis settings (5 ps discarded, RDF bins of 0.05 Å, references discarding
30 ps). Every run goes into **one** :func:`geodite_sim.md.run_md` call, so all runs share the
device through its continuous batching, in one HDF5 file (``trajectories.h5``, group = run
index) with one checkpoint. Re-running the same spec resumes: run_md restarts bit-for-bit from
the checkpoint, runs already finished are left as they are. Progress and an ETA are printed
and written to ``progress.json`` while the MD runs. The analysis (per-run RDFs, overlap with
reference trajectories, MSD and diffusion coefficients) is cached in ``analysis.json``; the
report (``report.md``, ``report.html``, ``plots/*.png``) is written next to the HDF5 file.
"""

from __future__ import annotations

from geodite_sim.workflows.sse_campaign.analysis import (
    analyse_campaign,
    analyse_run,
    run_locations,
    summarise,
)
from geodite_sim.workflows.sse_campaign.driver import (
    CampaignResult,
    run_campaign,
)
from geodite_sim.workflows.sse_campaign.report import (
    _figure,
    format_status,
    last_throughput,
    plot_msd,
    plot_rdf,
    plot_scores,
    write_report,
)
from geodite_sim.workflows.sse_campaign.runs import (
    RUNS,
    RunRecord,
    RunState,
    build_model,
    open_run_store,
    run_md_stage,
    run_states,
)
from geodite_sim.workflows.sse_campaign.spec import (
    ANALYSIS,
    MANIFEST,
    PROGRESS,
    TRAJECTORY,
    AnalysisSettings,
    CampaignSpec,
    MDSettings,
    Reference,
    Run,
    SpecError,
    load_spec,
)

__all__ = [
    "ANALYSIS",
    "AnalysisSettings",
    "CampaignResult",
    "CampaignSpec",
    "MANIFEST",
    "MDSettings",
    "PROGRESS",
    "RUNS",
    "Reference",
    "Run",
    "RunRecord",
    "RunState",
    "SpecError",
    "TRAJECTORY",
    "_figure",
    "analyse_campaign",
    "analyse_run",
    "build_model",
    "format_status",
    "last_throughput",
    "load_spec",
    "open_run_store",
    "plot_msd",
    "plot_rdf",
    "plot_scores",
    "run_campaign",
    "run_locations",
    "run_md_stage",
    "run_states",
    "summarise",
    "write_report",
]
