"""Element-pair-resolved radial distribution functions of periodic trajectories, and overlap scores.

Definitions (the SSE protocol of the Geodite paper, docs/sse-campaign.md)::

    g_AB(r_k) = < V_t / (N_A N_B) * n_AB,t(k) / shell_k >_t
    shell_k   = 4/3 pi (r_{k+1}^3 - r_k^3)          (exact shell volume, bin width dr = 0.05 Å)
    n_AB,t(k) = ordered pairs (i in A, j in B, i != j) whose separation, over all periodic
                images, lies in [r_k, r_{k+1})

with the per-frame volume ``V_t``; for A = B each unordered pair counts twice, so that
``g_AB = g_BA`` and, for an ideal gas, ``g -> 1`` (ASE's ``get_rdf`` since 3.27, LAMMPS).

r_max. For r < L/2, where L is the length of the shortest non-zero lattice translation, a
pair has at most one periodic image within r (two images of j differ by a lattice vector
t, so |d| + |d + t| >= |t| >= L), hence "minimum image" and "all images" agree and the RDF
is exact up to L/2 — the protocol's "half the shortest periodic-image separation". L is
found by Minkowski-reducing the cell and minimising over small integer combinations of the
reduced vectors; for a triclinic cell it can be much larger than the smallest perpendicular
width w_min = V / max |a_j x a_k| (a sheared cubic cell keeps L = a while w_min shrinks).
The perpendicular widths matter for a different reason: rounding fractional coordinates
finds the shortest image only for separations below w_min / 2, which is why ASE's
``get_rdf`` refuses r_max > w_min / 2. Here the minimum image is not taken by rounding
alone: after rounding in the reduced basis, every lattice shift n with
|n_i| < 1/2 + r_max / w_i is tried, which provably includes every image closer than r_max
(|(f + n)_i| = |v . b_i| <= |v| / w_i for the reciprocal vectors b_i). For a cubic or
orthorhombic cell that is the single zero shift; strongly sheared cells try a few more.

Everything runs in torch on the chosen device, a block of frames at a time
(``frames_per_batch`` x pairs distances in memory).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from ase.data import chemical_symbols

#: The protocol's bin width, Å.
DEFAULT_BIN_WIDTH = 0.05


# ---------------------------------------------------------------------------------------------- geometry
def perpendicular_widths(cell: np.ndarray) -> np.ndarray:
    """[3] distances between opposite faces of the cell, Å (``V / |a_j x a_k|``)."""
    cell = np.asarray(cell, dtype=float)
    vol = abs(np.linalg.det(cell))
    return np.array([vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)])


def reduced_cell(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minkowski-reduced basis of the same lattice: ``(rcell, op)`` with ``rcell = op @ cell``."""
    from ase.geometry import minkowski_reduce

    rcell, op = minkowski_reduce(np.asarray(cell, dtype=float), pbc=True)
    return np.asarray(rcell, dtype=float), np.asarray(op)


def shortest_lattice_vector(cell: np.ndarray) -> float:
    """Length of the shortest non-zero lattice translation of ``cell`` (rows = lattice vectors), Å.

    Minkowski-reduces the basis (its first vector is already the shortest one) and, as a check,
    minimises over all integer combinations with coefficients in -2..2 of the reduced vectors.
    """
    rcell, _ = reduced_cell(cell)
    n = np.array([v for v in itertools.product(range(-2, 3), repeat=3) if any(v)], dtype=float)
    return float(np.linalg.norm(n @ rcell, axis=1).min())


def max_rdf_radius(cells: np.ndarray) -> float:
    """Half the shortest periodic-image separation, minimised over frames ``cells`` [T,3,3] (or one [3,3])."""
    cells = np.asarray(cells, dtype=float).reshape(-1, 3, 3)
    unique = np.unique(cells.round(10), axis=0)
    return 0.5 * min(shortest_lattice_vector(c) for c in unique)


def _image_shifts(rcells: np.ndarray, r_max: float) -> np.ndarray:
    """[K,3] integer shifts (reduced basis) that contain every image closer than ``r_max``."""
    widths = np.min([perpendicular_widths(c) for c in rcells], axis=0)
    n_max = [max(0, math.ceil(0.5 + r_max / w - 1e-12) - 1) for w in widths]
    ranges = [range(-k, k + 1) for k in n_max]
    return np.array(list(itertools.product(*ranges)), dtype=float)


# ---------------------------------------------------------------------------------------------- results
def pair_name(z_a: int, z_b: int) -> str:
    """"A-B" with the lighter element first (by atomic number), e.g. ``pair_name(3, 7) == "Li-N"``."""
    a, b = sorted((int(z_a), int(z_b)))
    return f"{chemical_symbols[a]}-{chemical_symbols[b]}"


