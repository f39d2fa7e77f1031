"""Train: the student on the labelled shards, E0 fixed to the teacher's isolated atoms, in two stages.

Stage 1 weights forces (``[train] stage1_weights``); with ``[refine]``, the refine round's data is made
from stage 1's errors (``refine.py``) and a force-weighted stage ``refine`` continues from stage 1's EMA weights
on both rounds' data (with ``rounds = n``: rounds ``refine-2`` … ``refine-n`` likewise, each from the stage
before it, each trained on all data so far); stage 2 continues from the last of them with energies weighted at
a low learning rate.
Each stage is a :class:`geodite_sim.training.Trainer` run in ``train/<stage>/`` with mid-epoch checkpoints (``last.ckpt``, resumable bit for bit) and the
wall-clock guard; a finished stage writes ``done.json`` with the hash of its exported weights.
Training uses the training compositions only; the held-out ones (a fixed subset of at most
``VAL_PER_EPOCH`` structures) give the per-epoch validation line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from geodite_sim.workflows.distill.shards import weights_hash
from geodite_sim.workflows.distill.spec import BudgetExhausted, SpecError

from geodite_sim.training.data import Sample

VAL_PER_EPOCH = 256


def _e0_array(manifest: dict) -> np.ndarray:
    e0 = np.zeros(119)
    for z, e in manifest["e0"].items():
        e0[int(z)] = e
    return e0


def stages(spec) -> list[str]:
    """The training stages of a spec, in order: stage1, the refine rounds' stages (if any), stage2."""
    from geodite_sim.workflows.distill.refine import round_name

    rounds = spec.refine.rounds if spec.refine.structures > 0 else 0
    return ["stage1", *(round_name(r) for r in range(1, rounds + 1)), "stage2"]


def latest_checkpoint(job) -> tuple[str, Path]:
    """(stage, ``train/<stage>/last.ckpt``) of the latest stage that has a training checkpoint."""
    from geodite_sim.workflows.distill.spec import SpecError

    found = [(s, job.workdir / "train" / s / "last.ckpt") for s in stages(job.spec)]
    found = [(s, p) for s, p in found if p.exists()]
    if not found:
        raise SpecError(f"no training checkpoint under {job.workdir / 'train'}: start the train stage first")
    return found[-1]


