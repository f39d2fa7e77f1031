"""Memory model of one model step (energy + forces + stress) and the batch capacity it implies.

Peak memory of a Geodite step is affine in the number of atoms and edges,
``peak ≈ fixed + bytes_per_atom · N + bytes_per_edge · E``: every [N, 8, C]
node tensor and every [E, C] / [E, 8, C] edge tensor saved for the backward
pass scales with one of the two. :func:`fit_memory_model` measures peaks on a
few probe batches and fits the three coefficients; :func:`capacity_from_budget`
turns a byte budget into ``max_atoms`` for the scheduler.

Measurement: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the
process's peak resident set (``ru_maxrss``) above a baseline, in a fresh child
process per probe so that the high-water mark of one probe does not hide the next.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class MemoryModel:
    """peak bytes ≈ fixed_bytes + bytes_per_atom · atoms + bytes_per_edge · edges."""

    bytes_per_atom: float
    bytes_per_edge: float
    fixed_bytes: float = 0.0

    def predict(self, n_atoms: int, n_edges: int) -> float:
        """Predicted peak bytes of one step."""
        return self.fixed_bytes + self.bytes_per_atom * n_atoms + self.bytes_per_edge * n_edges

    def max_atoms(self, budget_bytes: float, edges_per_atom: float, margin: float = 0.2) -> int:
        """Largest atom count whose predicted peak stays within ``(1 - margin) · budget_bytes``."""
        usable = (1.0 - margin) * budget_bytes - self.fixed_bytes
        per_atom = self.bytes_per_atom + self.bytes_per_edge * edges_per_atom
        return max(int(usable // per_atom), 0)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_memory_model(samples: list[tuple[int, int, float]]) -> MemoryModel:
    """Least-squares fit of (atoms, edges, peak_bytes) samples; coefficients clipped at >= 0."""
    a = np.array([[1.0, n, e] for n, e, _ in samples])
    y = np.array([p for _, _, p in samples])
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    fixed, per_atom, per_edge = (max(float(c), 0.0) for c in coef)
    return MemoryModel(bytes_per_atom=per_atom, bytes_per_edge=per_edge, fixed_bytes=fixed)


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_step_peak(model, batch, edges=None) -> int:
    """Peak extra bytes of one energy+forces+stress evaluation of ``batch``.

    CUDA: exact allocator peak. CPU: rise of the process's peak resident set, which is
    only meaningful in a process that has not run a larger step before (see
    :func:`measure_step_peak_subprocess`).
    """
    from geodite_sim.neighbors import neighbor_list

    if edges is None:
        edges = neighbor_list(batch, model.cutoff)
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)
        base = torch.cuda.memory_allocated(batch.device)
        torch.cuda.reset_peak_memory_stats(batch.device)
        model(batch, edges=edges)
        torch.cuda.synchronize(batch.device)
        return int(torch.cuda.max_memory_allocated(batch.device) - base)
    base = _maxrss_bytes()
    model(batch, edges=edges)
    return max(_maxrss_bytes() - base, 0)


_CHILD = r"""
import json, sys, resource, torch
from ase.io import read
from geodite_sim.batch import Batch
from geodite_sim.model import load_model
from geodite_sim.neighbors import neighbor_list
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model = load_model(args["model"], dtype=getattr(torch, args["dtype"]))
atoms = read(args["structures"], index=":")
small = Batch.from_atoms(atoms[:1], dtype=model.dtype)
model(small)  # warm-up: allocator, vacuum cache, libraries
batch = Batch.from_atoms(atoms, dtype=model.dtype)
edges = neighbor_list(batch, model.cutoff)
import os
page = os.sysconf("SC_PAGE_SIZE")
with open("/proc/self/statm") as f:
    rss_before = int(f.read().split()[1]) * page
high_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model(batch, edges=edges)
high_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# Valid only if the step raised the high-water mark; otherwise report the lower bound.
print(json.dumps({"atoms": batch.n_atoms, "edges": int(edges.sender.shape[0]),
                  "peak": high_after - rss_before, "raised_high_water": high_after > high_before}))
"""


def measure_step_peak_subprocess(structures_file: str, model: str | None, dtype: str = "float32",
                                 threads: int = 1) -> dict:
    """Peak extra resident bytes of one step on the structures in ``structures_file``, in a fresh process.

    Returns ``{"atoms", "edges", "peak"}``.
    """
    args = json.dumps({"structures": structures_file, "model": model, "dtype": dtype, "threads": threads})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _CHILD, args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def capacity_from_budget(model: MemoryModel, budget_bytes: float, edges_per_atom: float,
                         margin: float = 0.2) -> int:
    """``max_atoms`` for a scheduler so that one step fits in ``budget_bytes`` with a safety margin."""
    return model.max_atoms(budget_bytes, edges_per_atom, margin)
