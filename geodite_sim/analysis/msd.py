"""Mean-squared displacement per species and diffusion coefficients from periodic trajectories.

- **Unwrapping**: positions stored wrapped into the cell jump by a lattice vector when an atom
  crosses a face. The displacement between consecutive frames is taken as its minimum image
  in the later frame's cell (fractional coordinates rounded), then accumulated. That is exact
  while no atom moves more than half a perpendicular cell width between frames (a frame every
  15 fs moves an ion ~0.1 Å); a warning is raised when a displacement comes close to it.
- **Centre of mass**: by default the mass-weighted centre-of-mass displacement of the whole
  system is subtracted from every atom (drift of the frame of reference, not diffusion).
- **MSD**: MSD_s(τ) = < |u_i(t + τ) - u_i(t)|² >_{i in s, t}, averaged over atoms of species s
  and over all time origins t, computed with FFTs (O(T log T) per atom) in torch.
- **Diffusion**: D from a least-squares line MSD(t) = 6 D t + b over a window of lag times
  (default 10 %–50 % of the analysed span: past the ballistic/caging regime, before the
  statistics thin out). Reported in Å²/ps and cm²/s (1 Å²/ps = 1e-4 cm²/s).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from ase.data import atomic_masses, chemical_symbols

#: 1 Å²/ps in cm²/s.
A2_PER_PS_IN_CM2_PER_S = 1e-4


def _tensor(x, device, dtype) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.to(device=device, dtype=dtype)
    arr = np.asarray(x)
    if not arr.flags.writeable:  # e.g. np.broadcast_to views: torch wants writable memory
        arr = arr.copy()
    return torch.as_tensor(arr, device=device, dtype=dtype)


def unwrap_positions(positions, cells, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[T, N, 3] continuous trajectories from positions wrapped across periodic boundaries.

    Args:
        positions: [T, N, 3] Å. cells: [T, 3, 3] or [3, 3] (rows = lattice vectors), Å.
    Returns the unwrapped positions (frame 0 unchanged), Å.
    """
    pos = _tensor(positions, device, dtype)
    cell = _tensor(cells, device, dtype)
    if cell.ndim == 2:
        cell = cell.expand(pos.shape[0], 3, 3)
    if pos.shape[0] < 2:
        return pos.clone()
    d = pos[1:] - pos[:-1]
    frac = torch.einsum("tni,tij->tnj", d, torch.linalg.inv(cell[1:]))
    jump = torch.round(frac)
    frac = frac - jump
    biggest = float(frac.abs().max()) if frac.numel() else 0.0
    if biggest > 0.35:
        warnings.warn(f"an atom moves {biggest:.2f} of a cell vector between frames: unwrapping may be wrong "
                      "(store frames more often)", RuntimeWarning, stacklevel=2)
    d = torch.einsum("tni,tij->tnj", frac, cell[1:])
    return torch.cat([pos[:1], pos[:1] + torch.cumsum(d, dim=0)], dim=0)


def _msd_fft(x: torch.Tensor, n_lags: int) -> torch.Tensor:
    """Sum over rows of the all-origins MSD of 1-D series ``x`` [C, T], lags 0..n_lags-1 -> [n_lags]."""
    return msd_fft_rows(x, n_lags).sum(0)


def msd_fft_rows(x: torch.Tensor, n_lags: int) -> torch.Tensor:
    """All-origins MSD of each row of ``x`` [C, T] (1-D series), lags 0..n_lags-1 -> [C, n_lags]."""
    n_t = x.shape[1]
    sq = x * x
    prefix = torch.cat([torch.zeros_like(sq[:, :1]), torch.cumsum(sq, dim=1)], dim=1)  # [C, T+1]
    lags = torch.arange(n_lags, device=x.device)
    s1 = (prefix[:, -1:] - prefix[:, lags]) + prefix[:, n_t - lags]
    spec = torch.fft.rfft(x, n=2 * n_t, dim=1)
    acf = torch.fft.irfft(spec * spec.conj(), n=2 * n_t, dim=1)[:, :n_lags]
    return (s1 - 2.0 * acf) / (n_t - lags).to(x.dtype)


@dataclass
class MSDResult:
    """MSD per species.

    Attributes:
        t_fs: [L] lag times, fs (0, Δt, 2Δt, ...).
        msd: ``{"Li": [L]}`` mean-squared displacement, Å².
        n_atoms: ``{"Li": N_Li}``.
        span_fs: length of the analysed trajectory, fs (lags go up to ``max_lag_fraction`` of it).
    """

    t_fs: np.ndarray
    msd: dict[str, np.ndarray]
    n_atoms: dict[str, int] = field(default_factory=dict)
    span_fs: float | None = None

    def to_dict(self) -> dict:
        return {"t_fs": self.t_fs.tolist(), "msd": {k: v.tolist() for k, v in self.msd.items()},
                "n_atoms": dict(self.n_atoms), "span_fs": self.span_fs}

    @classmethod
    def from_dict(cls, d: dict) -> MSDResult:
        return cls(np.asarray(d["t_fs"], dtype=float), {k: np.asarray(v, dtype=float) for k, v in d["msd"].items()},
                   dict(d.get("n_atoms", {})), d.get("span_fs"))


