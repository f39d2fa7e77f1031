"""Geodite message-passing encoder (architecture spec §4-§5).

Shapes: N nodes, E directed edges (sender j -> receiver i), C channels, R radial
functions, 8 = 3 + 5 steerable rows (l = 1, 2). Parameter names follow the
official checkpoint (``encoder.*``) so loading is a key-for-key copy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from geodite_sim.core.ops import segment_sum
from geodite_sim.model import edge_ops
from geodite_sim.model.config import GeoditeConfig
from geodite_sim.model.edge_ops import L1, L2, degree_blocks
from geodite_sim.model.radial import BesselBasis, DistanceWeighting, polynomial_cutoff


def dense(n_in: int, n_out: int) -> nn.Linear:
    """Bias-free linear map (every Dense in Geodite is bias-free)."""
    return nn.Linear(n_in, n_out, bias=False)


def density(phi: torch.Tensor, weight: nn.Linear) -> torch.Tensor:
    """rho = tanh(SiLU(w^T phi)^2), [E, R] -> [E, 1] (paper Eq. 2)."""
    return torch.tanh(F.silu(weight(phi)) ** 2)


class MLP(nn.Module):
    """Stack of bias-free linear layers with SiLU between (and after, if ``last_activation``).

    Keys ``layers.k.weight`` (the official file also holds them as ``dense_layers.k.weight``).
    """

    def __init__(self, sizes: list[int], last_activation: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(dense(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.last_activation = last_activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(self.layers)
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < n - 1 or self.last_activation:
                x = F.silu(x)
        return x


class NodeInit(nn.Module):
    """h0_i = MLP([A_na[Z_i] || sum_j A_nbr[Z_j] (W_ndp phi_ij) / (1 + sum_j rho0_ij)])."""

    def __init__(self, cfg: GeoditeConfig):
        super().__init__()
        c, r = cfg.hidden_channels, cfg.n_rbf
        self.A_nbr = nn.Embedding(cfg.max_z, c, padding_idx=0)
        self.W_ndp = MLP([r, c])
        self.W_nrd_nru = MLP([2 * c, c, c])
        self.density_fn = dense(r, 1)

    def forward(self, a_na: torch.Tensor, z: torch.Tensor, phi: torch.Tensor, src, dst) -> torch.Tensor:
        n = z.shape[0]
        rho = density(phi, self.density_fn)
        s = self.A_nbr(z.index_select(0, src)) * self.W_ndp(phi)
        m = segment_sum(s, dst, n) / (1.0 + segment_sum(rho, dst, n))
        return self.W_nrd_nru(torch.cat([a_na, m], dim=-1))


class EdgeInit(nn.Module):
    """t0_ij = (h0_i + h0_j) * (W_erp phi_ij)."""

    def __init__(self, cfg: GeoditeConfig):
        super().__init__()
        self.W_erp = dense(cfg.n_rbf, cfg.hidden_channels)

    def forward(self, h: torch.Tensor, phi: torch.Tensor, src, dst) -> torch.Tensor:
        return (h.index_select(0, dst) + h.index_select(0, src)) * self.W_erp(phi)


class TensorLayerNorm(nn.Module):
    """One RMS statistic per node over [h; X] (degrees weighted 1/(2l+1)), per-degree gains, no bias."""

    balance_degree_weight: torch.Tensor  # buffer, typed for the checker

    def __init__(self, cfg: GeoditeConfig):
        super().__init__()
        c = cfg.hidden_channels
        self.epsilon = cfg.epsilon
        self.affine_weights = nn.ParameterList(nn.Parameter(torch.ones(c)) for _ in range(3))
        bw = torch.tensor([1.0] + [1.0 / 3.0] * 3 + [1.0 / 5.0] * 5).unsqueeze(-1)
        self.register_buffer("balance_degree_weight", bw)

    def forward(self, h: torch.Tensor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([h.unsqueeze(1), X], dim=1)  # [N, 9, C]
        s = (x * x * self.balance_degree_weight).sum(dim=1).mean(dim=-1)  # [N]
        inv = (s + self.epsilon).rsqrt()[:, None, None]
        g0, g1, g2 = self.affine_weights
        gain = torch.cat([g0[None], g1[None].expand(3, -1), g2[None].expand(5, -1)], dim=0)  # [9, C]
        x = x * inv * gain
        return x[:, 0], x[:, 1:]


class Interaction(nn.Module):
    """Message passing layer: TLN -> attention + filter messages -> density-normalised residual -> edge update."""

    def __init__(self, cfg: GeoditeConfig, edge_update: bool):
        super().__init__()
        c, r, heads = cfg.hidden_channels, cfg.n_rbf, cfg.num_heads
        if c % heads:
            raise ValueError(f"hidden_channels ({c}) must be divisible by num_heads ({heads})")
        self.c, self.heads, self.n_rbf = c, heads, r
        self.attn_dropout = cfg.attn_dropout
        # Registration order matches the official model's named_parameters() (EMA tuples use it).
        self.gamma_s = nn.ModuleList([dense(c, c), dense(c, 3 * c)])
        self.W_q = dense(c, c)
        self.W_k = dense(c, c)
        self.gamma_v = nn.ModuleList([dense(c, c), dense(c, 3 * c)])
        self.W_re = dense(c, c)
        self.edge_update = edge_update
        if edge_update:
            self.gamma_t = MLP([c, c, c], last_activation=True)
            self.W_vq = dense(c, c)
            self.W_vk = nn.ModuleList([dense(c, c), dense(c, c)])
            self.W_edp = dense(c, c)
            self.gamma_w = nn.ModuleList([nn.LayerNorm(c, eps=1e-5)])
        self.W_rs = dense(c, 3 * c)
        self.tensor_layernorm = TensorLayerNorm(cfg)
        self.density_fn = dense(r, 1)

    def forward(self, h, X, t, Y, phi, src, dst, Y_blocks=None, fused: bool = False):
        """One layer. h [N, C], X [N, 8, C], t [E, C], Y [E, 8], phi [E, R] -> (h, X, t).

        Linear maps that read the same input are applied as one matrix product
        (node side: W_q, W_k, gamma_s[0], gamma_v[0]; edge side: W_re, W_rs,
        gamma_t[0]). The per-edge operations (attention message, equivariant
        message, edge invariant) are in :mod:`geodite_sim.model.edge_ops`;
        ``fused`` selects their CPU kernels.
        """
        n, c, heads = h.shape[0], self.c, self.heads
        h, X = self.tensor_layernorm(h, X)

        node = F.linear(h, torch.cat([self.W_q.weight, self.W_k.weight,
                                      self.gamma_s[0].weight, self.gamma_v[0].weight]))
        q, k, s_hidden, v_hidden = node.split(c, dim=-1)
        xs = self.gamma_s[1](F.silu(s_hidden))
        v = self.gamma_v[1](F.silu(v_hidden))
        edge_w = [self.W_re.weight, self.W_rs.weight]
        if self.edge_update:
            edge_w.append(self.gamma_t.layers[0].weight)
        if fused:
            # one product per block: the backward pass sums three products into grad(t) instead of
            # concatenating the blocks' gradients into an [E, 5C] tensor first (inference only)
            edge_parts = [F.linear(t, w) for w in edge_w]
        else:
            edge = F.linear(t, torch.cat(edge_w))
            edge_parts = edge.split([w.shape[0] for w in edge_w], dim=-1)
        dropout = self.attn_dropout if self.training else 0.0
        h_msg, o_d, o_t = edge_ops.attention(q, k, v, xs, edge_parts[0], edge_parts[1], src, dst, heads,
                                             1.0 / math.sqrt(c), fused=fused, dropout=dropout)

        rho = density(phi / self.n_rbf, self.density_fn)  # [E, 1]
        norm = 1.0 + segment_sum(rho, dst, n)  # [N, 1]
        h = h + h_msg / norm
        X = X + edge_ops.message(X, o_d, o_t, Y, src, dst, fused=fused) / norm.unsqueeze(-1)

        if self.edge_update:
            gate = self.gamma_t.layers[1](F.silu(edge_parts[2]))
            w = self._edge_invariant(X, Y, src, dst, Y_blocks, fused)
            t = edge_ops.gated_residual(t, gate, self.W_edp(self.gamma_w[0](w)), fused=fused)
        return h, X, t

    def _edge_invariant(self, X, Y, src, dst, Y_blocks=None, fused: bool = False) -> torch.Tensor:
        """w_ij = sum_l <reject_Y(W_vq X_i)_l, reject_Y(W_vk X_j)_l> per channel: [E, C]."""
        Q = self.W_vq(X)
        K = torch.cat([self.W_vk[0](X[:, L1]), self.W_vk[1](X[:, L2])], dim=1)
        return edge_ops.invariant(Q, K, Y, src, dst, fused=fused, Y_blocks=Y_blocks)


class EquivariantCoupling(nn.Module):
    """h += m1, X += m2 * W_vu X, with (m1, m2) = MLP([h || sum_m (W_vu X)_m^2])."""

    def __init__(self, cfg: GeoditeConfig):
        super().__init__()
        c = cfg.hidden_channels
        self.c = c
        self.gamma_m = nn.ModuleList([dense(2 * c, c), dense(c, 2 * c)])
        self.W_vu = dense(c, c)

    def forward(self, h, X):
        xp = self.W_vu(X)
        norm2 = (xp * xp).sum(1)
        m = self.gamma_m[1](F.silu(self.gamma_m[0](torch.cat([h, norm2], dim=-1))))
        m1, m2 = m.split(self.c, dim=-1)
        return h + m1, X + m2.unsqueeze(1) * xp


class GeoditeEncoder(nn.Module):
    """Edges -> per-layer scalar node features h^(k), k = 0..L-1."""

    def __init__(self, cfg: GeoditeConfig):
        super().__init__()
        if cfg.lmax != 2:
            raise ValueError(f"only lmax = 2 is implemented (got {cfg.lmax})")
        self.cfg = cfg
        # Registration order matches the official model's named_parameters() (EMA tuples use it).
        self.node_init = NodeInit(cfg)
        self.edge_init = EdgeInit(cfg)
        self.A_na = nn.Embedding(cfg.max_z, cfg.hidden_channels, padding_idx=0)
        self.radial_basis = BesselBasis(cfg.cutoff, cfg.n_rbf)
        L = cfg.num_layers
        self.interaction_list = nn.ModuleList(Interaction(cfg, edge_update=k < L - 1) for k in range(L))
        self.ec_list = nn.ModuleList(EquivariantCoupling(cfg) for _ in range(L))
        self.distance_weighting_fn = DistanceWeighting()

    def radial_features(self, dist: torch.Tensor, z_recv: torch.Tensor, z_send: torch.Tensor) -> torch.Tensor:
        """phi_eff = Bessel(r) * u(r) * y(r): [E, R]."""
        env = polynomial_cutoff(dist, self.cfg.cutoff) * self.distance_weighting_fn(dist, z_recv, z_send)
        return self.radial_basis(dist) * env.unsqueeze(-1)

    def forward(self, z, phi, Y, src, dst, fused: bool = False) -> list[torch.Tensor]:
        """z: [N], phi: [E, R], Y: [E, 8], src/dst: [E] -> list of L tensors [N, C].

        ``fused``: use the CPU edge kernels (first-order autograd only; see ``edge_ops``).
        """
        h = self.node_init(self.A_na(z), z, phi, src, dst)
        t = self.edge_init(h, phi, src, dst)
        X = h.new_zeros(h.shape[0], 8, h.shape[1])
        Y_blocks = None if fused else degree_blocks(Y)
        hs = []
        for inter, ec in zip(self.interaction_list, self.ec_list):
            h, X, t = inter(h, X, t, Y, phi, src, dst, Y_blocks, fused)
            h, X = ec(h, X)
            hs.append(h)
        return hs
