"""The student's model card, stored in the checkpoint's metadata (``load_model(...).card`` reads it back).

Keys: ``name``, ``teacher`` (name, version, energy convention, fingerprint), ``energy_convention`` (what
a screening must add: for SevenNet-0, MPtrj's uncorrected energies, so MP2020 applies once),
``data`` (manifest hash, structures, shards, held-out compositions), ``supported_elements``
(symbols), ``student`` (architecture), ``training`` (epochs per stage), ``metrics`` (the validation
report's headline numbers, or None before validation), ``weights_hash``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch
from ase.data import chemical_symbols
from geodite_sim.workflows.distill.shards import weights_hash
from geodite_sim.workflows.distill.train import stages, training_status

from geodite_sim.model.checkpoint import METADATA_KEY, load_checkpoint


def build_card(job, model, metrics: dict | None) -> dict:
    m = job.manifest()
    elements = sorted(model.supported_elements or [])
    shards = m.get("shards", {})
    last = next(f for stage in reversed(stages(job.spec))
                if (f := job.workdir / "train" / stage / "student.ckpt").exists())
    data = {"manifest_hash": m.get("data_hash"), "structures": sum(s["structures"] for s in shards.values()),
            "heldout_structures": sum(s["heldout"] for s in shards.values()), "shards": len(shards),
            "seed": job.spec.seed, "mode": job.spec.domain.mode}
    for name in stages(job.spec)[1:-1]:  # the refine rounds
        if (refine := m.get(name, {})).get("shards"):
            data[name] = {"manifest_hash": refine.get("data_hash"),
                          "structures": sum(s["structures"] for s in refine["shards"].values()),
                          "shards": len(refine["shards"])}
    return {
        "name": job.spec.name,
        "teacher": m["teacher"],
        "energy_convention": m["teacher"]["energy_convention"],
        "data": data,
        "supported_elements": [chemical_symbols[z] for z in elements],
        "student": dataclasses.asdict(job.spec.student),
        "training": training_status(job),
        "metrics": metrics,
        "weights_hash": weights_hash(last),
    }


def write_card(job, model, path: Path, metrics: dict | None) -> dict:
    """Put the card into the checkpoint file at ``path`` (everything else in the file unchanged)."""
    card = build_card(job, model, metrics)
    ck = torch.load(path, map_location="cpu", weights_only=False)
    meta = dict(ck.get(METADATA_KEY) or {})
    meta["card"] = card
    ck[METADATA_KEY] = meta
    tmp = Path(path).with_name(Path(path).name + ".card.tmp")
    torch.save(ck, tmp)
    tmp.replace(path)
    return card


def publish_student(job, weights: Path) -> Path:
    """``<workdir>/student.ckpt``: the trained ``weights`` with a model card (metrics added by the validation);
    kept when it holds these weights (the validation may have updated its card), replaced when they changed
    (e.g. a refine round was added after a first student)."""
    student = job.workdir / "student.ckpt"
    if not student.exists() or weights_hash(student) != weights_hash(weights):
        tmp = student.with_name("student.ckpt.tmp")
        shutil.copyfile(weights, tmp)
        write_card(job, load_checkpoint(tmp), tmp, metrics=None)
        tmp.replace(student)
    return student