@dataclass
class RDFResult:
    """Partial RDFs of one trajectory.

    Attributes:
        edges: [K+1] bin edges, Å (0 .. r_max in steps of ``bin_width``).
        g: ``{"A-B": [K]}`` partial g(r), dimensionless (1 = ideal gas at the mean density).
        n_frames: frames averaged.
        species: ``{"Li": N_Li, ...}`` atoms per element.
    """

    edges: np.ndarray
    g: dict[str, np.ndarray]
    n_frames: int
    species: dict[str, int] = field(default_factory=dict)

    @property
    def r(self) -> np.ndarray:
        """[K] bin centres, Å."""
        return 0.5 * (self.edges[1:] + self.edges[:-1])

    @property
    def bin_width(self) -> float:
        return float(self.edges[1] - self.edges[0])

    @property
    def r_max(self) -> float:
        return float(self.edges[-1])

    @property
    def pairs(self) -> list[str]:
        return list(self.g)

    def to_dict(self) -> dict:
        return {"edges": self.edges.tolist(), "g": {k: v.tolist() for k, v in self.g.items()},
                "n_frames": self.n_frames, "species": dict(self.species)}

    @classmethod
    def from_dict(cls, d: dict) -> RDFResult:
        return cls(np.asarray(d["edges"], dtype=float), {k: np.asarray(v, dtype=float) for k, v in d["g"].items()},
                   int(d["n_frames"]), dict(d.get("species", {})))


