"""Kept for backward compatibility: the admission budget now lives with the runner.

Continuous batching (queue, slots, retire/refill) is :class:`geodite_sim.runner.Runner`; see docs/runner.md.
"""

from geodite_sim.runner.engine import Capacity

__all__ = ["Capacity"]