def _config(job, stage: str):
    from geodite_sim.training.configs import TrainConfig

    t, r = job.spec.train, job.spec.refine
    if stage.startswith("refine"):
        epochs, lr, w = r.epochs, r.lr, t.stage1_weights
    else:
        epochs, lr, w = {"stage1": (t.stage1_epochs, t.stage1_lr, t.stage1_weights),
                         "stage2": (t.stage2_epochs, t.stage2_lr, t.stage2_weights)}[stage]
    return TrainConfig(epochs=epochs, batch_size=t.batch_size, lr=lr, warmup_steps=100 if stage == "stage1" else 0,
                       ema_decay=t.ema_decay, energy_weight=w[0], forces_weight=w[1], stress_weight=w[2],
                       seed=job.spec.seed, dtype=t.dtype, checkpoint_every=t.checkpoint_every,
                       log_every=max(1, t.checkpoint_every // 2), lr_min_factor=0.1 if stage == "stage2" else 0.05)


def _run_stage(job, stage: str, train: list[Sample], val: list[Sample], init: Path | None) -> Path:
    """One training stage in ``train/<stage>/`` (resumed from its ``last.ckpt``); returns its exported weights.
    ``init=None``: a new student of the spec's architecture with E0 = the teacher's isolated atoms."""
    from geodite_sim.model.config import GeoditeConfig
    from geodite_sim.training.trainer import Trainer

    folder = job.workdir / "train" / stage
    export = folder / "student.ckpt"
    start = weights_hash(init) if init is not None else None
    if (folder / "done.json").exists():
        made_from = json.loads((folder / "done.json").read_text()).get("init_weights_hash", start)
        if made_from != start:
            raise SpecError(f"{folder} was trained from other weights ({made_from}, now {start}: a stage before it "
                            f"changed, e.g. a [refine] round was added): remove {folder} to train it again")
        return export
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(job, stage)
    if (folder / "last.ckpt").exists():
        trainer = Trainer.resume(folder / "last.ckpt", train, workdir=folder, val_samples=val, log=job.progress)
    elif init is None:
        st = job.spec.student
        model_config = GeoditeConfig(hidden_channels=st.hidden_channels, num_layers=st.num_layers,
                                     num_heads=st.num_heads, n_rbf=st.n_rbf, cutoff=st.cutoff, attn_dropout=0.0)
        trainer = Trainer(train, model_config=model_config, config=config, workdir=folder, val_samples=val,
                          e0=_e0_array(job.manifest()), preset=f"distill:{job.spec.name}", log=job.progress)
    else:
        trainer = Trainer(train, config=config, workdir=folder, init=init, val_samples=val,
                          preset=f"distill:{job.spec.name}", log=job.progress)
    weighted = "energies" if stage == "stage2" else "forces"
    job.progress(f"train: {stage} ({weighted} weighted, {len(train)} structures), epoch {trainer.epoch}/"
                 f"{config.epochs}")
    trainer.fit(deadline=job.deadline)
    if not trainer.finished:
        raise BudgetExhausted(f"train: {stage} at epoch {trainer.epoch}, step {trainer.global_step}")
    trainer.export(export)
    (folder / "done.json").write_text(json.dumps({"weights_hash": weights_hash(export), "init_weights_hash": start,
                                                  "epochs": trainer.epoch,
                                                  "steps": trainer.global_step, "history": trainer.history},
                                                 indent=1))
    return export


def run_training(job) -> Path:
    """Stage 1 on round 0's data; with ``[refine]``, each refine round's data then a force-weighted stage on all
    data so far; then stage 2 on all of it. Returns the last stage's exported EMA weights
    (:func:`.card.publish_student` makes them the student). Validation each epoch: round 0's held-out set."""
    from geodite_sim.workflows.distill.refine import round_name, run_refine

    train, held = job.samples(report=True)
    if not train:
        raise ValueError(f"{job.workdir}: no labelled training structures")
    stride = max(1, len(held) // VAL_PER_EPOCH)
    val = held[::stride][:VAL_PER_EPOCH]
    job.progress(f"train: {len(train)} structures ({sum(s.n_atoms for s in train)} atoms); "
                 f"{len(held)} held out ({len(val)} validated per epoch)")
    last = _run_stage(job, "stage1", train, val, None)
    for r in range(1, job.spec.refine.rounds + 1) if job.spec.refine.structures > 0 else ():
        run_refine(job, last, r)
        extra, _ = job.samples(job.workdir / round_name(r), report=True)
        train = train + extra
        last = _run_stage(job, round_name(r), train, val, last)
    return _run_stage(job, "stage2", train, val, last) if job.spec.train.stage2_epochs > 0 else last


def training_status(job) -> dict:
    """Epochs done per stage (from ``done.json`` / ``history.json``)."""
    out = {}
    for stage in stages(job.spec):
        folder = job.workdir / "train" / stage
        target = {"stage1": job.spec.train.stage1_epochs,
                  "stage2": job.spec.train.stage2_epochs}.get(stage, job.spec.refine.epochs)
        if (folder / "done.json").exists():
            info = json.loads((folder / "done.json").read_text())
            out[stage] = {"done": True, "epochs": info["epochs"], "of": target, "weights_hash": info["weights_hash"]}
        elif (folder / "history.json").exists():
            hist = json.loads((folder / "history.json").read_text())
            last = hist[-1] if hist else {}
            out[stage] = {"done": False, "epochs": len(hist), "of": target,
                          "val_energy_mae_meV": 1e3 * last.get("val_energy_mae", float("nan")),
                          "val_forces_mae_meV": 1e3 * last.get("val_forces_mae", float("nan"))}
        else:
            out[stage] = {"done": False, "epochs": 0, "of": target}
    return out
