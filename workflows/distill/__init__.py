"""Distillation: make a fast Geodite from any model the engine runs (docs/distillation.md).

    geodite-sim distill workflows/distill/specs/sse_li.toml            # run or resume
    geodite-sim distill workflows/distill/specs/sse_li.toml --status

    from geodite_sim.workflows.distill import load_spec, run_distill
    result = run_distill("workflows/distill/specs/sse_li.toml")

Stages (each resumable, deterministic per seed): generate (universal: elemental lattices, AFLOW
prototypes decorated by substitution probabilities, pyxtal crystals, dimers, expanded cells; domain:
strained/rattled supercells of seeds and teacher MD frames — all teacher work through ``relax_many`` /
``run_md``) → label (``evaluate`` → content-hashed HDF5 shards, split by composition) → train (E0 = the
teacher's isolated atoms; forces stage then energy stage; EMA; wall-clock guard) → validate (report
vs the teacher, model card in the student checkpoint).
"""

from geodite_sim.workflows.distill.pipeline import Distillation, DistillResult, run_distill, verify_shards
from geodite_sim.workflows.distill.spec import DistillSpec, SpecError, load_spec

__all__ = ["DistillResult", "DistillSpec", "Distillation", "SpecError", "load_spec", "run_distill", "verify_shards"]
