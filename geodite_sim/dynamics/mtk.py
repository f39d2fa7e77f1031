"""MTK NPT, batched: ASE 3.29's ``IsotropicMTKNPT`` (``"npt_mtk_iso"``) and ``MTKNPT`` (``"npt_mtk"``).

One thermostat chain, one barostat chain and one cell momentum per system, and per-system
targets (kT, pressure, tdamp, pdamp), so systems can be swapped in and out of a running batch.
The update order and every expression follow ``ase/md/nose_hoover_chain.py`` (Martyna, Tobias,
Klein 1994; notation of the ASE implementation note arXiv:2603.24061). One step (δ = dt/2)::

    barostat NHC(δ) on the cell momentum      thermostat NHC(δ) on p
    p_cell += δ G(σ, p, V)                    p <- exp-/exprel-propagated kick, δ
    q <- exp-/exprel-propagated drift, dt     cell <- cell propagated, dt
    E, F, σ = force_fn(q, cell)
    p <- kick, δ                              p_cell += δ G(σ, p, V)
    thermostat NHC(δ)                         barostat NHC(δ)

Isotropic (``p_eps`` scalar, ε = ln(V/V0)/3, cell = cell0 e^ε)::

    G = 3 V (P_int - P) + Σ p²/m / N           P_int = -tr(σ - Σ p⊗p/(m V))/3
    q <- q e^x + dt p/m exprel(x),  x = dt p_eps / W
    p <- p e^-y + δ F exprel(-y),   y = (1 + 1/N) δ p_eps / W
    W = (3N + 3) kT pdamp²;  barostat chain R0 = 9 kT pdamp², Rj = kT pdamp², driven by p_eps²/W - kT

Full cell (``p_g`` symmetric 3×3)::

    G = V (-(σ - Σ p⊗p/(m V)) - P I) + Σ p²/m / (3N) I
    q <- q e^X + dt (p/m) φ(X),  h <- h e^X,  X = dt p_g / W
    p <- p e^-Y + δ F φ(-Y),     Y = δ (p_g + tr(p_g)/(3N) I) / W
    W = (N + 1) kT pdamp²;  R0 = 9 kT pdamp², Rj = kT pdamp², driven by Σ p_g²/W - 9 kT

with φ(X) = (e^X - I)/X (``scipy.special.exprel`` for matrices). Thermostat chain (as ASE's
``NoseHooverChainThermostat``): Q0 = 3N kT tdamp², Qj = kT tdamp², driven by Σ p²/m - 3N kT.
Rows of the cell are lattice vectors and q, p are row vectors, so ``q @ e^X`` is ASE's
``(q @ U) e^Λ @ U.T``. σ is the model's stress (ASE sign, eV/Å³), symmetrised as ASE does.

Differences from ASE are in rounding only: ASE diagonalises p_g with ``eigh``; here e^X and
φ(X) come from a degree-16 Taylor series with scaling and squaring (φ(2X) = φ(X)(e^X + I)/2),
which needs no host synchronisation on a GPU (``torch.linalg.eigh`` and ``matrix_exp`` read
back to the host on CUDA); inside an NHC step Σp²/m is carried as ``K2 f²`` instead of being
re-summed. The chain masses are recomputed every step from (kT, tdamp, pdamp, N), exactly as
ASE computes them once at construction.

Systems with 0 atoms, kT = 0 or a zero cell (padding slots) stay finite: every denominator is
replaced by 1 where it vanishes. Units are ASE's: Å, eV, amu, time t = Å·sqrt(amu/eV).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from ase import units

from geodite_sim.core.ops import det3, segment_sum
from geodite_sim.dynamics.nhc_chain import chain_sweeps_fused
from geodite_sim.dynamics.verlet import MDState
from geodite_sim.state import system_field

#: ``force_fn(batch) -> (energy [S] eV, forces [N, 3] eV/Å, stress [S, 3, 3] eV/Å³)``.
ForceStressFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]



def gpa_to_ev_per_a3(pressure_gpa):
    """Pressure in GPa -> eV/Å³ (``ase.units.GPa``); works on floats, arrays and tensors."""
    return pressure_gpa * units.GPa


def ev_per_a3_to_gpa(pressure):
    """Pressure in eV/Å³ -> GPa."""
    return pressure / units.GPa


# ---------------------------------------------------------------------------------------------- state
@dataclass
class MTKState(MDState):
    """Fields shared by both MTK ensembles (S systems, M thermostats, Mb barostat thermostats).

    Attributes:
        pressure: [S] external pressure, eV/Å³.
        tdamp: [S] thermostat time constant, t (ASE time units).
        pdamp: [S] barostat time constant, t.
        eta, p_eta: [S, M] thermostat chain positions and momenta (eV·t).
        xi, p_xi: [S, Mb] barostat chain positions and momenta (eV·t).
    """

    pressure: torch.Tensor = system_field(default=None)
    tdamp: torch.Tensor = system_field(default=None)
    pdamp: torch.Tensor = system_field(default=None)
    eta: torch.Tensor = system_field(default=None)
    p_eta: torch.Tensor = system_field(default=None)
    xi: torch.Tensor = system_field(default=None)
    p_xi: torch.Tensor = system_field(default=None)


@dataclass
class MTKIsoState(MTKState):
    """``IsotropicMTKNPT`` state: cell = cell0 · e^eps.

    Attributes:
        eps: [S] log volume strain ε = ln(V/V0)/3.
        p_eps: [S] its momentum, eV·t.
        cell0: [S, 3, 3] cell at initialisation (rows), Å.
        volume0: [S] |det cell0|, Å³.
    """

    eps: torch.Tensor = system_field(default=None)
    p_eps: torch.Tensor = system_field(default=None)
    cell0: torch.Tensor = system_field(default=None)
    volume0: torch.Tensor = system_field(default=None)


@dataclass
class MTKFullState(MTKState):
    """``MTKNPT`` state: the cell is ``batch.cell``.

    Attributes:
        p_g: [S, 3, 3] cell momentum (symmetric), eV·t.
    """

    p_g: torch.Tensor = system_field(default=None)


# ---------------------------------------------------------------------------------------------- helpers
def safe_denominator(x: torch.Tensor) -> torch.Tensor:
    """x where x > 0, else 1 (denominators of empty / padding systems)."""
    return torch.where(x > 0, x, torch.ones_like(x))


def exprel(x: torch.Tensor) -> torch.Tensor:
    """(e^x - 1)/x elementwise, 1 at |x| < 1e-16 (``scipy.special.exprel``)."""
    small = x.abs() < 1e-16
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, torch.ones_like(x), torch.expm1(xs) / xs)


def expm_phi(x: torch.Tensor, order: int = 16, theta: float = 0.5,
             max_squarings: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """(e^X, φ(X) = (e^X - I)/X) for a batch of matrices X [S, 3, 3], without host reads.

    Taylor series of degree ``order`` on X / 2^s with s = ceil(log2(|X|_inf / theta)) per matrix,
    then s squarings e^{2Y} = (e^Y)², φ(2Y) = φ(Y)(e^Y + I)/2 (static loop of ``max_squarings``,
    masked per matrix). Relative truncation error < theta^(order+1)/(order+1)! ≈ 2e-20.
    """
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand_as(x)
    norm = x.abs().sum(-1).amax(-1)
    s = torch.ceil(torch.log2(norm.clamp_min(1e-300) / theta)).clamp(0, max_squarings)
    y = x / torch.exp2(s)[:, None, None]
    phi = eye
    for k in range(order, 0, -1):
        phi = eye + (y @ phi) / (k + 1)
    e = eye + y @ phi
    for i in range(max_squarings):
        do = (s > i)[:, None, None]
        phi = torch.where(do, phi @ (e + eye) * 0.5, phi)
        e = torch.where(do, e @ e, e)
    return e, phi


def per_system_param(value, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float, a sequence of S floats or an [S] tensor -> [S] tensor like ``like``."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0]).clone()
    if t.shape != like.shape[:1]:
        raise ValueError(f"{name} must be a number or one value per system ({like.shape[0]}), got shape "
                         f"{tuple(t.shape)}")
    return t


class AtomView:
    """Per-atom bookkeeping that needs no host read: real-atom mask, system index, safe masses."""

    def __init__(self, state: MDState):
        b = state.batch
        n_rows = b.positions.shape[0]
        self.S = b.n_systems
        self.mask = torch.arange(n_rows, device=b.device) < b.offsets[-1]
        self.sys = b.system_index
        self.m = torch.where(self.mask, b.masses, torch.ones_like(b.masses))[:, None]
        self.n = b.atoms_per_system.to(b.dtype)
        self.n_safe = safe_denominator(self.n)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """[S, ...] sum over each system's real atoms of ``values`` [N, ...]."""
        mask = self.mask.reshape((-1,) + (1,) * (values.ndim - 1))
        return segment_sum(torch.where(mask, values, torch.zeros_like(values)), self.sys, self.S)

    def keep(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """``new`` on real atoms, ``old`` on padding rows."""
        return torch.where(self.mask[:, None], new, old)


def nhc_chain(k2: torch.Tensor, dof_kT: torch.Tensor, kT: torch.Tensor, Q: torch.Tensor, p_eta: torch.Tensor,
              eta: torch.Tensor, delta: float, loops: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """exp(iL_NHC δ) of ASE's thermostat and barostat chains, for all systems at once.

    Args:
        k2: [S] the driven kinetic term (Σp²/m, p_eps²/W or Σp_g²/W), eV.
        dof_kT: [S] its target (3N kT, kT or 9 kT), eV.
        kT: [S] eV.  Q: [S, M] chain masses (eV·t²).  p_eta, eta: [S, M] chain momenta and positions.
        delta: time step δ (t); ``loops`` sub-steps, each a 4th-order Suzuki–Yoshida sweep.

    Returns:
        (p_eta [S, M], eta [S, M], scale [S]): the driven momenta are to be multiplied by ``scale``.
    """
    # the same recursion as NoseHooverChainNVT's (one operator, geodite_sim::nhc_chain); Q = 0 (empty slots) -> 1
    return chain_sweeps_fused(k2, dof_kT, kT, safe_denominator(Q), p_eta, eta, delta, loops)


def _chain_masses(dof0: torch.Tensor, kT: torch.Tensor, tau: torch.Tensor, length: int) -> torch.Tensor:
    """[S, M] masses: first dof0·kT·tau², the rest kT·tau² (ASE's expressions)."""
    rest = (kT * tau**2)[:, None].expand(-1, length - 1)
    return torch.cat([(dof0 * kT * tau**2)[:, None], rest], 1)


def thermostat_masses(state: MTKState) -> torch.Tensor:
    """[S, M] Q0 = 3N kT tdamp², Qj = kT tdamp²."""
    n = state.batch.atoms_per_system.to(state.kT.dtype)
    return _chain_masses(3 * n, state.kT, state.tdamp, state.eta.shape[1])


def barostat_masses(state: MTKState) -> torch.Tensor:
    """[S, Mb] R0 = 9 kT pdamp², Rj = kT pdamp² (both ASE barostats)."""
    return _chain_masses(torch.full_like(state.kT, 9.0), state.kT, state.pdamp, state.xi.shape[1])


def cell_mass(state: MTKState) -> torch.Tensor:
    """[S] W: (3N + 3) kT pdamp² (isotropic) or (N + 1) kT pdamp² (full cell)."""
    n = state.batch.atoms_per_system.to(state.kT.dtype)
    dof = 3 * n + 3 if isinstance(state, MTKIsoState) else n + 1
    return dof * state.kT * state.pdamp**2


def _kinetic(at: AtomView, p: torch.Tensor) -> torch.Tensor:
    """[S] Σ p²/m."""
    return at.sum((p**2 / at.m).sum(-1))


def _ideal_gas_stress(at: AtomView, stress: torch.Tensor, p: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
    """[S, 3, 3] ASE's ``get_stress(include_ideal_gas=True, voigt=False)``: sym(σ) - Σ p⊗p/m / V."""
    sym = 0.5 * (stress + stress.transpose(1, 2))
    kin = at.sum(p[:, :, None] * p[:, None, :] / at.m[:, :, None])
    return sym - kin / safe_denominator(volume)[:, None, None]


def _thermostat(state: MTKState, at: AtomView, p: torch.Tensor, eta, p_eta, delta: float, tloop: int):
    n3kT = 3 * at.n * state.kT
    p_eta, eta, f = nhc_chain(_kinetic(at, p), n3kT, state.kT, thermostat_masses(state), p_eta, eta, delta, tloop)
    return p * f[at.sys][:, None], eta, p_eta


# ---------------------------------------------------------------------------------------------- init
def _base_fields(state: MDState) -> dict:
    return {f.name: getattr(state, f.name) for f in fields(MDState)}


def _check_init(state: MDState, chain_length: int, barostat_chain_length: int) -> None:
    if state.stress is None or state.forces is None or state.energy is None:
        raise ValueError("MTK NPT needs energy, forces and stress at the initial positions (compute_stress=True)")
    if chain_length < 1 or barostat_chain_length < 1:
        raise ValueError("chain_length and barostat_chain_length must be at least 1")


def _common(state: MDState, pressure, tdamp, pdamp, chain_length: int, barostat_chain_length: int) -> dict:
    kT = state.kT
    S = kT.shape[0]
    return dict(
        pressure=per_system_param(pressure, kT, "pressure"),
        tdamp=per_system_param(tdamp, kT, "tdamp"),
        pdamp=per_system_param(pdamp, kT, "pdamp"),
        eta=kT.new_zeros(S, chain_length), p_eta=kT.new_zeros(S, chain_length),
        xi=kT.new_zeros(S, barostat_chain_length), p_xi=kT.new_zeros(S, barostat_chain_length),
    )


def mtk_iso_init(state: MDState, *, pressure, tdamp, pdamp, chain_length: int = 3,
                 barostat_chain_length: int = 3) -> MTKIsoState:
    """``IsotropicMTKNPT`` state from an MD state holding energy, forces and stress at its positions.

    Args:
        pressure: eV/Å³ (use :func:`gpa_to_ev_per_a3`), one value or [S].
        tdamp, pdamp: t (ASE time units), one value or [S]; ASE suggests 100·dt and 1000·dt.
        chain_length, barostat_chain_length: ASE's ``tchain`` and ``pchain`` (default 3, 3).
    """
    _check_init(state, chain_length, barostat_chain_length)
    cell0 = state.batch.cell.clone()
    new = MTKIsoState(**_base_fields(state),
                      **_common(state, pressure, tdamp, pdamp, chain_length, barostat_chain_length),
                      eps=state.kT.new_zeros(state.kT.shape), p_eps=state.kT.new_zeros(state.kT.shape),
                      cell0=cell0, volume0=det3(cell0).abs())
    if new.conserved0 is None:
        new.conserved0 = mtk_iso_conserved(new)
    return new


def mtk_init(state: MDState, *, pressure, tdamp, pdamp, chain_length: int = 3,
             barostat_chain_length: int = 3) -> MTKFullState:
    """``MTKNPT`` (full cell) state; arguments as :func:`mtk_iso_init`."""
    _check_init(state, chain_length, barostat_chain_length)
    S = state.kT.shape[0]
    new = MTKFullState(**_base_fields(state),
                       **_common(state, pressure, tdamp, pdamp, chain_length, barostat_chain_length),
                       p_g=state.kT.new_zeros(S, 3, 3))
    if new.conserved0 is None:
        new.conserved0 = mtk_conserved(new)
    return new


# ---------------------------------------------------------------------------------------------- isotropic step
def _iso_G(state: MTKIsoState, at: AtomView, stress, p, eps, cell) -> torch.Tensor:
    """[S] 3 V (P_int - P) + Σp²/m / N with ASE's two volumes (V0 e^{3ε}, and |det cell| in the ideal gas)."""
    total = _ideal_gas_stress(at, stress, p, det3(cell).abs())
    p_int = -total.diagonal(dim1=1, dim2=2).sum(-1) / 3
    volume = state.volume0 * torch.exp(3 * eps)
    return 3 * volume * (p_int - state.pressure) + _kinetic(at, p) / at.n_safe


def mtk_iso_step(state: MTKIsoState, force_fn: ForceStressFn, dt: float, tloop: int = 1,
                 ploop: int = 1) -> MTKIsoState:
    """One ``IsotropicMTKNPT.step`` of every system (``dt`` in ASE time units). Pure: returns a new state."""
    at = AtomView(state)
    dt2 = dt / 2
    kT = state.kT
    W = safe_denominator(cell_mass(state))
    R = barostat_masses(state)
    sys = at.sys

    def baro(p_eps, xi, p_xi):
        p_xi, xi, f = nhc_chain(p_eps**2 / W, kT, kT, R, p_xi, xi, dt2, ploop)
        return p_eps * f, xi, p_xi

    def kick(p, forces, p_eps):
        x = ((1 + 1 / at.n_safe) * p_eps * dt2 / W)[sys][:, None]
        return at.keep(p * torch.exp(-x) + dt2 * forces * exprel(-x), p)

    p_eps, xi, p_xi = baro(state.p_eps, state.xi, state.p_xi)
    p, eta, p_eta = _thermostat(state, at, state.momenta, state.eta, state.p_eta, dt2, tloop)
    eps = state.eps
    p_eps = p_eps + dt2 * _iso_G(state, at, state.stress, p, eps, state.batch.cell)
    p = kick(p, state.forces, p_eps)
    x = (dt * p_eps / W)[sys][:, None]
    q = at.keep(state.batch.positions * torch.exp(x) + p * dt / at.m * exprel(x), state.batch.positions)
    eps = eps + dt * p_eps / W
    cell = state.cell0 * torch.exp(eps)[:, None, None]
    batch = state.batch.with_positions(q, cell)
    energy, forces, stress = force_fn(batch)
    p = kick(p, forces, p_eps)
    p_eps = p_eps + dt2 * _iso_G(state, at, stress, p, eps, cell)
    p, eta, p_eta = _thermostat(state, at, p, eta, p_eta, dt2, tloop)
    p_eps, xi, p_xi = baro(p_eps, xi, p_xi)
    return replace(state, batch=batch, energy=energy, forces=forces, stress=stress, momenta=p, eta=eta,
                   p_eta=p_eta, xi=xi, p_xi=p_xi, eps=eps, p_eps=p_eps, step=state.step + 1)


# ---------------------------------------------------------------------------------------------- full-cell step
def _full_G(state: MTKFullState, at: AtomView, stress, p, cell) -> torch.Tensor:
    """[S, 3, 3] V (-σ_total - P I) + Σp²/m / (3N) I."""
    volume = det3(cell).abs()
    total = _ideal_gas_stress(at, stress, p, volume)
    eye = torch.eye(3, dtype=cell.dtype, device=cell.device)
    kin = _kinetic(at, p) / (3 * at.n_safe)
    pv = volume[:, None, None] * (-total - state.pressure[:, None, None] * eye)
    return pv + kin[:, None, None] * eye


def _row_apply(v: torch.Tensor, mats: torch.Tensor, sys: torch.Tensor) -> torch.Tensor:
    """[N, 3] row vectors v_i @ mats[sys_i]."""
    return torch.einsum("ni,nij->nj", v, mats[sys])


def mtk_step(state: MTKFullState, force_fn: ForceStressFn, dt: float, tloop: int = 1,
             ploop: int = 1) -> MTKFullState:
    """One ``MTKNPT.step`` (full cell) of every system (``dt`` in ASE time units). Pure: returns a new state."""
    at = AtomView(state)
    dt2 = dt / 2
    kT = state.kT
    W = safe_denominator(cell_mass(state))
    Wm = W[:, None, None]
    R = barostat_masses(state)
    sys = at.sys
    eye = torch.eye(3, dtype=kT.dtype, device=kT.device)

    def baro(p_g, xi, p_xi):
        k2 = (p_g**2).sum((1, 2)) / W
        p_xi, xi, f = nhc_chain(k2, 9 * kT, kT, R, p_xi, xi, dt2, ploop)
        return p_g * f[:, None, None], xi, p_xi

    def kick(p, forces, e, phi):
        return at.keep(_row_apply(p, e, sys) + dt2 * _row_apply(forces, phi, sys), p)

    p_g, xi, p_xi = baro(state.p_g, state.xi, state.p_xi)
    p, eta, p_eta = _thermostat(state, at, state.momenta, state.eta, state.p_eta, dt2, tloop)
    p_g = p_g + dt2 * _full_G(state, at, state.stress, p, state.batch.cell)
    # p_g is the same for both kicks of the step: one e^{-Y}, φ(-Y) serves both
    tr = p_g.diagonal(dim1=1, dim2=2).sum(-1) / (3 * at.n_safe)
    e_p, phi_p = expm_phi(-(p_g + tr[:, None, None] * eye) * dt2 / Wm)
    p = kick(p, state.forces, e_p, phi_p)
    e, phi = expm_phi(p_g * dt / Wm)
    q0 = state.batch.positions
    q = at.keep(_row_apply(q0, e, sys) + dt * _row_apply(p / at.m, phi, sys), q0)
    cell = state.batch.cell @ e
    batch = state.batch.with_positions(q, cell)
    energy, forces, stress = force_fn(batch)
    p = kick(p, forces, e_p, phi_p)
    p_g = p_g + dt2 * _full_G(state, at, stress, p, cell)
    p, eta, p_eta = _thermostat(state, at, p, eta, p_eta, dt2, tloop)
    p_g, xi, p_xi = baro(p_g, xi, p_xi)
    return replace(state, batch=batch, energy=energy, forces=forces, stress=stress, momenta=p, eta=eta,
                   p_eta=p_eta, xi=xi, p_xi=p_xi, p_g=p_g, step=state.step + 1)


# ---------------------------------------------------------------------------------------------- observables
def kinetic_energy(state: MDState) -> torch.Tensor:
    """[S] Σ p²/2m (no host read; padding rows ignored)."""
    at = AtomView(state)
    return 0.5 * _kinetic(at, state.momenta)


def thermostat_energy(state: MTKState) -> torch.Tensor:
    """[S] 3N kT η0 + kT Σ_{j≥1} ηj + Σ p_ηj²/(2Qj) (ASE's ``get_thermostat_energy``)."""
    n = state.batch.atoms_per_system.to(state.kT.dtype)
    Q = safe_denominator(thermostat_masses(state))
    return (3 * n * state.kT * state.eta[:, 0] + state.kT * state.eta[:, 1:].sum(1)
            + (0.5 * state.p_eta**2 / Q).sum(1))


def barostat_energy(state: MTKState) -> torch.Tensor:
    """[S] ASE's ``get_barostat_energy``: Σ p_ξ²/2R + kT Σ ξ (isotropic) or + 9 kT ξ0 + kT Σ_{j≥1} ξj (full)."""
    R = safe_denominator(barostat_masses(state))
    kin = (0.5 * state.p_xi**2 / R).sum(1)
    if isinstance(state, MTKIsoState):
        return kin + state.kT * state.xi.sum(1)
    return kin + 9 * state.kT * state.xi[:, 0] + state.kT * state.xi[:, 1:].sum(1)


def volume(state: MDState) -> torch.Tensor:
    """[S] |det cell|, Å³."""
    return det3(state.batch.cell).abs()


def instantaneous_pressure(state: MDState) -> torch.Tensor:
    """[S] -tr(σ - Σ p⊗p/(m V))/3, eV/Å³: the virial plus ideal-gas pressure the barostat drives to its target."""
    at = AtomView(state)
    total = _ideal_gas_stress(at, state.stress, state.momenta, volume(state))
    return -total.diagonal(dim1=1, dim2=2).sum(-1) / 3


def mtk_iso_conserved(state: MTKIsoState) -> torch.Tensor:
    """[S] ASE's ``IsotropicMTKNPT.get_conserved_energy``, eV."""
    W = safe_denominator(cell_mass(state))
    return (state.energy + kinetic_energy(state) + thermostat_energy(state) + barostat_energy(state)
            + state.p_eps * state.p_eps / (2 * W) + state.pressure * state.volume0 * torch.exp(3 * state.eps))


def mtk_conserved(state: MTKFullState) -> torch.Tensor:
    """[S] ASE's ``MTKNPT.get_conserved_energy``, eV."""
    W = safe_denominator(cell_mass(state))
    return (state.energy + kinetic_energy(state) + thermostat_energy(state) + barostat_energy(state)
            + (state.p_g**2).sum((1, 2)) / (2 * W) + state.pressure * volume(state))


def conserved(state: MTKState) -> torch.Tensor:
    """[S] conserved energy of either MTK state, eV."""
    return mtk_iso_conserved(state) if isinstance(state, MTKIsoState) else mtk_conserved(state)  # type: ignore[arg-type]


__all__: Sequence[str] = (
    "MTKState", "MTKIsoState", "MTKFullState", "mtk_iso_init", "mtk_iso_step", "mtk_init", "mtk_step",
    "mtk_iso_conserved", "mtk_conserved", "conserved", "gpa_to_ev_per_a3", "ev_per_a3_to_gpa", "expm_phi",
    "exprel", "nhc_chain", "instantaneous_pressure", "volume",
)
