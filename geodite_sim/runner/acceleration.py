"""How the runner's step runs: eagerly, under ``torch.compile(fullgraph=True)``, or captured whole in a CUDA graph
(:mod:`geodite_sim.runner.capture`). ``"auto"`` is the CUDA graph on CUDA and eager elsewhere; a model that builds
its own neighbour lists always runs eagerly (its step is not a static-shape function)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from geodite_sim.runner.config import StepConfig
from geodite_sim.runner.model_call import ModelCall

MODES = ("auto", "off", "eager", "compile", "cuda_graph")


def static_shapes(config: StepConfig, device: torch.device) -> bool:
    """Whether the step is compiled or captured (then capacities keep headroom so shapes rarely change)."""
    mode = config.accelerate
    return mode in ("compile", "cuda_graph") or (mode == "auto" and device.type == "cuda")


class Stepper:
    """The step function of a run in its acceleration mode (built once, on first use)."""

    def __init__(self, step_fn: Callable, config: StepConfig, device: torch.device, model_call: ModelCall):
        self.step_fn, self.config, self.device, self.model_call = step_fn, config, device, model_call
        self._fn: Callable | None = None

    def __call__(self) -> Callable:
        if self._fn is None:
            self._fn = self._make()
        return self._fn

    def _make(self) -> Callable:
        mode = self.config.accelerate
        if not self.model_call.uses_edges or mode in ("off", "eager"):
            return self.step_fn
        if mode == "auto":
            return self._graph() if self.device.type == "cuda" else self.step_fn
        if mode == "cuda_graph":
            if self.device.type != "cuda":
                raise ValueError("accelerate='cuda_graph' needs a CUDA device; use 'compile' or 'eager' on the CPU")
            return self._graph()
        if mode == "compile":
            return self._compiled()
        raise ValueError(f"unknown accelerate mode {mode!r}; choose from {', '.join(MODES)}")

    def _compiled(self) -> Callable:
        self.model_call.no_fused_kernels()  # the fused C++ kernels are opaque to the compiler
        torch._dynamo.config.trace_autograd_ops = True
        # one compiled entry per runner and per capacity bucket: the step's code object is shared by every Runner of
        # the process, so dynamo's default limit (8) would end the 9th run with fullgraph=True
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(int(cfg.recompile_limit), 256)
        if hasattr(cfg, "accumulated_recompile_limit"):  # (older torch has no such setting)
            cfg.accumulated_recompile_limit = max(int(cfg.accumulated_recompile_limit), 4096)
        return torch.compile(self.step_fn, **{"fullgraph": True, "dynamic": False, **self.config.compile_options})

    def _graph(self) -> Callable:
        from geodite_sim.runner.capture import GraphStep

        return GraphStep(self.step_fn)


__all__ = ["MODES", "Stepper", "static_shapes"]
