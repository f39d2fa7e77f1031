"""Whole-step CUDA-graph capture: the runner's step (integrator, edge masking and staleness, model,
failure checks) recorded once and replayed, advancing static state buffers in place.

The captured region computes ``(state', slots') = step(state, slots, edges)`` and copies the
results back into the input buffers, so a replay is one launch of the whole step and the runner's
``state`` keeps pointing at the same tensors. When the runner re-packs at a check, new tensors of
the same shapes are copied into the static buffers (no re-capture); a change of capacity (shapes)
captures again. CUDA only; the CPU path never touches this module (``graph_factory`` can be
replaced by an emulation in tests).
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import torch

from geodite_sim.accelerate import CapturedStep


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor reachable through dataclass fields (state, batch, slots, edges), in a fixed order."""
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif is_dataclass(v):
            out += _tensors(v)
    return out


def _signature(objs) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for o in objs for t in _tensors(o))


class GraphStep:
    """Replays a captured step over static buffers; same call signature as ``Runner.step_fn``.

    Warm-up runs happen on copies of the inputs, so capturing never advances the real state.
    """

    graph_factory = CapturedStep  # warm-up on a side stream, then capture (geodite_sim.accelerate)

    def __init__(self, fn):
        self.fn = fn
        self.static = None  # (state, slots, edges) whose tensors the graph reads and writes
        self.signature = None
        self.graph = None
        self.n_captures = 0

    def _is_static(self, args) -> bool:
        return self.static is not None and all(a is b for a, b in zip(args, self.static))

    def _load(self, args) -> None:
        for dst, src in zip((t for o in self.static for t in _tensors(o)), (t for o in args for t in _tensors(o))):
            if dst is not src:
                dst.copy_(src)

    def _capture(self, args) -> None:
        import copy

        self.static = tuple(copy.deepcopy(a) for a in args)
        state, slots, edges = self.static
        targets = _tensors(state) + _tensors(slots)

        def body():
            new_state, new_slots = self.fn(state, slots, edges)
            for dst, src in zip(targets, _tensors(new_state) + _tensors(new_slots)):
                if dst is not src:
                    dst.copy_(src)

        snapshot = [t.clone() for t in targets]
        self.graph = self.graph_factory(body, state.batch.device)
        for dst, src in zip(targets, snapshot):  # undo the warm-up/capture runs
            dst.copy_(src)
        self.signature = _signature(args)
        self.n_captures += 1

    def __call__(self, state, slots, edges):
        args = (state, slots, edges)
        if not self._is_static(args):
            if self.signature != _signature(args):
                self._capture(args)
            self._load(args)
        self.graph.replay()
        return self.static[0], self.static[1]
