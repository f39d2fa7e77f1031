"""``geodite-sim campaign SPEC.toml``: run or resume an SSE MD campaign, analyse it, write its report."""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  geodite-sim campaign workflows/sse/short.toml                 # run (or resume), analyse, report
  geodite-sim campaign workflows/sse/short.toml --status        # runs done / running / pending, time left
  geodite-sim campaign workflows/sse/full.toml --output /scratch/sse-full
  geodite-sim campaign workflows/sse/short.toml --analyse-only  # re-analyse (e.g. after adding references)
  geodite-sim campaign workflows/sse/short.toml --steps 100 --output out/sse-demo   # a quick look
  geodite-sim campaign workflows/sse/full.toml --ray auto      # runs sharded over a Ray cluster (docs/ray.md)

Re-running the same command after an interruption continues every unfinished run from the
last checkpoint; finished runs are left untouched. See docs/sse-campaign.md for the spec format.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "campaign",
        help="batched SSE MD campaign: materials x temperatures, RDF scores, diffusion, report",
        description="Run (or resume) every run of a campaign spec in one batched MD job on one device, "
                    "then compute RDFs, overlap scores against reference trajectories and diffusion "
                    "coefficients, and write report.md/report.html with plots next to the HDF5 file.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="campaign spec (TOML)")
    p.add_argument("--output", default=None, help="output folder (default: the spec's [campaign] output)")
    p.add_argument("--status", action="store_true", help="print the status of every run and exit")
    p.add_argument("--steps", type=int, default=None, help="override [md] steps (use a fresh --output)")
    p.add_argument("--model", default=None,
                   help="override [campaign] model: packaged name, checkpoint path or 'morse' (use a fresh --output)")
    p.add_argument("--analyse-only", action="store_true", help="skip the MD; analyse and report what is there")
    p.add_argument("--no-report", action="store_true", help="run the MD (and analysis) but write no report")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="S",
                   help="seconds between progress lines (default 30)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines (nor progress.json updates)")
    p.add_argument("--analysis-device", default=None, help="device for the analysis (default: the spec's)")
    from geodite_sim.executors import add_executor_arguments

    add_executor_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from geodite_sim.workflows.sse_campaign import (
        SpecError,
        format_status,
        last_throughput,
        load_spec,
        run_campaign,
        run_states,
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        spec = load_spec(args.spec, output=args.output)
        if args.steps is not None:
            if args.steps < 1:
                raise SpecError("--steps must be >= 1")
            spec.md.steps = args.steps
            run_fs = spec.md.steps * spec.md.timestep_fs
            if spec.analysis.discard_fs >= run_fs:  # a quick look: keep frames to analyse
                log(f"note: --steps {args.steps} runs {run_fs:g} fs, no more than [analysis] discard_fs = "
                    f"{spec.analysis.discard_fs:g} fs: the analysis discards the first {0.1 * run_fs:g} fs "
                    "(10 %) instead")
                spec.analysis.discard_fs = 0.1 * run_fs
        if args.model is not None:
            spec.model = args.model
        if args.status:
            print(format_status(spec, run_states(spec), last_throughput(spec)))
            return 0
        from geodite_sim.executors import make_executor

        try:
            executor = make_executor(args.ray, args.workers, shard_size=args.shard_size)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
        try:
            result = run_campaign(spec, run_md=not args.analyse_only, report=not args.no_report, log=log,
                                  progress_every_s=float("inf") if args.no_progress else args.progress_every,
                                  device=args.analysis_device,
                                  executor=executor)
        finally:
            executor.shutdown()
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    s = result.summary
    if s:
        score = f"mean overlap score {s['mean_score']:.3f} over {s['n_scored']} runs" if s["mean_score"] is not None \
            else "no reference trajectories: no scores"
        print(f"{result.spec.name}: {s['n_runs']} runs, {s['n_failed']} failed; {score}")
    if result.report:
        print(f"report: {result.report['markdown']}  {result.report['html']}")
    return 0
