"""One status vocabulary for every result (relax, MD, evaluate, workflows).

Each input yields exactly one result whose ``status`` is a :class:`Status`; a failed input's
result also carries a message naming the problem and the input. On the device the runner keeps
a per-system integer code (:attr:`Status.code`), read back only at check intervals.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Outcome of one input. A ``StrEnum``: compares equal to its value (``"converged"``)."""

    # success
    CONVERGED = "converged"  #: relaxation reached fmax
    NOT_CONVERGED = "not_converged"  #: relaxation used all its steps
    DONE = "done"  #: MD ran all its steps / evaluation succeeded
    # rejected on admission (never started)
    UNREADABLE = "unreadable"  #: missing file, unparseable file, unsupported input type
    INVALID_STRUCTURE = "invalid_structure"  #: empty, non-finite positions/cell/momenta, singular cell
    UNSUPPORTED_ELEMENT = "unsupported_element"  #: element outside 1-118 or outside the model's elements
    ATOMS_TOO_CLOSE = "atoms_too_close"  #: two atoms closer than a fraction of their covalent-radius sum
    INVALID_SETTINGS = "invalid_settings"  #: per-structure setting missing or invalid (temperature, steps)
    # stopped while running
    NON_FINITE = "non_finite"  #: NaN/Inf energy, forces, stress, positions or momenta
    VOLUME = "volume_change"  #: cell volume blew up or collapsed
    TEMPERATURE = "temperature_runaway"  #: MD temperature far above its statistical bound
    DRIFT = "conserved_drift"  #: MD conserved quantity drifted
    MODEL_ERROR = "model_error"  #: the model raised on this system

    @property
    def ok(self) -> bool:
        """True for a result with usable numbers (converged, not converged, done)."""
        return self in (Status.CONVERGED, Status.NOT_CONVERGED, Status.DONE)

    @property
    def code(self) -> int:
        """Integer code kept per system on the device (0 = running fine)."""
        return DEVICE_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Status:
        return _BY_CODE[int(code)]

    def __str__(self) -> str:  # f"{status}" gives the value
        return self.value


#: Device-side failure codes (0 = fine). Only failures that arise while running need one.
DEVICE_CODES: dict[Status, int] = {
    Status.CONVERGED: 0, Status.NOT_CONVERGED: 0, Status.DONE: 0,
    Status.NON_FINITE: 1, Status.ATOMS_TOO_CLOSE: 2, Status.VOLUME: 3, Status.MODEL_ERROR: 4,
    Status.TEMPERATURE: 5, Status.DRIFT: 6,
    Status.UNREADABLE: 10, Status.INVALID_STRUCTURE: 11, Status.UNSUPPORTED_ELEMENT: 12,
    Status.INVALID_SETTINGS: 13,
}
_BY_CODE = {c: s for s, c in DEVICE_CODES.items() if c != 0}

__all__ = ["DEVICE_CODES", "Status"]
