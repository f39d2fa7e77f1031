"""One batched runner for relaxations and MD (docs/runner.md).

* :mod:`.registry`: optimisers and integrators as ``(init, step)`` entries (``fire``, ``fire_frechet``,
  ``nve``, ``nvt_nhc``, ``nvt_langevin``, ...).
* :mod:`.engine`: the runner's core (the loop, the device-resident step, the check).
* :mod:`.config`: its settings and bookkeeping types; :mod:`.hooks`: the job's and observers' hooks.
* :mod:`.slots`: the padded layout and re-packs; :mod:`.admission`: the queue and the start of new systems.
* :mod:`.model_call`: the model adapter; :mod:`.failures`: device failure checks and their messages.
* :mod:`.edges`: the padded Verlet edge list (canonical order, device-side masking and staleness);
  :mod:`.verlet`: the policy deciding rebuilds, skins and two-level lists.
* :mod:`.acceleration`: eager, compiled or CUDA-graph steps (:mod:`.capture`: whole-step replay).
* :mod:`.capacity`: the one batch-capacity policy of every front-end.
"""

from geodite_sim.runner.config import AdmissionError, Capacity, CheckEvent, FailureChecks, SlotStatus, StepConfig
from geodite_sim.runner.engine import Runner
from geodite_sim.runner.hooks import Job, Observer
from geodite_sim.runner.registry import REGISTRY, Evaluation, Integrator, get_integrator, register

__all__ = ["AdmissionError", "Capacity", "CheckEvent", "Evaluation", "FailureChecks", "Integrator", "Job",
           "Observer", "REGISTRY", "Runner", "SlotStatus", "StepConfig", "get_integrator", "register"]
