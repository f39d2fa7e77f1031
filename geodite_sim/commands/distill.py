"""``geodite-sim distill SPEC.toml``: make a fast Geodite from a teacher model (run, resume, status)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from geodite_sim.commands import positive_int

EPILOG = """examples:
  geodite-sim distill workflows/distill/specs/sse_li.toml                 # run (or resume) every stage
  geodite-sim distill workflows/distill/specs/sse_li.toml --status        # shards, epochs, metrics so far
  geodite-sim distill workflows/distill/specs/default_sevennet.toml --until 07:50 --stages data --data-workers 2
  geodite-sim distill spec.toml --hours 2 --workdir /scratch/distill      # stop cleanly after 2 hours
  geodite-sim distill spec.toml --stages teacher-checks                   # beside training: the teacher's relaxations
  geodite-sim distill spec.toml --stages interim-checks                   # the student being trained: volumes so far

Re-running the same command resumes: finished shards are skipped, training continues bit for bit
from its last checkpoint, finished stages are not redone. See docs/distillation.md for the spec.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill", help="distil a fast Geodite from any model the engine runs (generate, label, train, validate)",
        description="Generate structures around a domain with the teacher (batched relax_many/run_md), label them "
                    "(batched evaluate → content-hashed HDF5 shards), train a Geodite student (E0 = the teacher's "
                    "isolated atoms; forces then energies; EMA) and validate it against the teacher (report + "
                    "model card in the student checkpoint).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("spec", help="distillation spec (TOML)")
    p.add_argument("--workdir", default=None, help="work folder (default: the spec's [distill] workdir)")
    p.add_argument("--status", action="store_true", help="print what is done and exit")
    p.add_argument("--stages", nargs="+", choices=("data", "teacher-checks", "interim-checks", "train", "validate"),
                   default=("data", "train", "validate"),
                   help="stages to run (default: data, train, validate, in order); teacher-checks: the teacher's "
                        "relaxations of the validation, which need no student (run it in a second process while "
                        "the student trains; the validation then reuses them); interim-checks: the student being "
                        "trained (latest checkpoint, EMA weights) relaxes the held-out and dcdft crystals, compared "
                        "with the teacher's cached volumes (a row of report/interim.json per run)")
    p.add_argument("--until", default=None, metavar="HH:MM", help="stop cleanly (checkpointed) before this local time")
    p.add_argument("--hours", type=float, default=None, help="stop cleanly after this many hours")
    p.add_argument("--data-workers", type=positive_int, default=1, metavar="N",
                   help="processes that generate and label shards (one thread each; default 1). The shards, their "
                        "hashes and the split do not depend on N")
    p.add_argument("--no-progress", action="store_true",
                   help="no per-shard / per-epoch progress lines (warnings and the outcome are still printed)")
    p.set_defaults(func=run, interrupt_hint="re-run the same command to resume (shards and checkpoints are kept)")


def run(args: argparse.Namespace) -> int:
    from geodite_sim.workflows.distill import Distillation, SpecError, load_spec, run_distill
    from geodite_sim.workflows.distill.spec import parse_until

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        spec = load_spec(args.spec, workdir=args.workdir)
        if args.status:
            print(json.dumps(Distillation(spec, log=log).status(), indent=1))
            return 0
        now = time.time()
        limits = [t for t in ((parse_until(args.until, now) if args.until else None),
                              (now + 3600 * args.hours if args.hours else None)) if t is not None]
        result = run_distill(spec, deadline=min(limits) if limits else None, stages=tuple(args.stages), log=log,
                             progress=(lambda msg: None) if args.no_progress else None,
                             data_workers=args.data_workers)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"distill {spec.name}: stage {result.stage}, {result.shards_done}/{result.shards_total} shards"
          + (f", student {result.student}" if result.student else "")
          + (f", report {result.report}" if result.report else ""))
    if result.metrics:
        print(json.dumps(result.metrics, indent=1))
    return 0
