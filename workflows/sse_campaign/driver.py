"""run_campaign: MD (resumable), analysis and report of one campaign spec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from geodite_sim.workflows.sse_campaign.analysis import analyse_campaign, run_locations, summarise
from geodite_sim.workflows.sse_campaign.report import write_report
from geodite_sim.workflows.sse_campaign.runs import RunState, run_md_stage, run_states
from geodite_sim.workflows.sse_campaign.spec import CampaignSpec, load_spec


# ---------------------------------------------------------------------------------------------- driver
@dataclass
class CampaignResult:
    spec: CampaignSpec
    states: list[RunState]
    results: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)


def run_campaign(spec: str | Path | dict | CampaignSpec, output: str | Path | None = None, run_md: bool = True,
                 analyse: bool = True, report: bool = True, log: Callable[[str], None] = print,
                 progress_every_s: float = 30.0, device: str | None = None, model=None,
                 interrupt_after: int | None = None, executor=None) -> CampaignResult:
    """Run or resume a campaign, then analyse it and write the report.

    Args:
        spec: a spec file, its content as a dict, or a loaded :class:`CampaignSpec`.
        output: output folder (overrides the spec's).
        run_md: run/resume the MD (False: analyse what is there).
        analyse, report: compute the analysis / write report.md, report.html and plots.
        log: where progress lines go.
        progress_every_s: seconds between progress lines (and progress.json updates).
        device: analysis device override.
        model: use this model object instead of building the spec's (must be the same model on resume).
        interrupt_after: stop with KeyboardInterrupt after this many MD steps (tests of resuming; checked
            at the engine's check interval).
        executor: where the MD runs (:mod:`geodite_sim.executors`; default one process, one run_md call).
    """
    if not isinstance(spec, CampaignSpec):
        spec = load_spec(spec, output=output)
    elif output is not None:
        spec.output = Path(output).resolve()
    if run_md:
        states = run_md_stage(spec, log, progress_every_s, interrupt_after, model, executor)
    else:
        states = run_states(spec)
    result = CampaignResult(spec, states)
    if analyse and any(f.exists() for f, _ in run_locations(spec).values()):
        result.results = analyse_campaign(spec, log, device)
        result.summary = summarise(result.results)
        if report:
            result.report = write_report(spec, result.results, result.summary, states)
            log(f"[{spec.name}] report: {result.report['markdown']}")
    return result


