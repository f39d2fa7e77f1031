"""A small progress bar and end-of-run summary shared by the batched engines (relax, MD).

``Progress`` counts finished items by outcome (``"converged"``, ``"failed"``, …), shows
done/total, items per second and the number of active systems on a tqdm bar (on
stderr, only when enabled), and produces a one-line summary that the engine logs
through :mod:`logging` and the command line prints::

    with Progress(total=len(inputs), desc="relax", unit="structure", enabled=True) as bar:
        ...
        bar.finish("converged")          # one item done
        bar.set_active(n_active)
    log.info(bar.summary())              # "relax: 10 structures in 3.2 s (3.1/s): 8 converged, 2 failed"
"""

from __future__ import annotations

import time
from collections import Counter

from tqdm.auto import tqdm


def eta_text(seconds_left: float | None) -> str:
    """``"ETA 1h05m"`` for a number of seconds (``"ETA unknown"`` for None)."""
    if seconds_left is None:
        return "ETA unknown"
    s = max(float(seconds_left), 0.0)
    return f"ETA {int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def eta_after(done: int, total: int, elapsed: float) -> str:
    """The ETA of ``total`` items when ``done`` took ``elapsed`` seconds (unknown before the first)."""
    return eta_text(elapsed / done * (total - done) if done > 0 else None)


class Progress:
    """Done/total, rate and active-system count of a batched run; a no-op bar when ``enabled`` is False.

    Args:
        total: number of items expected, or None when unknown (a lazy stream).
        desc: label shown before the bar and in the summary.
        unit: name of one item ("structure", "trajectory"); pluralised with an "s".
        enabled: draw the bar (counting and the summary work either way).
        outcomes: outcome names listed in the summary even when their count is 0, in this order.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "item",
        enabled: bool = True,
        outcomes: tuple[str, ...] = (),
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.counts: Counter[str] = Counter({k: 0 for k in outcomes})
        self.active = 0
        self.done = 0
        self.start = time.perf_counter()
        self.end: float | None = None
        self._bar = tqdm(total=total, desc=desc or None, unit=unit, disable=not enabled, dynamic_ncols=True,
                         smoothing=0.1) if enabled else None
        Progress.latest = self

    #: The bar created last in this process (the command line names its counts when a run is interrupted).
    latest: Progress | None = None

    # ------------------------------------------------------------------ updates
    def finish(self, outcome: str, n: int = 1) -> None:
        """Record ``n`` finished items with ``outcome``."""
        self.counts[outcome] += n
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            self._postfix()

    def set_active(self, n: int) -> None:
        """Number of systems currently being simulated."""
        self.active = n
        if self._bar is not None:
            self._postfix()

    def _postfix(self) -> None:
        fields = {"active": self.active}
        fields.update({k: v for k, v in self.counts.items() if v})
        self._bar.set_postfix(fields, refresh=False)  # type: ignore[union-attr]  # set while running

    def close(self) -> None:
        if self.end is None:
            self.end = time.perf_counter()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reporting
    @property
    def elapsed(self) -> float:
        """Seconds since the start (until :meth:`close`)."""
        return (self.end if self.end is not None else time.perf_counter()) - self.start

    @property
    def rate(self) -> float:
        """Finished items per second."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        """One line: ``desc: N units in T s (R/s): a outcome1, b outcome2``."""
        units = self.unit if self.done == 1 else self.unit + "s"
        parts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items())
        head = f"{self.desc}: " if self.desc else ""
        tail = f": {parts}" if parts else ""
        return f"{head}{self.done} {units} in {self.elapsed:.1f} s ({self.rate:.2f}/s){tail}"

    def position(self) -> tuple[int, int | None, str]:
        """(items done, items expected or None, unit) of the bar."""
        return self.done, self.total, self.unit

    def as_dict(self) -> dict:
        """Counts, elapsed seconds and rate (for JSON reports)."""
        return {"done": self.done, "elapsed_s": self.elapsed, "rate_per_s": self.rate, **dict(self.counts)}
