"""Per-run settings (temperatures, step counts, pressures) matched to the structures of a job.

A setting given as a list either has one value per structure, in input order, or sweeps a single
structure: N values x 1 structure = N runs of that structure (as an SSE campaign runs one material at
several temperatures). Anything else is refused before anything runs::

    structures, n = match_runs("CuI.extxyz", {"temperature": [500, 700, 900]})   # 3 runs of CuI
    match_runs([a, b], {"temperature": [500, 700, 900]})                           # ValueError
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

from ase import Atoms

SWEEP_HELP = ("give one value for all structures, one value per structure (in input order), or several values "
              "for a single structure (a sweep: N values x 1 structure = N runs)")


def is_per_run(value: Any) -> bool:
    """Whether a setting is a per-run list (a 1-d sequence, array or tensor) rather than one value."""
    if value is None or isinstance(value, (str, bytes, int, float)):
        return False
    ndim = getattr(value, "ndim", None)
    if ndim is not None:
        return ndim == 1
    return isinstance(value, (list, tuple))


def _is_single(structures: Any) -> bool:
    from geodite_sim.io.structures import Labeled

    return isinstance(structures, (Atoms, str, os.PathLike, Labeled)) or \
        type(structures).__module__.startswith("pymatgen")


def match_runs(structures: Any, settings: Mapping[str, Any]) -> tuple[Any, int | None]:
    """``(structures, n_runs)`` with every per-run list of ``settings`` matched to the structures.

    Args:
        structures: one structure, a sequence or any iterable (a lazy one is read ahead by at most
            ``N + 1`` items, N the lists' length, to count it).
        settings: name -> value; values that are lists (:func:`is_per_run`) take part.
    Returns:
        The structures to run (the input itself when no list is given or the counts match one to one; the
        single structure repeated N times for a sweep) and N (None when no setting is a list).
    Raises:
        ValueError: lists of different lengths, an empty list, or N values for M != N structures (M > 1).
    """
    lists = {name: len(v) for name, v in settings.items() if is_per_run(v)}
    if not lists:
        return structures, None
    lengths = sorted(set(lists.values()))
    described = ", ".join(f"{name} has {k} value{'s' if k != 1 else ''}" for name, k in lists.items())
    if len(lengths) > 1:
        raise ValueError(f"per-run settings of different lengths ({described}): {SWEEP_HELP}")
    n = lengths[0]
    if n == 0:
        raise ValueError(f"empty per-run setting ({described}): {SWEEP_HELP}")
    if _is_single(structures):
        items, known = [structures], True
    elif isinstance(structures, (list, tuple)):
        items, known = list(structures), True
    else:
        items, known = list(itertools.islice(iter(structures), n + 1)), False
    m = len(items)
    if m == n:
        return (structures if known and not _is_single(structures) else items), n
    if m == 1 and n > 1:
        return items * n, n
    count = f"more than {n}" if not known and m > n else str(m)
    raise ValueError(f"{described} but {count} structure{'s were' if m != 1 else ' was'} given: {SWEEP_HELP}")


__all__ = ["SWEEP_HELP", "is_per_run", "match_runs"]
