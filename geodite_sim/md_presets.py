"""Named MD protocol presets (ensemble, time step, thermostat/barostat chains and damping).

A preset fixes the integrator settings of a published protocol; temperatures, structures and run
lengths stay the caller's. ``get_preset(name).run_md_kwargs()`` gives keyword arguments in
``run_md``'s units (fs, GPa). Sources:

* ``sse_nvt``: the Geodite paper's solid-state-electrolyte MD (Fig. 4, SI Table S5;
  ``protocols.md`` §5): ASE ``NoseHooverChainNVT``, 10 thermostats, tdamp = 100 × dt, dt = 1.5 fs,
  700,000 steps (1.05 ns).
* ``sse_npt``: an NPT equilibration to run before ``sse_nvt`` when the density at temperature is
  wanted (the paper ran NVT at the relaxed cell): the same thermostat, plus ASE's ``MTKNPT`` full-cell
  barostat at 1 atm (SSE crystals expand anisotropically). The barostat constants are ours:
  pdamp = 1000 × dt and 3 barostat thermostats (the typical value in ASE's ``MTKNPT`` docstring and
  its default ``pchain``).
* ``ms25_npt`` / ``ms25_npt_iso``: MS25-style Nosé–Hoover-chain NPT at 1 atm (MS25, J. Chem. Inf. Model.
  2025: its high-entropy-alloy data were made with an NHC NPT at 1 atm). MS25's own thermostat and
  barostat constants are not reproduced here; the settings follow the guidance documented with
  the integrators: tdamp = 100 × dt and pdamp = 1000 × dt (ASE ``IsotropicMTKNPT``/``MTKNPT``
  docstrings; LAMMPS ``fix nh`` recommends the same 100 and 1000 time steps), chains of 3 thermostats
  and 3 barostat thermostats (ASE's ``tchain``/``pchain`` defaults, also LAMMPS' ``tchain``/``pchain``),
  dt = 1 fs (safe for the oxides in MS25; metals alone tolerate 2 fs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: 1 atm in GPa.
ATM_GPA = 101325e-9


@dataclass(frozen=True)
class MDPreset:
    """MD integrator settings of a named protocol.

    Attributes:
        name: preset name.
        ensemble: ``run_md`` ensemble (``"nvt_nhc"``, ``"npt_mtk"``, ``"npt_mtk_iso"``, ...).
        timestep_fs: time step, fs.
        tdamp_steps: thermostat damping time in time steps (tdamp = tdamp_steps × timestep).
        chain_length: thermostats per chain (ASE ``tchain``).
        tloop: thermostat sub-steps (ASE ``tloop``).
        pressure_gpa: external pressure, GPa (NPT only).
        pdamp_steps: barostat damping time in time steps (NPT only).
        barostat_chain_length: barostat thermostats (ASE ``pchain``; NPT only).
        ploop: barostat sub-steps (ASE ``ploop``; NPT only).
        steps: the protocol's run length, or None when it has none.
        source: where the settings come from.
    """

    name: str
    ensemble: str
    timestep_fs: float
    tdamp_steps: float
    chain_length: int
    tloop: int = 1
    pressure_gpa: float | None = None
    pdamp_steps: float | None = None
    barostat_chain_length: int | None = None
    ploop: int | None = None
    steps: int | None = None
    source: str = ""

    @property
    def tdamp_fs(self) -> float:
        return self.tdamp_steps * self.timestep_fs

    @property
    def pdamp_fs(self) -> float | None:
        return None if self.pdamp_steps is None else self.pdamp_steps * self.timestep_fs

    @property
    def is_npt(self) -> bool:
        return self.pressure_gpa is not None

    def run_md_kwargs(self) -> dict:
        """Keyword arguments for ``run_md`` (fs, GPa); ``steps`` only when the protocol fixes it."""
        kw = dict(ensemble=self.ensemble, timestep=self.timestep_fs, tdamp=self.tdamp_fs,
                  chain_length=self.chain_length, tloop=self.tloop)
        if self.is_npt:
            kw.update(pressure=self.pressure_gpa, pdamp=self.pdamp_fs,
                      barostat_chain_length=self.barostat_chain_length, ploop=self.ploop)
        if self.steps is not None:
            kw["steps"] = self.steps
        return kw

    def as_dict(self) -> dict:
        return asdict(self)


_NPT_GUIDANCE = ("tdamp 100·dt, pdamp 1000·dt (ASE IsotropicMTKNPT/MTKNPT docstrings; LAMMPS fix nh); "
                 "tchain = pchain = 3 (ASE and LAMMPS defaults)")

PRESETS: dict[str, MDPreset] = {
    p.name: p
    for p in (
        MDPreset("sse_nvt", "nvt_nhc", timestep_fs=1.5, tdamp_steps=100, chain_length=10, steps=700_000,
                 source="Geodite paper, SSE MD (Fig. 4, SI Table S5); protocols.md §5"),
        MDPreset("sse_npt", "npt_mtk", timestep_fs=1.5, tdamp_steps=100, chain_length=10, pressure_gpa=ATM_GPA,
                 pdamp_steps=1000, barostat_chain_length=3, ploop=1,
                 source="sse_nvt's thermostat + MTK full-cell barostat at 1 atm; " + _NPT_GUIDANCE),
        MDPreset("ms25_npt", "npt_mtk", timestep_fs=1.0, tdamp_steps=100, chain_length=3, pressure_gpa=ATM_GPA,
                 pdamp_steps=1000, barostat_chain_length=3, ploop=1,
                 source="MS25 (J. Chem. Inf. Model. 2025) NHC NPT at 1 atm, full cell; " + _NPT_GUIDANCE),
        MDPreset("ms25_npt_iso", "npt_mtk_iso", timestep_fs=1.0, tdamp_steps=100, chain_length=3,
                 pressure_gpa=ATM_GPA, pdamp_steps=1000, barostat_chain_length=3, ploop=1,
                 source="MS25 (J. Chem. Inf. Model. 2025) NHC NPT at 1 atm, isotropic (cubic alloys); "
                        + _NPT_GUIDANCE),
    )
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> MDPreset:
    """The preset called ``name``; raises ValueError naming the available presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown MD preset {name!r}; available presets: {', '.join(preset_names())}") from None
