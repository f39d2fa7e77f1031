"""The runner's two kinds of hooks, as typed base classes with no-op defaults (the runner calls every hook
unconditionally):

* :class:`Job`: the front-end (relaxation, MD) the runner drives: per-structure settings at admission, results,
  and optional work at checks (frames, monitors, checkpoints).
* :class:`Observer`: watches a run (progress, logs, campaign monitors): ``on_start``, ``on_check``, ``on_result``,
  ``on_close``. Any object with some of these methods may be passed as an observer: :func:`as_observer` wraps it
  once, at the start of a run, into an :class:`Observer` whose missing hooks do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from geodite_sim.status import Status

if TYPE_CHECKING:
    from geodite_sim.io.structures import InputItem
    from geodite_sim.runner.config import CheckEvent
    from geodite_sim.runner.engine import Runner

#: A horizon no system reaches (a job without frame boundaries or step targets of its own).
NO_HORIZON = 1 << 62


class Job:
    """A front-end's hooks on the :class:`~geodite_sim.runner.Runner`.

    Required: :meth:`per_system`, :meth:`result`, :meth:`rejected`. The others default to "nothing to do".
    """

    def per_system(self, items: list[InputItem]) -> dict:
        """Per-structure settings of newly admitted ``items`` ([S] tensors for the registry entry's ``init``);
        raises :class:`~geodite_sim.runner.config.AdmissionError` (or ValueError) for a structure that cannot
        start."""
        raise NotImplementedError

    def result(self, item: InputItem, one: Any, status: Status | None, message: str | None) -> Any:
        """The result of a retired one-system state (``status`` None: finished normally)."""
        raise NotImplementedError

    def rejected(self, item: InputItem, status: Status, message: str) -> Any:
        """The result of an input that never started."""
        raise NotImplementedError

    def horizon(self, runner: Runner, horizon: torch.Tensor, new_slots: list[int]) -> torch.Tensor:
        """[S + 1] steps each slot may reach before the next check (frame boundaries, targets); default: no
        limit (the registry entry's ``finished`` stops a system)."""
        return torch.full_like(horizon, NO_HORIZON)

    def on_admit(self, runner: Runner, slots: list[int]) -> None:
        """Systems newly started in ``slots`` (after the re-pack that placed them)."""

    def at_check(self, runner: Runner, host: dict) -> dict[int, tuple[Status, str]]:
        """Work at a check (``host``: the status read); returns slots to retire with their status and message."""
        return {}

    def after_check(self, runner: Runner) -> bool:
        """After a check's retire/refill; True: check again before the next steps (the job rebuilt the runner,
        e.g. from a checkpoint it just wrote)."""
        return False

    def on_finish(self, runner: Runner) -> None:
        """Every input has its result (not called when the run stops on an exception)."""


class Observer:
    """Watches a run; every hook is optional (the defaults do nothing)."""

    def on_start(self, runner: Runner) -> None:
        """The run starts (before its first check)."""

    def on_check(self, event: CheckEvent) -> None:
        """A check happened (:class:`~geodite_sim.runner.config.CheckEvent`)."""

    def on_result(self, result: Any) -> None:
        """A structure's result (completion order)."""

    def on_close(self) -> None:
        """The run ended (normally or not)."""


class _Forward(Observer):
    """An :class:`Observer` over any object: its hooks of these names, no-ops for the others."""

    _HOOKS = ("on_start", "on_check", "on_result", "on_close")

    def __init__(self, obj: Any):
        self.obj = obj
        for name in self._HOOKS:
            hook = getattr(obj, name, None)
            if callable(hook):
                setattr(self, name, hook)


def as_observer(obj: Any) -> Observer:
    """``obj`` itself when it is an :class:`Observer`, else an Observer that forwards to its hooks."""
    return obj if isinstance(obj, Observer) else _Forward(obj)


def as_observers(objs: Iterable[Any]) -> list[Observer]:
    return [as_observer(o) for o in objs]


__all__ = ["Job", "NO_HORIZON", "Observer", "as_observer", "as_observers"]
