"""One batched runner for relaxations and MD (docs/runner.md).

* :mod:`.registry`: optimisers and integrators as ``(init, step)`` entries (``fire``, ``fire_frechet``,
  ``nve``, ``nvt_nhc``, ``nvt_langevin``, ...).
* :mod:`.edges`: the padded Verlet edge list (canonical order, device-side masking and staleness).
* :mod:`.engine`: the runner (admission, device-resident steps, checks, retire/refill, observers).
* :mod:`.capture`: whole-step CUDA-graph replay.
"""

from geodite_sim.runner.engine import Capacity, CheckEvent, FailureChecks, Runner, SlotStatus, StepConfig
from geodite_sim.runner.registry import REGISTRY, Evaluation, Integrator, get_integrator, register

__all__ = ["Capacity", "CheckEvent", "Evaluation", "FailureChecks", "Integrator", "REGISTRY", "Runner",
           "SlotStatus", "StepConfig", "get_integrator", "register"]
