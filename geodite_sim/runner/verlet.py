"""The Verlet policy: when the edge lists of the runner's batch are built, rebuilt, grown or filtered.

The *mechanism* (a padded edge buffer in canonical order, device-side masking and staleness, rebuilds, drops,
re-maps and inner filters without a search) is :mod:`geodite_sim.runner.edges`; this module decides, at each
check, host side:

* which systems get a new list: parked ones (a step found their list stale; they redo the step), those that have
  used more than half of their skin (before they would park), every one with ``rebuild_every_check``;
* whose skin grows: a parked system that made no step since its last build (one step outruns its skin) gets a
  doubled skin, up to :attr:`VerletPolicy.max_skin` (beyond it the simulation has blown up);
* with two-level lists (:attr:`~geodite_sim.runner.config.StepConfig.inner_skin`): each system's inner margin
  (a multiple of its pace), the outer rebuilds where the outer list cannot supply it, and the inner list the
  steps use.

A system's edges are always its exact neighbour list at the cutoff in canonical order, so none of these
choices changes a trajectory (tests/runner/test_runner.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from geodite_sim.runner.config import INNER_MIN_MARGIN, INNER_PACE_FACTOR, StepConfig
from geodite_sim.runner.edges import EdgeBuffer, drop, inner, make_buffer, rebuild, remap
from geodite_sim.runner.failures import blown_up


class VerletPolicy:
    """Edge lists of the runner's batch and the host state of the policy (see the module docstring).

    Attributes:
        edges: the (outer) edge buffer. inner: the steps' list with two-level lists (else None).
        margin: input index -> inner margin, Å. built_at: input index -> its steps at its last build.
        outer_bound: input index -> (outer staleness bound, steps) at the last check.
        grow_skin: slot -> skin for its next build. max_skin: largest skin, Å (4 × cutoff).
    """

    def __init__(self, config: StepConfig, cutoff: float, dtype: torch.dtype, device: torch.device,
                 uses_edges: bool, static: bool, steps_taken: Callable):
        self.config, self.cutoff, self.dtype, self.device = config, cutoff, dtype, device
        self.uses_edges, self.static, self.steps_taken = uses_edges, static, steps_taken
        self.max_skin = 4.0 * cutoff
        self.edges: EdgeBuffer | None = None
        self.inner: EdgeBuffer | None = None
        self.reset()

    def reset(self) -> None:
        """Forget every system's policy state (a restart rebuilds it from scratch)."""
        self.edges, self.inner = None, None
        self.margin: dict[int, float] = {}
        self.built_at: dict[int, int] = {}
        self.outer_bound: dict[int, tuple] = {}
        self.grow_skin: dict[int, float] = {}

    @property
    def two_level(self) -> bool:
        """Whether the steps use an inner list filtered from the outer one at each check."""
        c = self.config
        if c.inner_skin is None or c.rebuild_every_check or not self.uses_edges:
            return False
        return c.inner_skin != "auto" or (c.skin >= 0.3 and c.check_interval == 1 and not self.static)

    @property
    def start_margin(self) -> float:
        value = self.config.inner_skin
        return 0.1 if value == "auto" or value is None else float(value)

    @property
    def outer(self) -> EdgeBuffer:
        """The outer edge buffer (there is one whenever the batch holds systems)."""
        assert self.edges is not None, "no edge list: the batch holds no systems"
        return self.edges

    @property
    def step_edges(self) -> EdgeBuffer | None:
        """The list the steps use."""
        return self.inner if self.two_level and self.inner is not None else self.edges

    def forget(self, index: int) -> None:
        """Input ``index`` retired."""
        self.margin.pop(index, None)
        self.built_at.pop(index, None)

    # ------------------------------------------------------------------ decisions at a check
    def plan(self, host: dict, items: list, parked: list[int], retire: dict, state, occupied: torch.Tensor):
        """The rebuilds of this check: returns (slots to rebuild, input indices parked on the inner list, slot ->
        grown skin); adds systems that outrun the largest skin to ``retire``."""
        inner_parked: set[int] = set()
        if self.two_level:  # parked on the inner list: a wider margin at the refresh, no search here
            for slot in parked:
                index = items[slot].index
                if 2.0 * self.margin.get(index, self.start_margin) > self.max_skin:
                    retire[slot] = blown_up(self.max_skin, int(host["steps"][slot]))
                else:
                    inner_parked.add(index)
            parked = []
        grow = self._outrun(host, items, parked)
        if self.config.rebuild_every_check:
            parked += [s for s, it in enumerate(items) if it is not None and s not in retire and s not in parked]
        elif not self.two_level:  # (two-level lists: the outer list's rebuilds are decided at the refresh)
            parked += [s for s in self._half_used(state, occupied, len(items)) if s not in retire and s not in parked]
        grown: dict[int, float] = {}
        for slot, skin in grow.items():
            if skin is None:  # cannot keep up even with the largest skin
                parked.remove(slot)
                retire[slot] = blown_up(self.max_skin, int(host["steps"][slot]))
            else:
                grown[slot] = skin
        return parked, inner_parked, grown

    def _half_used(self, state, occupied: torch.Tensor, k: int) -> list[int]:
        """Occupied slots that have used more than half of their skin since their build: rebuilt at this check
        (before they would park in the next block of steps)."""
        b = state.batch
        outer = self.outer
        bound = outer.stale_bound(b.positions, b.cell, b.pbc, b.system_index)
        half = (bound[:k] > 0.5 * outer.skin[:k]) & occupied[:k]
        return [int(s) for s in torch.nonzero(half).flatten().tolist()]

    def _outrun(self, host: dict, items: list, parked: list[int]) -> dict[int, float | None]:
        """Parked systems that made no step since their last build (one step moves them beyond their skin):
        slot -> a doubled skin, or None when it would exceed :attr:`max_skin`."""
        out: dict[int, float | None] = {}
        if not parked:
            return out
        skins = self.outer.skin.cpu().numpy()
        for slot in parked:
            if self.built_at.get(items[slot].index) == int(host["steps"][slot]):
                new = max(2.0 * float(skins[slot]), 0.05)
                out[slot] = new if new <= self.max_skin else None
        return out

    # ------------------------------------------------------------------ building
    def _record_builds(self, slots: list[int], state, items: list) -> None:
        if slots:
            steps = self.steps_taken(state)[torch.as_tensor(slots, dtype=torch.long, device=self.device)]
            for slot, st in zip(slots, steps.cpu().tolist()):
                self.built_at[items[slot].index] = int(st)

    def rebuild(self, slots: list[int], state, items: list) -> None:
        """Rebuild the edges of ``slots`` in place (no re-pack), with their grown skins."""
        edges = self.outer
        if self.grow_skin:
            skin = edges.skin.clone()
            for slot, value in self.grow_skin.items():
                skin[slot] = value
            edges = replace(edges, skin=skin)
            self.grow_skin = {}
        slots_t = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        self.edges = rebuild(edges, state.batch, slots_t, self.config.neighbor_backend, self.static)
        self._record_builds(slots, state, items)

    def drop(self, slots: list[int], state) -> None:
        """Retired ``slots`` leave without a re-pack: their edges are dropped."""
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        self.edges = drop(self.outer, state.batch, idx, self.static)

    def repacked(self, old_state, keep: list[int], state, rebuild_slots: list[int], items: list) -> None:
        """The edges after a re-pack: survivors (``keep``, now slots ``0 ..``) keep theirs, re-mapped without a
        search (:func:`~geodite_sim.runner.edges.remap`), except ``rebuild_slots``, which are built afresh."""
        if state is None:
            self.edges, self.inner = None, None
            return
        batch = state.batch
        n_slots = batch.cell.shape[0]
        skin = torch.full((n_slots,), self.config.skin, dtype=self.dtype, device=self.device)
        keep_t = torch.as_tensor(keep, dtype=torch.long, device=self.device)
        old = self.edges
        if old is not None and keep:
            skin[: len(keep)] = old.skin[keep_t]
        for slot, value in self.grow_skin.items():
            skin[slot] = value
        backend = self.config.neighbor_backend
        if old is None or not keep or old.n_valid == 0:
            everything = torch.as_tensor([s for s, it in enumerate(items) if it is not None], dtype=torch.long,
                                         device=self.device)
            self.edges = make_buffer(batch, everything, self.cutoff, skin, backend, static=self.static)
        else:
            self.edges = remap(old, old_state.batch, keep_t, batch, torch.as_tensor(rebuild_slots, dtype=torch.long,
                               device=self.device), skin, backend, self.static)
        self.grow_skin = {}
        self._record_builds(rebuild_slots, state, items)

    def refresh_inner(self, state, items: list, parked: set[int]) -> None:
        """Two-level lists: per-system margins, outer rebuilds where the outer list cannot supply them, then the
        inner list the next steps use (``parked``: input indices whose last step was undone)."""
        b = state.batch
        k = len(items)
        outer = self.outer
        bound = outer.stale_bound(b.positions, b.cell, b.pbc, b.system_index)
        steps = self.steps_taken(state)[:k].to(bound.dtype)
        host = torch.stack([bound[:k], outer.skin[:k].to(bound.dtype), steps]).cpu().numpy()
        lo, factor = INNER_MIN_MARGIN, INNER_PACE_FACTOR
        margin = [0.0] * (b.cell.shape[0])
        prev, self.outer_bound = self.outer_bound, {}
        need, half, grow = [], [], {}
        for slot, item in enumerate(items):
            if item is None:
                continue
            index = item.index
            o, skin, n = float(host[0, slot]), float(host[1, slot]), float(host[2, slot])
            if index in parked:
                m = 2.0 * self.margin.get(index, self.start_margin)
            elif index in prev and math.isfinite(o) and n > prev[index][1]:
                # a multiple of the growth of the bound per step since the last check, for the steps to the next
                m = max(factor * (o - prev[index][0]) / (n - prev[index][1]) * self.config.check_interval, lo)
            else:  # new, or made no step since (MD at a frame boundary): keep its margin
                m = self.margin.get(index, self.start_margin)
            if not math.isfinite(o):
                m = lo  # blown up: the failure checks stop it; nothing to protect
            elif m + o > skin:
                need.append(slot)
                if m > 0.5 * skin:
                    grow[slot] = 2.0 * m
            elif o > 0.5 * skin:
                half.append(slot)
            margin[slot] = m
            self.margin[index] = m
            self.outer_bound[index] = (o, n)
        if need:  # outer rebuilds (one search for all; the half-used join it)
            need += half
            self.grow_skin = grow
            self.rebuild(need, state, items)
            for slot in need:
                index = items[slot].index
                self.outer_bound[index] = (0.0, self.outer_bound[index][1])
        margin_t = torch.as_tensor(margin, dtype=self.dtype, device=self.device)
        self.inner = inner(self.outer, b, margin_t, self.inner.capacity if self.inner is not None else None,
                           static=self.static)


__all__ = ["VerletPolicy"]
