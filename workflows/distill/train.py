"""Train: the student on the labelled shards, E0 fixed to the teacher's isolated atoms, in two stages.

Stage 1 weights forces (``[train] stage1_weights``), stage 2 continues from stage 1's EMA weights with
energies weighted at a low learning rate. Each stage is a :class:`geodite_sim.training.Trainer` run in
``train/stage{1,2}/`` with mid-epoch checkpoints (``last.ckpt``, resumable bit for bit) and the
wall-clock guard; a finished stage writes ``done.json`` with the hash of its exported weights.
Training uses the training compositions only; the held-out ones (a fixed subset of at most
``VAL_PER_EPOCH`` structures) give the per-epoch validation line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from geodite_sim.workflows.distill.shards import read_shard
from geodite_sim.workflows.distill.spec import BudgetExhausted

from geodite_sim.training.data import Sample

VAL_PER_EPOCH = 256


def load_samples(workdir: Path) -> tuple[list[Sample], list[Sample]]:
    """(training, held-out) samples of every labelled shard, in shard order."""
    train, held = [], []
    for path in sorted((workdir / "labels").glob("shard-*.h5")):
        d = read_shard(path)
        for i, atoms in enumerate(d.atoms):
            stress = d.stress[i]
            s = Sample(atoms=atoms, energy=float(d.energy[i]), forces=d.forces[i],
                       stress=None if not np.isfinite(stress).all() else stress)
            atoms.info["tag"] = d.tags[i]
            (held if d.heldout[i] else train).append(s)
    return train, held


def weights_hash(path: Path) -> str:
    """sha256 (16 hex) of a checkpoint's weights (state_dict tensors by name), independent of its metadata."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    h = hashlib.sha256()
    for name in sorted(ck["state_dict"]):
        t = ck["state_dict"][name]
        if isinstance(t, torch.Tensor) and not name.startswith("SnapshotDecoder."):
            h.update(name.encode())
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _e0_array(manifest: dict) -> np.ndarray:
    e0 = np.zeros(119)
    for z, e in manifest["e0"].items():
        e0[int(z)] = e
    return e0


def _config(job, stage: int):
    from geodite_sim.training.configs import TrainConfig

    t = job.spec.train
    epochs, lr, w = ((t.stage1_epochs, t.stage1_lr, t.stage1_weights) if stage == 1
                     else (t.stage2_epochs, t.stage2_lr, t.stage2_weights))
    return TrainConfig(epochs=epochs, batch_size=t.batch_size, lr=lr, warmup_steps=100 if stage == 1 else 0,
                       ema_decay=t.ema_decay, energy_weight=w[0], forces_weight=w[1], stress_weight=w[2],
                       seed=job.spec.seed, dtype=t.dtype, checkpoint_every=t.checkpoint_every,
                       log_every=max(1, t.checkpoint_every // 2), lr_min_factor=0.05 if stage == 1 else 0.1)


def _run_stage(job, stage: int, train: list[Sample], val: list[Sample], init: Path | None) -> Path:
    from geodite_sim.model.config import GeoditeConfig
    from geodite_sim.training.trainer import Trainer

    folder = job.workdir / "train" / f"stage{stage}"
    export = folder / "student.ckpt"
    if (folder / "done.json").exists():
        return export
    folder.mkdir(parents=True, exist_ok=True)
    config = _config(job, stage)
    if (folder / "last.ckpt").exists():
        trainer = Trainer.resume(folder / "last.ckpt", train, workdir=folder, val_samples=val, log=job.progress)
    elif stage == 1:
        st = job.spec.student
        model_config = GeoditeConfig(hidden_channels=st.hidden_channels, num_layers=st.num_layers,
                                     num_heads=st.num_heads, n_rbf=st.n_rbf, cutoff=st.cutoff, attn_dropout=0.0)
        trainer = Trainer(train, model_config=model_config, config=config, workdir=folder, val_samples=val,
                          e0=_e0_array(job.manifest()), preset=f"distill:{job.spec.name}", log=job.progress)
    else:
        trainer = Trainer(train, config=config, workdir=folder, init=init, val_samples=val,
                          preset=f"distill:{job.spec.name}", log=job.progress)
    job.progress(f"train: stage {stage} ({'forces' if stage == 1 else 'energies'} weighted), epoch {trainer.epoch}/"
            f"{config.epochs}")
    trainer.fit(deadline=job.deadline)
    if not trainer.finished:
        raise BudgetExhausted(f"train: stage {stage} at epoch {trainer.epoch}, step {trainer.global_step}")
    trainer.export(export)
    (folder / "done.json").write_text(json.dumps({"weights_hash": weights_hash(export), "epochs": trainer.epoch,
                                                  "steps": trainer.global_step, "history": trainer.history},
                                                 indent=1))
    return export


def run_training(job) -> Path:
    """Both stages; returns the last stage's exported EMA weights (:func:`.card.publish_student` makes them the
    student)."""
    train, held = load_samples(job.workdir)
    if not train:
        raise ValueError(f"{job.workdir}: no labelled training structures")
    stride = max(1, len(held) // VAL_PER_EPOCH)
    val = held[::stride][:VAL_PER_EPOCH]
    job.progress(f"train: {len(train)} structures ({sum(s.n_atoms for s in train)} atoms); "
                 f"{len(held)} held out ({len(val)} validated per epoch)")
    stage1 = _run_stage(job, 1, train, val, None)
    return _run_stage(job, 2, train, val, stage1) if job.spec.train.stage2_epochs > 0 else stage1


def training_status(job) -> dict:
    """Epochs done per stage (from ``done.json`` / ``history.json``)."""
    out = {}
    for stage in (1, 2):
        folder = job.workdir / "train" / f"stage{stage}"
        target = job.spec.train.stage1_epochs if stage == 1 else job.spec.train.stage2_epochs
        if (folder / "done.json").exists():
            info = json.loads((folder / "done.json").read_text())
            out[f"stage{stage}"] = {"done": True, "epochs": info["epochs"], "of": target,
                                    "weights_hash": info["weights_hash"]}
        elif (folder / "history.json").exists():
            hist = json.loads((folder / "history.json").read_text())
            last = hist[-1] if hist else {}
            out[f"stage{stage}"] = {"done": False, "epochs": len(hist), "of": target,
                                    "val_energy_mae_meV": 1e3 * last.get("val_energy_mae", float("nan")),
                                    "val_forces_mae_meV": 1e3 * last.get("val_forces_mae", float("nan"))}
        else:
            out[f"stage{stage}"] = {"done": False, "epochs": 0, "of": target}
    return out
