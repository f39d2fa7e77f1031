"""The Geodite potential on a batch: energies, forces and stress from one autograd pass.

``Geodite.forward(batch)`` builds (or takes) the neighbour list, evaluates the
encoder and energy head on every system at once, and differentiates the total
energy with respect to positions and a symmetric strain (MACE-style), giving
forces = -dE/dr and stress = (1/V) dE/d(strain) (ASE sign) for fully periodic systems.
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from geodite_sim.batch import Batch
from geodite_sim.core.graph import Edges
from geodite_sim.core.ops import cell_volumes, segment_sum
from geodite_sim.model.config import GeoditeConfig
from geodite_sim.model.decoder import EnergyHead
from geodite_sim.model.edge_ops import fused_available
from geodite_sim.model.encoder import GeoditeEncoder
from geodite_sim.model.radial import spherical_harmonics_l12
from geodite_sim.model.strain import energy_and_derivatives
from geodite_sim.neighbors import neighbor_list

__all__ = ["Edges", "Geodite", "check_batch"]  # Edges: re-exported from geodite_sim.core.graph


class Geodite(nn.Module):
    """Geodite interatomic potential (encoder + energy head), batched over systems.

    Satisfies the model contract (``geodite_sim.model.contract``): conservative energy, forces and
    stress from the given edges (so padded batches work), ``supported_elements`` from the checkpoint
    (None for a freshly built model).
    """

    implemented_properties = ("energy", "forces", "stress")
    conservative = True
    uses_edges = True

    #: set by load_checkpoint / load_model (absent on a freshly built model)
    name: str
    source: str
    decoder: EnergyHead
    encoder: GeoditeEncoder

    def __init__(self, config: GeoditeConfig | None = None, supported_elements: frozenset[int] | None = None):
        super().__init__()
        self.config = config or GeoditeConfig()
        self.encoder = GeoditeEncoder(self.config)
        self.decoder = EnergyHead(self.config.hidden_channels, self.config.num_layers)
        self._elements_cache: tuple | None = None
        self.supported_elements = supported_elements
        #: Model card (dict: teacher, energy convention, data hash, metrics) from the checkpoint, or None.
        self.card: dict | None = None
        self._vacuum_cache: tuple | None = None

    @property
    def supported_elements(self) -> frozenset[int] | None:
        """Atomic numbers the model knows: the declared set (the checkpoint's training elements) if any, else
        its element table, the elements with a non-zero reference energy E0 (None when E0 is all zero)."""
        if self._declared_elements is not None:
            return self._declared_elements
        e0 = self.decoder.e0
        key = (e0._version, e0.data_ptr(), e0.device)
        if self._elements_cache is None or self._elements_cache[0] != key:
            values = e0.detach().cpu().double().tolist()
            found = frozenset(z for z, v in enumerate(values) if v != 0.0 and 0 < z < self.config.max_z)
            self._elements_cache = (key, found or None)
        return self._elements_cache[1]

    @supported_elements.setter
    def supported_elements(self, elements) -> None:
        self._declared_elements = None if elements is None else frozenset(int(z) for z in elements)

    def identity_config(self) -> dict:
        """The non-tensor settings that define the model's function (enters ``model_fingerprint``)."""
        head = self.decoder
        return {"config": asdict(self.config), "e_scale": float(head.e_scale), "e_shift": float(head.e_shift),
                "fidelity": str(getattr(head, "fidelity", ""))}

    @property
    def cutoff(self) -> float:
        return self.config.cutoff

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.A_na.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.A_na.weight.device

    def n_parameters(self) -> int:
        """Number of distinct trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ vacuum features
    def _compute_vacuum(self, z: torch.Tensor) -> torch.Tensor:
        """Features of isolated atoms of species ``z`` [U]: [U, L, C] (no edges, same code path)."""
        empty = torch.zeros(0, dtype=torch.long, device=z.device)
        phi = self.encoder.A_na.weight.new_zeros(0, self.config.n_rbf)
        Y = self.encoder.A_na.weight.new_zeros(0, 8)
        return torch.stack(self.encoder(z, phi, Y, empty, empty), dim=1)

    def vacuum_features(self, z: torch.Tensor) -> torch.Tensor:
        """Isolated-atom features h_vac^(k)(Z) for atoms ``z`` [N] -> [N, L, C].

        In inference (no parameter requires grad) the table over all supported
        elements is computed once and cached, keyed on the weights' versions,
        device and dtype; in training it is computed live so gradients flow.
        """
        if any(p.requires_grad for p in self._param_list()) and torch.is_grad_enabled():
            uz, inv = torch.unique(z, sorted=True, return_inverse=True)
            return self._compute_vacuum(uz)[inv]
        if torch.compiler.is_compiling() and self._vacuum_cache is not None:
            return self._vacuum_cache[1][z]  # inside a compiled step: the table of the eager warm-up call
        key = (self.device, self.dtype, tuple(p._version for p in self._param_list()), id(self))
        if self._vacuum_cache is None or self._vacuum_cache[0] != key:
            with torch.no_grad():
                table = self._compute_vacuum(torch.arange(self.config.max_z, device=self.device))
            self._vacuum_cache = (key, table)
        return self._vacuum_cache[1][z]

    def _param_list(self) -> list[torch.Tensor]:
        """The parameters as a list, kept between calls (walking the module tree costs ~2 ms per step)."""
        if getattr(self, "_params_cached", None) is None:
            self._params_cached = list(self.parameters())
        return self._params_cached

    def _apply(self, fn, recurse=True):  # .to()/.double() invalidate the caches
        self._vacuum_cache = None
        self._params_cached = None
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args, **kwargs):
        self._params_cached = None
        return super().load_state_dict(*args, **kwargs)

    # ------------------------------------------------------------------ energy
    def use_fused(self, create_graph: bool = False, fused: bool | None = None) -> bool:
        """Whether this evaluation can use the fused CPU edge kernels (first-order autograd only).

        ``fused``: False never uses them; None or True use them where they apply.
        """
        if fused is False:
            return False
        if create_graph or self.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._param_list()):
            return False  # training: gradients must flow to the weights, to any order
        return fused_available(self.device)

    def atomic_energies(self, z: torch.Tensor, vec: torch.Tensor, edges: Edges, fused: bool = False,
                        vacuum: torch.Tensor | None = None) -> torch.Tensor:
        """Per-atom energies [N] (eV) from atomic numbers [N] and edge vectors [E, 3] (receiver -> sender).

        ``vacuum``: a precomputed isolated-atom feature table [max_z, L, C] (default: the cached
        :meth:`vacuum_features`); the static-shape step of ``geodite_sim.accelerate`` passes one.
        """
        src, dst = edges.sender, edges.receiver
        dist = torch.linalg.vector_norm(vec, dim=-1)
        Y = spherical_harmonics_l12(vec / dist.unsqueeze(-1))
        phi = self.encoder.radial_features(dist, z[dst], z[src])
        hs = self.encoder(z, phi, Y, src, dst, fused=fused)
        vac = self.vacuum_features(z) if vacuum is None else vacuum[z]
        # An atom without neighbours has exactly its vacuum features; subtracting the cached
        # copy could leave a rounding residue, so its difference is set to zero exactly.
        connected = (segment_sum(torch.ones_like(dist), dst, z.shape[0]) > 0).unsqueeze(-1)  # no host sync
        delta = [torch.where(connected, h - vac[:, k], 0.0) for k, h in enumerate(hs)]
        e_res = self.decoder.readout(delta)
        v_zbl = self.decoder.repulsion_term(z, dist, src, dst)
        head = self.decoder
        return head.e0[z] + head.e_scale * (e_res + v_zbl) + head.e_shift

    def forward(
        self,
        batch: Batch,
        edges: Edges | tuple | None = None,
        compute_forces: bool = True,
        compute_stress: bool = True,
        per_atom_energies: bool = False,
        create_graph: bool = False,
        check: bool = True,
        *,
        fused: bool | None = None,
        neighbor_backend: str = "auto",
    ) -> dict[str, torch.Tensor]:
        """Evaluate every system of ``batch``.

        Returns ``energy`` [S] eV, and as requested ``forces`` [N, 3] eV/Å,
        ``stress`` [S, 3, 3] eV/Å^3 (ASE sign, zeros unless all three axes are
        periodic), ``energies`` [N] per-atom eV. ``edges`` defaults to a fresh
        neighbour list at the model cutoff. ``create_graph`` keeps the graph of
        forces/stress (for training on forces). ``check`` validates the inputs (finite
        positions and cell, non-singular periodic cells, atomic numbers in range); the
        checks read values on the host, so engines that validated their structures on
        admission pass ``check=False`` to keep a step free of host-device synchronisation.
        ``fused``: use the fused CPU edge kernels where they apply (None or True; False: never; the runner passes
        its step configuration's ``fused_kernels``). ``neighbor_backend``: the backend of the neighbour list built
        when ``edges`` is None (:func:`geodite_sim.neighbors.neighbor_list`).
        """
        if batch.dtype != self.dtype:
            raise TypeError(f"batch dtype {batch.dtype} differs from model dtype {self.dtype}")
        n = batch.n_atoms
        z = batch.numbers[:n]
        if check:
            check_batch(batch)
            if int(z.max()) >= self.config.max_z:
                raise ValueError(f"atomic number {int(z.max())} is outside the model's range "
                                 f"1..{self.config.max_z - 1}")
        if edges is None:
            edges = neighbor_list(batch, self.cutoff, backend=neighbor_backend)
        edges = Edges(*edges)
        fused = self.use_fused(create_graph, fused)

        return energy_and_derivatives(
            batch,
            edges,
            lambda vec: self.atomic_energies(z, vec, edges, fused),
            compute_forces=compute_forces,
            compute_stress=compute_stress,
            per_atom_energies=per_atom_energies,
            create_graph=create_graph,
        )


def check_batch(batch: Batch) -> None:
    """Raise ValueError for NaN/Inf positions or cells, or a singular cell on a periodic system."""
    n = batch.n_atoms
    pos = batch.positions[:n]
    if not torch.isfinite(pos).all():
        bad = torch.unique(batch.system_index[:n][~torch.isfinite(pos).all(dim=1)]).tolist()
        raise ValueError(f"positions contain NaN or Inf (systems {bad})")
    if not torch.isfinite(batch.cell).all():
        raise ValueError("cell contains NaN or Inf")
    full = batch.fully_periodic
    if full.any():
        vol = cell_volumes(batch.cell[full])
        if (vol < 1e-6).any():
            bad = torch.nonzero(full).squeeze(1)[vol < 1e-6].tolist()
            raise ValueError(f"singular cell (zero volume) on periodic system(s) {bad}")
