"""Arrhenius fit of tracer diffusivities across temperatures and extrapolation with intervals.

D(T) = D0 exp(−Ea / (k_B T)) is fitted as ln D = ln D0 − Ea / (k_B T) by weighted least squares
(``scipy.optimize.curve_fit``) with the per-run standard errors σ_lnD = σ_D / D taken as known
(``absolute_sigma=True``), so the covariance of (ln D0, Ea) comes from the runs' own intervals. With
equal errors the estimate is pymatgen-analysis-diffusion's ``fit_arrhenius`` (tested). Goodness of fit:
χ² with n − 2 degrees of freedom; when its p-value is below ``p_poor`` the fit is flagged poor and the
covariance is scaled by χ²/dof (Birge ratio). Fewer than 3 temperatures are flagged (no test of the
Arrhenius form is possible; 2 give Ea from the runs' errors only; fewer give nothing). D and its interval
at any temperature (default 300 K) follow from the covariance (delta method in ln D).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

#: Boltzmann constant, eV/K (exact SI value, k / e).
K_B_EV = 1.380649e-23 / 1.602176634e-19


@dataclass
class ArrheniusFit:
    """Ea (eV) ± se with its interval, prefactor D0 (cm²/s), cov of (ln D0, Ea), χ² and flags.

    ``Ea_eV`` is None when fewer than two temperatures have a determined D (``flags`` say why).
    """

    temperatures_K: list[float]
    D_cm2_per_s: list[float]
    se_cm2_per_s: list[float]
    Ea_eV: float | None = None
    Ea_se_eV: float | None = None
    Ea_ci_eV: tuple[float, float] | None = None
    D0_cm2_per_s: float | None = None
    D0_ci_cm2_per_s: tuple[float, float] | None = None
    cov: list[list[float]] | None = None
    chi2: float | None = None
    dof: int = 0
    p_value: float | None = None
    confidence: float = 0.95
    flags: list[str] = field(default_factory=list)

    def D_at(self, temperature_K: float) -> tuple[float, tuple[float, float]] | None:
        """D (cm²/s) at ``temperature_K`` and its interval, or None without a fit."""
        if self.Ea_eV is None or self.D0_cm2_per_s is None:
            return None
        from scipy import stats

        jac = np.array([1.0, -1.0 / (K_B_EV * temperature_K)])
        ln_d = math.log(self.D0_cm2_per_s) - self.Ea_eV / (K_B_EV * temperature_K)
        se = math.sqrt(float(jac @ np.asarray(self.cov) @ jac))
        z = float(stats.norm.ppf(0.5 + self.confidence / 2.0))
        return math.exp(ln_d), (math.exp(ln_d - z * se), math.exp(ln_d + z * se))

    def to_dict(self) -> dict:
        return asdict(self)


def fit_arrhenius(temperatures_K, D_cm2_per_s, se_cm2_per_s, confidence: float = 0.95,
                  p_poor: float = 0.01) -> ArrheniusFit:
    """Weighted Arrhenius fit of determined diffusivities (D > 0, se > 0) at ≥ 2 temperatures."""
    from scipy import stats
    from scipy.optimize import curve_fit

    t = np.asarray(temperatures_K, dtype=float)
    d = np.asarray(D_cm2_per_s, dtype=float)
    se = np.asarray(se_cm2_per_s, dtype=float)
    fit = ArrheniusFit(t.tolist(), d.tolist(), se.tolist(), confidence=confidence)
    if len(t) < 2:
        fit.flags.append(f"too few temperatures: {len(t)} with a determined D (need >= 2, >= 3 to test the fit)")
        return fit
    if len(np.unique(t)) < 2:
        fit.flags.append("all determined D are at one temperature")
        return fit
    y, sy = np.log(d), se / d
    x = 1.0 / (K_B_EV * t)

    def line(x, ln_d0, ea):
        return ln_d0 - ea * x

    p0 = np.polyfit(x, y, 1)[::-1] * np.array([1.0, -1.0])
    popt, pcov = curve_fit(line, x, y, p0=p0, sigma=sy, absolute_sigma=True)
    fit.dof = len(t) - 2
    fit.chi2 = float((((y - line(x, *popt)) / sy) ** 2).sum())
    if fit.dof == 0:
        fit.flags.append("too few temperatures: 2 (the Arrhenius form is not tested; Ea interval from the "
                         "runs' errors only)")
    else:
        fit.p_value = float(stats.chi2.sf(fit.chi2, fit.dof))
        if fit.p_value < p_poor:
            pcov = pcov * (fit.chi2 / fit.dof)
            fit.flags.append(f"poor fit: χ²/dof = {fit.chi2 / fit.dof:.2f} (p = {fit.p_value:.1e}); "
                             "covariance scaled by χ²/dof")
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    fit.Ea_eV = float(popt[1])
    fit.Ea_se_eV = float(math.sqrt(pcov[1, 1]))
    fit.Ea_ci_eV = (fit.Ea_eV - z * fit.Ea_se_eV, fit.Ea_eV + z * fit.Ea_se_eV)
    fit.D0_cm2_per_s = float(math.exp(popt[0]))
    s0 = math.sqrt(pcov[0, 0])
    fit.D0_ci_cm2_per_s = (math.exp(popt[0] - z * s0), math.exp(popt[0] + z * s0))
    fit.cov = pcov.tolist()
    return fit