def compute_msd(
    positions,
    cells,
    numbers,
    frame_interval_fs: float,
    masses=None,
    remove_com: bool = True,
    max_lag_fraction: float = 0.5,
    unwrapped: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> MSDResult:
    """Mean-squared displacement of every species, all time origins.

    Args:
        positions: [T, N, 3] Å, evenly spaced in time, wrapped or not (see ``unwrapped``).
        cells: [T, 3, 3] or [3, 3], Å.
        numbers: [N] atomic numbers.
        frame_interval_fs: time between frames, fs.
        masses: [N] amu for the centre-of-mass correction (default: standard atomic masses).
        remove_com: subtract the system's centre-of-mass displacement.
        max_lag_fraction: longest lag kept, as a fraction of the trajectory length.
        unwrapped: positions are already continuous (skip unwrapping).
    """
    numbers = np.asarray(numbers, dtype=int)
    u = _tensor(positions, device, dtype) if unwrapped else unwrap_positions(positions, cells, device, dtype)
    n_t, n_atoms = u.shape[:2]
    if n_t < 2:
        raise ValueError("need at least two frames for an MSD")
    if remove_com:
        m = atomic_masses[numbers] if masses is None else np.asarray(masses, dtype=float)
        w = _tensor(m / m.sum(), device, dtype)
        u = u - torch.einsum("tni,n->ti", u, w)[:, None, :]
    n_lags = max(2, min(n_t, int(round(max_lag_fraction * n_t)) + 1))
    chunk = max(1, (4 << 20) // (6 * n_t))  # atoms per FFT block
    out, counts = {}, {}
    for z in np.unique(numbers):
        idx = torch.as_tensor(np.nonzero(numbers == z)[0], device=u.device)
        total = torch.zeros(n_lags, device=u.device, dtype=dtype)
        for k in range(0, len(idx), chunk):
            x = u[:, idx[k:k + chunk], :].permute(1, 2, 0).reshape(-1, n_t)  # [atoms*3, T]
            total += _msd_fft(x, n_lags)
        out[chemical_symbols[z]] = (total / len(idx)).cpu().numpy()
        counts[chemical_symbols[z]] = int(len(idx))
    return MSDResult(np.arange(n_lags) * float(frame_interval_fs), out, counts, (n_t - 1) * float(frame_interval_fs))


@dataclass
class DiffusionFit:
    """Linear fit MSD(t) = 6 D t + b over ``window_fs``.

    Attributes:
        D_A2_per_ps: Å²/ps. D_cm2_per_s: cm²/s. intercept: b, Å². r2: coefficient of determination.
        window_fs: (start, end) lag times fitted, fs. n_points: lags in the window.
    """

    D_A2_per_ps: float
    D_cm2_per_s: float
    intercept: float
    r2: float
    window_fs: tuple[float, float]
    n_points: int

    def to_dict(self) -> dict:
        return {"D_A2_per_ps": self.D_A2_per_ps, "D_cm2_per_s": self.D_cm2_per_s, "intercept": self.intercept,
                "r2": self.r2, "window_fs": list(self.window_fs), "n_points": self.n_points}


def fit_diffusion(t_fs, msd, window_fs: tuple[float, float] | None = None,
                  window_fraction: tuple[float, float] = (0.1, 0.5), span_fs: float | None = None) -> DiffusionFit:
    """D from a least-squares line through MSD(t) over a window of lag times.

    Args:
        t_fs: [L] lag times, fs. msd: [L] Å².
        window_fs: (start, end) in fs; default ``window_fraction`` × ``span_fs``.
        span_fs: length of the analysed trajectory, fs (default: twice the longest lag, the
            usual ``max_lag_fraction = 0.5``).
    """
    t = np.asarray(t_fs, dtype=float)
    y = np.asarray(msd, dtype=float)
    if window_fs is None:
        span = float(span_fs) if span_fs is not None else 2.0 * t[-1]
        window_fs = (window_fraction[0] * span, window_fraction[1] * span)
    sel = (t >= window_fs[0] - 1e-9) & (t <= window_fs[1] + 1e-9)
    if sel.sum() < 2:
        raise ValueError(f"fit window {window_fs} fs holds {int(sel.sum())} lag times; need at least 2")
    slope, intercept = np.polyfit(t[sel], y[sel], 1)
    pred = slope * t[sel] + intercept
    ss_tot = float(((y[sel] - y[sel].mean()) ** 2).sum())
    r2 = 1.0 - float(((y[sel] - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    d_a2_ps = float(slope) / 6.0 * 1000.0  # Å²/fs -> Å²/ps
    return DiffusionFit(d_a2_ps, d_a2_ps * A2_PER_PS_IN_CM2_PER_S, float(intercept), r2,
                        (float(window_fs[0]), float(window_fs[1])), int(sel.sum()))


def diffusion_coefficients(result: MSDResult, window_fs: tuple[float, float] | None = None,
                           window_fraction: tuple[float, float] = (0.1, 0.5),
                           span_fs: float | None = None) -> dict[str, DiffusionFit]:
    """:func:`fit_diffusion` for every species of ``result`` (span default: ``result.span_fs``)."""
    span_fs = span_fs if span_fs is not None else result.span_fs
    return {s: fit_diffusion(result.t_fs, y, window_fs, window_fraction, span_fs) for s, y in result.msd.items()}