# ---------------------------------------------------------------------------------------------- RDF
def compute_rdf(
    positions,
    cells,
    numbers,
    bin_width: float = DEFAULT_BIN_WIDTH,
    r_max: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    frames_per_batch: int | None = None,
) -> RDFResult:
    """Element-pair-resolved g(r) averaged over frames of a fully periodic trajectory.

    Args:
        positions: [T, N, 3] Cartesian positions, Å (numpy or torch; wrapped or not).
        cells: [T, 3, 3] cells (rows = lattice vectors), Å; or one [3, 3] for all frames.
        numbers: [N] atomic numbers.
        bin_width: Å (protocol: 0.05).
        r_max: upper end, Å; default half the shortest periodic-image separation over all frames.
            Rounded down to a whole number of bins. Larger values than that default are refused
            (pairs could then have several images in range and the minimum-image RDF is wrong).
        device, dtype: where and in which precision the distances are computed.
        frames_per_batch: frames per tensor block (default: about one million pair distances per block).
    """
    pos = positions if torch.is_tensor(positions) else np.asarray(positions)  # moved to the device per block
    if pos.ndim != 3 or pos.shape[-1] != 3:
        raise ValueError(f"positions must be [T, N, 3], got {tuple(pos.shape)}")
    n_frames, n_atoms = pos.shape[:2]
    if n_frames == 0:
        raise ValueError("no frames to analyse")
    cells_np = np.asarray(cells.cpu() if torch.is_tensor(cells) else cells, dtype=float)
    if cells_np.shape == (3, 3):
        cells_np = np.broadcast_to(cells_np, (n_frames, 3, 3))
    if cells_np.shape != (n_frames, 3, 3):
        raise ValueError(f"cells must be [T, 3, 3] or [3, 3], got {cells_np.shape}")
    numbers = np.asarray(numbers, dtype=int)
    if numbers.shape != (n_atoms,):
        raise ValueError(f"numbers must be [N={n_atoms}], got {numbers.shape}")

    limit = max_rdf_radius(cells_np)
    if r_max is None:
        r_max = limit
    elif r_max > limit * (1 + 1e-9):
        raise ValueError(f"r_max = {r_max:.4f} Å exceeds half the shortest periodic-image separation "
                         f"({limit:.4f} Å): the minimum-image RDF is not defined beyond it")
    n_bins = int(math.floor(r_max / bin_width + 1e-9))
    if n_bins < 1:
        raise ValueError(f"cell too small for one bin of {bin_width} Å (r_max = {r_max:.4f} Å)")
    r_cut = n_bins * bin_width
    edges = np.arange(n_bins + 1) * bin_width

    # Pair types (lighter element first) of the unordered pairs i < j.
    species = np.unique(numbers)
    pair_list = [(a, b) for k, a in enumerate(species) for b in species[k:]]
    type_of = {p: t for t, p in enumerate(pair_list)}
    sp_index = np.searchsorted(species, numbers)
    table = np.zeros((len(species), len(species)), dtype=np.int64)
    for (a, b), t in type_of.items():
        ia, ib = np.searchsorted(species, [a, b])
        table[ia, ib] = table[ib, ia] = t
    iu, ju = torch.triu_indices(n_atoms, n_atoms, 1, device=device)
    sp = torch.as_tensor(sp_index, device=device)
    pair_type = torch.as_tensor(table, device=device)[sp[iu], sp[ju]]
    n_pairs = iu.shape[0]

    # Lattice basis: Minkowski-reduced once (same lattice, integer change of basis for all frames).
    _, op = reduced_cell(cells_np[0])
    rcells_np = np.einsum("ij,tjk->tik", op.astype(float), cells_np)
    shifts = torch.as_tensor(_image_shifts(rcells_np, r_cut), device=device, dtype=dtype)
    rcells = torch.as_tensor(rcells_np, device=device, dtype=dtype)
    inv = torch.linalg.inv(rcells)
    volume = torch.as_tensor(np.abs(np.linalg.det(cells_np)), device=device, dtype=dtype)

    if frames_per_batch is None:
        frames_per_batch = max(1, (1 << 20) // max(1, n_pairs))
    hist = torch.zeros(len(pair_list) * n_bins, device=device, dtype=dtype)
    for t0 in range(0, n_frames, frames_per_batch):
        sl = slice(t0, min(n_frames, t0 + frames_per_batch))
        p = (pos[sl] if torch.is_tensor(pos) else torch.from_numpy(np.array(pos[sl]))).to(device=device, dtype=dtype)  # type: ignore[union-attr]  # a tensor in both branches
        frac = torch.einsum("fpi,fij->fpj", p[:, ju] - p[:, iu], inv[sl])
        frac = frac - torch.round(frac)
        weight = volume[sl][:, None].expand(-1, n_pairs)
        for shift in shifts:
            r = torch.linalg.vector_norm(torch.einsum("fpi,fij->fpj", frac + shift, rcells[sl]), dim=-1)
            inside = r < r_cut
            if not bool(inside.any()):
                continue
            k = torch.clamp((r[inside] / bin_width).long(), max=n_bins - 1)
            flat = pair_type.expand_as(r)[inside] * n_bins + k
            hist += torch.bincount(flat, weights=weight[inside], minlength=hist.shape[0])

    hist = hist.reshape(len(pair_list), n_bins).cpu().numpy()
    shell = 4.0 / 3.0 * np.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    counts = {int(z): int((numbers == z).sum()) for z in species}
    g = {}
    for t, (a, b) in enumerate(pair_list):
        ordered = 2.0 if a == b else 1.0
        g[pair_name(a, b)] = ordered * hist[t] / (n_frames * counts[a] * counts[b] * shell)
    return RDFResult(edges, g, n_frames, {chemical_symbols[z]: n for z, n in counts.items()})


# ---------------------------------------------------------------------------------------------- scores
def overlap_score(g_ref: np.ndarray, g: np.ndarray, bin_width: float = DEFAULT_BIN_WIDTH) -> float:
    """d = 1 - ∫|g_ref - g| dr / (∫g_ref dr + ∫g dr); 1.0 = identical, 0.0 = disjoint.

    Both curves must be on the same bins; NaN when both are zero everywhere (no pair in range).
    """
    g_ref = np.asarray(g_ref, dtype=float)
    g = np.asarray(g, dtype=float)
    if g_ref.shape != g.shape:
        raise ValueError(f"RDFs on different grids: {g_ref.shape} vs {g.shape}")
    denom = (g_ref.sum() + g.sum()) * bin_width
    if denom <= 0:
        return float("nan")
    return float(1.0 - np.abs(g_ref - g).sum() * bin_width / denom)


@dataclass
class RDFComparison:
    """Overlap of a model trajectory's RDFs with a reference's.

    Attributes:
        pair_scores: ``{"A-B": d_AB}``.
        score: the system score, the minimum over pairs (NaN pairs — no pair in range — ignored).
        worst_pair: the pair attaining the minimum.
        r_max: the common range compared, Å.
    """

    pair_scores: dict[str, float]
    score: float
    worst_pair: str
    r_max: float

    def to_dict(self) -> dict:
        return {"pair_scores": self.pair_scores, "score": self.score, "worst_pair": self.worst_pair,
                "r_max": self.r_max}


def compare_rdfs(reference: RDFResult, model: RDFResult) -> RDFComparison:
    """Per-pair overlap scores and the system score (minimum over pairs) of ``model`` against ``reference``.

    Both must use the same bin width; they are compared over their common range of bins.
    Raises ValueError when the element pairs differ (different compositions).
    """
    if abs(reference.bin_width - model.bin_width) > 1e-9:
        raise ValueError(f"bin widths differ: {reference.bin_width} vs {model.bin_width} Å")
    if set(reference.g) != set(model.g):
        raise ValueError(f"element pairs differ: reference {sorted(reference.g)} vs model {sorted(model.g)}")
    n = min(len(reference.edges), len(model.edges)) - 1
    scores = {p: overlap_score(reference.g[p][:n], model.g[p][:n], model.bin_width) for p in reference.g}
    finite = {p: s for p, s in scores.items() if not math.isnan(s)}
    if finite:
        worst = min(finite, key=lambda p: finite[p])
        score = finite[worst]
    else:
        worst, score = "", float("nan")
    return RDFComparison(scores, score, worst, float(model.edges[n]))
