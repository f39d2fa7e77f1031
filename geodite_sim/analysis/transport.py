"""Transport observables of one MD run, streamed from its HDF5 trajectory: tracer diffusivity per species
with a confidence interval, Nernst–Einstein conductivity, collective (charge) diffusivity and Haven ratio.

    from geodite_sim.analysis.transport import TransportSettings, analyse_transport
    res = analyse_transport("run.h5", system=0, settings=TransportSettings(mobile=("Li",), discard_fs=5000))
    res.tracer["Li"].D_cm2_per_s, res.tracer["Li"].ci_cm2_per_s, res.conductivity["Li"], res.charge["Li"]

**Streaming.** Frames are read from the file in chunks of ``chunk_mb`` MiB, unwrapped at the stored frame
rate (minimum image of each frame-to-frame step, :func:`~geodite_sim.analysis.msd.unwrap_positions`,
carried across chunks), the drift removed, and every ``stride``-th frame kept, with ``stride`` chosen so
that at most ``max_frames`` frames are kept. Memory is therefore bounded by ``max_frames`` × atoms × 24 B
plus one chunk, whatever the length of the run (the diffusive fit uses lags of 10–50 % of the span, far
beyond the stride).

**Tracer D** (pymatgen-analysis-diffusion's estimator, ``DiffusionAnalyzer(smoothed="max")``): the
all-origins MSD of the species, least-squares line MSD = 6 D t + b weighted by 1/t over the fit window
(default lags of 10–50 % of the analysed span; ``fit_window_fs`` fixes it in fs). The weighted slope is
linear in the MSD, which is the mean over atoms of per-atom MSDs, so D is the mean of per-atom slopes
s_i / 6, and its standard error is sd(s_i) / (6 √N) — exact for independent atoms, with every time
correlation inside each atom's path included (no model of the MSD covariance is needed; the ordinary
least-squares error of the MSD points, which are strongly correlated, understates it several-fold). The
interval is Student's t with N − 1 degrees of freedom. D is **not determined** (``None``, with the reason)
when the slope is not positive or R² of the line through the mean MSD is below ``r2_min``.

**Collective D_σ and Haven ratio** (``mobile`` species): D_σ = slope of <|Σ_i Δr_i(t)|²> / (6 N) (as
DiffusionAnalyzer's ``chg_diffusivity``), H = D* / D_σ. The collective displacement is one path, so
its MSD averages no atoms: the run is cut into ``haven_blocks`` blocks, D_σ is fitted in each (window =
the same fractions of the block), and D_σ = mean ± t-interval over blocks. D_σ and H are reported only
when D_σ > 0 with relative standard error ≤ ``haven_max_rel_se`` (default 1/3, i.e. 3σ from zero)
and every block holds ≥ 20 frames; otherwise "not determined" with the numbers that decided it.

**Conductivity** (Nernst–Einstein, Haven ratio 1): σ = D* · n z² e² / (V k_B T) with
pymatgen-analysis-diffusion's ``get_conversion_factor``; charges from ``charges`` or pymatgen's
oxidation-state guess for the composition.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase.data import chemical_symbols

from geodite_sim.analysis.msd import msd_fft_rows, unwrap_positions

#: 1 Å²/fs in cm²/s.
A2_PER_FS_IN_CM2_PER_S = 0.1
_MIN_BLOCK_FRAMES = 20


@dataclass
class TransportSettings:
    """How a run is analysed (units: fs, K; fractions of the analysed span).

    Attributes:
        mobile: species whose conductivity and collective D are computed (D* is computed for every species).
        discard_fs: equilibration time dropped from the start of the run.
        fit_fraction: (start, end) of the fit window as fractions of the analysed span.
        fit_window_fs: explicit (start, end) lag window, fs (overrides ``fit_fraction``).
        drift: "com" (mass-weighted centre of mass of all atoms), "framework" (mean of the non-mobile
            atoms, pymatgen's convention) or "none".
        r2_min: D is "not determined" below this R² of the line through the mean MSD.
        confidence: level of the intervals.
        max_frames: frames kept for the MSD (stride chosen to stay below it); bounds the memory.
        chunk_mb: MiB of positions read from the file at a time.
        charges: {"Li": 1, ...} for Nernst–Einstein; default pymatgen's oxidation-state guess.
        haven_blocks, haven_max_rel_se: blocks of the collective-D estimate and its acceptance threshold.
        temperature_K: run temperature (default: the trajectory's target ``temperature_K``).
    """

    mobile: tuple[str, ...] = ()
    discard_fs: float = 0.0
    fit_fraction: tuple[float, float] = (0.1, 0.5)
    fit_window_fs: tuple[float, float] | None = None
    drift: str = "com"
    r2_min: float = 0.5
    confidence: float = 0.95
    max_frames: int = 2000
    chunk_mb: float = 32.0
    charges: dict[str, float] | None = None
    haven_blocks: int = 10
    haven_max_rel_se: float = 1.0 / 3.0
    temperature_K: float | None = None

    def __post_init__(self):
        if self.drift not in ("com", "framework", "none"):
            raise ValueError(f"drift must be 'com', 'framework' or 'none', got {self.drift!r}")
        if self.drift == "framework" and not self.mobile:
            raise ValueError("drift='framework' needs the mobile species (the framework is every other atom)")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        lo, hi = self.fit_window_fs or self.fit_fraction
        if not 0.0 <= lo < hi:
            raise ValueError(f"fit window must satisfy 0 <= start < end, got ({lo}, {hi})")


@dataclass
class Unwrapped:
    """Continuous, drift-corrected positions of one run, ``stride`` × the stored frame interval apart.

    Attributes:
        positions: [K, N, 3] Å (float64). numbers: [N]. masses: [N] amu. times_fs: [K] since the run start.
        volume_A3: mean cell volume over the kept frames, Å³. cell: [3, 3] last kept cell, Å.
        stride: stored frames per kept frame. temperature_K: run temperature. label: source.
    """

    positions: np.ndarray
    numbers: np.ndarray
    masses: np.ndarray
    times_fs: np.ndarray
    volume_A3: float
    cell: np.ndarray
    stride: int
    temperature_K: float | None
    label: str = ""

    @property
    def frame_interval_fs(self) -> float:
        return float(self.times_fs[1] - self.times_fs[0]) if len(self.times_fs) > 1 else 0.0


class _Stream:
    """Unwraps chunks of consecutive frames, removes the drift and keeps every ``stride``-th frame."""

    def __init__(self, n_keep: int, numbers: np.ndarray, masses: np.ndarray, settings: TransportSettings,
                 stride: int):
        n = len(numbers)
        if settings.drift == "com":
            w = masses / masses.sum()
        elif settings.drift == "framework":
            frame = ~np.isin([chemical_symbols[z] for z in numbers], settings.mobile)
            if not frame.any():
                raise ValueError("drift='framework': every atom is mobile")
            w = frame / frame.sum()
        else:
            w = np.zeros(n)
        self.w = torch.as_tensor(w, dtype=torch.float64)
        self.out = np.empty((n_keep, n, 3))
        self.cells = np.empty((n_keep, 3, 3))
        self.stride, self.n_seen, self.n_kept = stride, 0, 0
        self.prev_wrapped = self.prev_cell = self.prev_unwrapped = None

    def add(self, positions: np.ndarray, cells: np.ndarray) -> None:
        """positions [c, N, 3], cells [c, 3, 3] of the next c analysed frames (wrapped or not)."""
        pos = np.asarray(positions, dtype=np.float64)
        cell = np.asarray(cells, dtype=np.float64)
        if self.prev_wrapped is None:
            un = unwrap_positions(pos, cell)
        else:
            un = unwrap_positions(np.concatenate([self.prev_wrapped, pos]), np.concatenate([self.prev_cell, cell]))
            un = un[1:] - un[:1] + self.prev_unwrapped
        self.prev_wrapped, self.prev_cell, self.prev_unwrapped = pos[-1:], cell[-1:], un[-1:]  # type: ignore[assignment]
        un = un - torch.einsum("tni,n->ti", un, self.w)[:, None, :]
        take = np.nonzero((self.n_seen + np.arange(len(pos))) % self.stride == 0)[0]
        take = take[: len(self.out) - self.n_kept]
        self.out[self.n_kept:self.n_kept + len(take)] = un[torch.as_tensor(take)].numpy()
        self.cells[self.n_kept:self.n_kept + len(take)] = cell[take]
        self.n_kept += len(take)
        self.n_seen += len(pos)


def _plan(times: np.ndarray, settings: TransportSettings) -> tuple[np.ndarray, int]:
    """Indices of the analysed frames (regular grid, discard dropped) and the stride keeping ≤ max_frames."""
    from geodite_sim.analysis import _select

    idx = _select(times, settings.discard_fs, 1)
    stride = max(1, math.ceil(len(idx) / max(2, int(settings.max_frames))))
    return idx, stride


def unwrap_trajectory(path: str | Path, system: int | None = None,
                      settings: TransportSettings | None = None) -> Unwrapped:
    """Stream one system of a geodite_sim HDF5 trajectory into :class:`Unwrapped` (bounded memory)."""
    import h5py

    from geodite_sim.trajectory import system_group

    settings = settings or TransportSettings()
    with h5py.File(path, "r") as f:
        g, system = system_group(f, system, path)
        dt = float(f.attrs.get("timestep_fs", 0.0))
        if dt <= 0:
            raise ValueError(f"{path}: no timestep_fs attribute")
        numbers = g["numbers"][()].astype(int)
        masses = g["masses"][()].astype(float)
        times = g["step"][()].astype(float) * dt
        idx, stride = _plan(times, settings)
        n_keep = (len(idx) + stride - 1) // stride
        stream = _Stream(n_keep, numbers, masses, settings, stride)
        per_frame = len(numbers) * 3 * 8 * 3  # float64 positions, unwrapped copy, displacements
        chunk = max(2, int(settings.chunk_mb * 2**20) // per_frame)
        for j0 in range(0, len(idx), chunk):
            sel = idx[j0:j0 + chunk]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            stream.add(g["positions"][lo:hi][sel - lo], g["cell"][lo:hi][sel - lo])
        temperature = settings.temperature_K
        if temperature is None:
            temperature = float(g.attrs.get("temperature_K", 0.0)) or None
        label = f"{path}#{system}"
    kept = idx[::stride]
    return Unwrapped(stream.out, numbers, masses, times[kept], float(np.mean(np.abs(np.linalg.det(stream.cells)))),
                     stream.cells[-1], stride, temperature, label)


def unwrap_arrays(positions, cells, numbers, masses, frame_interval_fs: float,
                  settings: TransportSettings | None = None, temperature_K: float | None = None,
                  label: str = "") -> Unwrapped:
    """:class:`Unwrapped` of in-memory frames: positions [T, N, 3] Å (wrapped or not), cells [T, 3, 3] or [3, 3]."""
    settings = settings or TransportSettings()
    positions = np.asarray(positions, dtype=float)
    cells = np.broadcast_to(np.asarray(cells, dtype=float), (len(positions), 3, 3))
    times = np.arange(len(positions)) * float(frame_interval_fs)
    idx, stride = _plan(times, settings)
    stream = _Stream((len(idx) + stride - 1) // stride, np.asarray(numbers), np.asarray(masses, float), settings,
                     stride)
    stream.add(positions[idx], cells[idx])
    return Unwrapped(stream.out, np.asarray(numbers), np.asarray(masses, float), times[idx[::stride]],
                     float(np.mean(np.abs(np.linalg.det(stream.cells)))), stream.cells[-1], stride,
                     settings.temperature_K if settings.temperature_K is not None else temperature_K, label)


# ---------------------------------------------------------------------------------------------- estimators
def _window(t_fs: np.ndarray, span_fs: float, settings: TransportSettings, fraction_only: bool = False):
    """Boolean mask of the lags in the fit window (lag 0 excluded) and the window (start, end), fs."""
    if settings.fit_window_fs is not None and not fraction_only:
        lo, hi = settings.fit_window_fs
    else:
        lo, hi = settings.fit_fraction[0] * span_fs, settings.fit_fraction[1] * span_fs
    sel = (t_fs >= lo - 1e-9) & (t_fs <= hi + 1e-9) & (t_fs > 0)
    return sel, (float(lo), float(hi))


def _slope_weights(t: np.ndarray) -> np.ndarray:
    """c [L] with slope = c · y for the least-squares line y = m t + b weighted by 1/t (DiffusionAnalyzer)."""
    a = np.stack([t, np.ones_like(t)], axis=1)
    w = 1.0 / t
    return np.linalg.solve(a.T @ (a * w[:, None]), (a * w[:, None]).T)[0]


def per_atom_msd(u: np.ndarray, n_lags: int, device="cpu") -> np.ndarray:
    """All-origins MSD of each atom of ``u`` [K, n, 3] (Å), lags 0..n_lags-1 -> [n, n_lags] Å²."""
    k, n = u.shape[:2]
    out = np.empty((n, n_lags))
    block = max(1, (8 << 20) // (6 * 2 * k))  # atoms per FFT block (~8M complex values)
    for a in range(0, n, block):
        x = torch.as_tensor(np.ascontiguousarray(u[:, a:a + block].transpose(1, 2, 0)), device=device)
        rows = msd_fft_rows(x.reshape(-1, k), n_lags).reshape(-1, 3, n_lags).sum(1)
        out[a:a + block] = rows.cpu().numpy()
    return out


@dataclass
class TracerDiffusion:
    """Tracer D of one species. ``D_cm2_per_s`` is None when not determined (``reason`` says why);
    ``slope_D_cm2_per_s`` is the fitted value whatever its quality. ``ci_cm2_per_s``: interval at ``confidence``.
    ``window_fs``: fitted lags (start, end), fs; ``n_lags`` of them; ``r2``: of the line through the mean MSD."""

    species: str
    n_atoms: int
    D_cm2_per_s: float | None
    se_cm2_per_s: float | None
    ci_cm2_per_s: tuple[float, float] | None
    slope_D_cm2_per_s: float
    intercept_A2: float
    r2: float
    window_fs: tuple[float, float]
    n_lags: int
    confidence: float
    reason: str | None = None


@dataclass
class ChargeDiffusion:
    """Collective (charge) diffusivity of a mobile species and the Haven ratio D*/D_σ (None: ``reason``)."""

    species: str
    D_sigma_cm2_per_s: float | None
    ci_cm2_per_s: tuple[float, float] | None
    rel_se: float | None
    n_blocks: int
    haven_ratio: float | None
    haven_ci: tuple[float, float] | None
    reason: str | None = None


@dataclass
class Conductivity:
    """Nernst–Einstein conductivity of a mobile species from its tracer D, mS/cm (None: ``reason``)."""

    species: str
    charge: float | None
    temperature_K: float | None
    sigma_mS_per_cm: float | None
    ci_mS_per_cm: tuple[float, float] | None
    reason: str | None = None


@dataclass
class TransportResult:
    """Everything :func:`analyse_transport` finds for one run; ``msd``: mean MSD per species on ``t_fs`` (Å², fs,
    at most ~200 lags for plotting)."""

    label: str
    temperature_K: float | None
    n_frames: int
    stride: int
    frame_interval_fs: float
    span_fs: float
    volume_A3: float
    composition: dict[str, int]
    tracer: dict[str, TracerDiffusion]
    conductivity: dict[str, Conductivity] = field(default_factory=dict)
    charge: dict[str, ChargeDiffusion] = field(default_factory=dict)
    t_fs: list[float] = field(default_factory=list)
    msd: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def tracer_diffusion(msd_atoms: np.ndarray, t_fs: np.ndarray, span_fs: float, species: str,
                     settings: TransportSettings) -> TracerDiffusion:
    """D* of one species from its per-atom MSDs [n, L] at lags ``t_fs`` [L] (see the module docstring)."""
    from scipy import stats

    sel, window = _window(t_fs, span_fs, settings)
    n = msd_atoms.shape[0]
    if sel.sum() < 3:
        return TracerDiffusion(species, n, None, None, None, math.nan, math.nan, math.nan, window, int(sel.sum()),
                               settings.confidence, f"fewer than 3 lags in the fit window {window} fs")
    t = t_fs[sel]
    c = _slope_weights(t)
    slopes = msd_atoms[:, sel] @ c  # Å²/fs per atom
    mean = msd_atoms[:, sel].mean(0)
    m = float(slopes.mean())
    b = float(np.average(mean - m * t, weights=1.0 / t))
    resid = mean - (m * t + b)
    ss_tot = float(((mean - mean.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else 0.0
    d = m / 6.0 * A2_PER_FS_IN_CM2_PER_S
    se = ci = None
    if n > 1:
        se = float(slopes.std(ddof=1) / math.sqrt(n)) / 6.0 * A2_PER_FS_IN_CM2_PER_S
        half = float(stats.t.ppf(0.5 + settings.confidence / 2.0, n - 1)) * se
        ci = (d - half, d + half)
    reason = None
    if m <= 0:
        reason = f"MSD slope is not positive ({d:.2e} cm²/s): no diffusion resolved"
    elif r2 < settings.r2_min:
        reason = f"MSD is not linear in the window (R² {r2:.2f} < {settings.r2_min:g})"
    elif n == 1:
        reason = None  # determined, but one atom gives no interval
    return TracerDiffusion(species, n, None if reason else d, None if reason else se, None if reason else ci,
                           d, b, r2, window, int(sel.sum()), settings.confidence, reason)


def charge_diffusion(u: np.ndarray, species: str, tracer: TracerDiffusion, frame_interval_fs: float,
                     settings: TransportSettings) -> ChargeDiffusion:
    """Collective D_σ of the atoms ``u`` [K, n, 3] from ``haven_blocks`` blocks, and the Haven ratio."""
    from scipy import stats

    nb = int(settings.haven_blocks)
    k = u.shape[0] // max(nb, 1)
    if nb < 2 or k < _MIN_BLOCK_FRAMES:
        return ChargeDiffusion(species, None, None, None, nb, None, None,
                               f"run too short: {u.shape[0]} frames make {nb} blocks of {k} < {_MIN_BLOCK_FRAMES}")
    x = u.sum(axis=1)  # [K, 3] collective displacement
    t = np.arange(k) * frame_interval_fs
    sel, _ = _window(t, (k - 1) * frame_interval_fs, settings, fraction_only=True)
    if sel.sum() < 3:
        return ChargeDiffusion(species, None, None, None, nb, None, None, "fewer than 3 lags per block window")
    c = _slope_weights(t[sel])
    slopes = []
    for b in range(nb):
        xb = torch.as_tensor(np.ascontiguousarray(x[b * k:(b + 1) * k].T))
        mscd = msd_fft_rows(xb, k).sum(0).numpy() / u.shape[1]
        slopes.append(float(mscd[sel] @ c))
    d = float(np.mean(slopes)) / 6.0 * A2_PER_FS_IN_CM2_PER_S
    se = float(np.std(slopes, ddof=1) / math.sqrt(nb)) / 6.0 * A2_PER_FS_IN_CM2_PER_S
    half = float(stats.t.ppf(0.5 + settings.confidence / 2.0, nb - 1)) * se
    rel = se / d if d > 0 else math.inf
    if d <= 0 or rel > settings.haven_max_rel_se:
        return ChargeDiffusion(species, None, None, rel if math.isfinite(rel) else None, nb, None, None,
                               f"collective D not resolved: {d:.2e} ± {se:.1e} cm²/s over {nb} blocks "
                               f"(relative SE {rel:.2f} > {settings.haven_max_rel_se:.2f}): run too short")
    ci = (d - half, d + half)
    haven = hci = None
    if tracer.D_cm2_per_s is not None:
        haven = tracer.D_cm2_per_s / d
        rel_h = math.hypot(rel, (tracer.se_cm2_per_s or 0.0) / tracer.D_cm2_per_s)
        z = float(stats.norm.ppf(0.5 + settings.confidence / 2.0))
        hci = (haven * math.exp(-z * rel_h), haven * math.exp(z * rel_h))
    return ChargeDiffusion(species, d, ci, rel, nb, haven, hci,
                           None if haven is not None else "tracer D not determined: no Haven ratio")


def _charges(numbers: np.ndarray, settings: TransportSettings) -> dict[str, float]:
    """Oxidation states by element: ``settings.charges`` over pymatgen's most likely guess."""
    from pymatgen.core import Composition

    comp = Composition({chemical_symbols[z]: int(c) for z, c in zip(*np.unique(numbers, return_counts=True))})
    guess = {}
    try:
        guesses = comp.oxi_state_guesses(max_sites=-50)
        guess = dict(guesses[0]) if guesses else {}
    except Exception:  # noqa: BLE001 - no guess: charges must be given
        guess = {}
    return {**guess, **(settings.charges or {})}


def nernst_einstein(tracer: TracerDiffusion, numbers: np.ndarray, volume_A3: float, temperature_K: float | None,
                    charge: float | None, D: float | None = None,
                    ci: tuple[float, float] | None = None) -> Conductivity:
    """σ (mS/cm) = D · pymatgen-analysis-diffusion's ``get_conversion_factor`` (n z² e² / (V k_B T))."""
    D = tracer.D_cm2_per_s if D is None else D
    ci = tracer.ci_cm2_per_s if ci is None else ci
    sp = tracer.species
    if D is None:
        return Conductivity(sp, charge, temperature_K, None, None, f"tracer D not determined ({tracer.reason})")
    if not temperature_K:
        return Conductivity(sp, charge, temperature_K, None, None, "run temperature unknown")
    if not charge:
        return Conductivity(sp, charge, temperature_K, None, None,
                            f"no charge for {sp}: give charges (pymatgen found no oxidation-state guess)")
    try:
        factor = conversion_factor(numbers, volume_A3, sp, charge, temperature_K)
    except ImportError:
        return Conductivity(sp, charge, temperature_K, None, None, "pymatgen-analysis-diffusion is not installed "
                            "(pip install 'geodite-sim[transport]')")
    return Conductivity(sp, charge, temperature_K, D * factor,
                        None if ci is None else (ci[0] * factor, ci[1] * factor))


def conversion_factor(numbers: np.ndarray, volume_A3: float, species: str, charge: float,
                      temperature_K: float) -> float:
    """mS/cm per cm²/s (pymatgen-analysis-diffusion's ``get_conversion_factor``) of a cubic cell of ``volume_A3``
    holding ``numbers``; only the count of ``species``, its ``charge`` and the volume matter."""
    from pymatgen.analysis.diffusion.analyzer import get_conversion_factor
    from pymatgen.core import Lattice, Species, Structure

    symbols = [chemical_symbols[z] for z in numbers]
    n = len(symbols)
    frac = np.stack([np.arange(n) / n] * 3, axis=1)  # positions do not enter the factor
    s = Structure(Lattice.cubic(volume_A3 ** (1.0 / 3.0)), symbols, frac)
    s.replace_species({species: Species(species, charge)})
    return float(get_conversion_factor(s, Species(species, charge), temperature_K))


def analyse_unwrapped(frames: Unwrapped, settings: TransportSettings | None = None,
                      device: str = "cpu") -> TransportResult:
    """Tracer D of every species, and conductivity, collective D and Haven ratio of the mobile species."""
    settings = settings or TransportSettings()
    u, numbers = frames.positions, frames.numbers
    k = u.shape[0]
    if k < 4:
        raise ValueError(f"{frames.label}: {k} frames after the discarded {settings.discard_fs:g} fs: need >= 4")
    dt = frames.frame_interval_fs
    span = (k - 1) * dt
    n_lags = k
    if settings.fit_window_fs is None:
        n_lags = min(k, int(math.floor(settings.fit_fraction[1] * (k - 1) + 1e-9)) + 1)
    else:
        n_lags = min(k, int(math.floor(settings.fit_window_fs[1] / dt + 1e-9)) + 1)
    t = np.arange(n_lags) * dt
    plot_idx = np.unique(np.linspace(0, n_lags - 1, min(n_lags, 200)).round().astype(int))
    symbols = np.array([chemical_symbols[z] for z in numbers])
    charges = _charges(numbers, settings)
    res = TransportResult(frames.label, frames.temperature_K, k, frames.stride, dt, span, frames.volume_A3,
                          {s: int((symbols == s).sum()) for s in dict.fromkeys(symbols.tolist())}, {},
                          t_fs=t[plot_idx].tolist())
    for sp in res.composition:
        atoms = np.nonzero(symbols == sp)[0]
        per_atom = per_atom_msd(u[:, atoms], n_lags, device)
        res.tracer[sp] = tracer_diffusion(per_atom, t, span, sp, settings)
        res.msd[sp] = per_atom.mean(0)[plot_idx].tolist()
        if sp in settings.mobile:
            res.conductivity[sp] = nernst_einstein(res.tracer[sp], numbers, frames.volume_A3, frames.temperature_K,
                                                   charges.get(sp))
            res.charge[sp] = charge_diffusion(u[:, atoms], sp, res.tracer[sp], dt, settings)
    unknown = sorted(set(settings.mobile) - set(res.composition))
    if unknown:
        raise ValueError(f"{frames.label}: mobile species {unknown} not in the system ({sorted(res.composition)})")
    return res


def analyse_transport(path: str | Path, system: int | None = None, settings: TransportSettings | None = None,
                      device: str = "cpu") -> TransportResult:
    """Stream ``system`` of an HDF5 trajectory written by the engine and analyse its transport."""
    settings = settings or TransportSettings()
    return analyse_unwrapped(unwrap_trajectory(path, system, settings), settings, device)


__all__ = [
    "ChargeDiffusion", "Conductivity", "TracerDiffusion", "TransportResult", "TransportSettings", "Unwrapped",
    "analyse_transport", "analyse_unwrapped", "charge_diffusion", "conversion_factor", "nernst_einstein",
    "per_atom_msd", "tracer_diffusion", "unwrap_arrays", "unwrap_trajectory",
]
