"""Label: teacher energy, forces and stress of a candidate shard through the engine's batched ``evaluate``.

A structure the teacher fails on (refused element, too-close atoms, an exception, non-finite output) is
recorded in the shard's ``failures`` with its reason and left out; the others are labelled unchanged.
"""

from __future__ import annotations

import numpy as np
from geodite_sim.workflows.distill.shards import ShardData


def label_shard(candidates: ShardData, teacher, batch_atoms: int = 2048) -> ShardData:
    """The labelled shard: candidates the teacher computed, with energy (eV), forces (eV/Å), stress (eV/Å^3)."""
    from geodite_sim.evaluate import evaluate

    out = evaluate(candidates.atoms, teacher, max_atoms=batch_atoms, compute_stress=True,
                   min_distance_factor=0.5)
    keep, energy, forces, stress = [], [], [], []
    failures = list(candidates.failures)
    for i, r in enumerate(out):
        tag = candidates.tags[i]
        if r["error"] is not None:
            failures.append({"tag": tag, "error": f"teacher: {r['error']}"})
            continue
        e, f = float(r["energy"]), np.asarray(r["forces"], dtype=np.float64)
        s = np.asarray(r["stress"], dtype=np.float64)
        if not candidates.atoms[i].pbc.all():
            s = np.full((3, 3), np.nan)
        if not (np.isfinite(e) and np.isfinite(f).all()):
            failures.append({"tag": tag, "error": "teacher returned non-finite energy or forces"})
            continue
        keep.append(i)
        energy.append(e)
        forces.append(f)
        stress.append(s)
    return ShardData(
        atoms=[candidates.atoms[i] for i in keep], tags=[candidates.tags[i] for i in keep],
        compositions=[candidates.compositions[i] for i in keep], heldout=[candidates.heldout[i] for i in keep],
        energy=np.asarray(energy, dtype=np.float64), forces=forces,
        stress=np.asarray(stress, dtype=np.float64).reshape(-1, 3, 3), failures=failures,
    )
