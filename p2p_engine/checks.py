"""Argument checks the public entry points share: each refuses a value of the wrong kind, naming the argument,
before any work starts. Python counts a bool as an integer (True == 1), so none of these accepts one: a bool
given for a count or a scale is a mistake, and one taken as 1 would hide it."""
from __future__ import annotations

import math
import numbers
import sys
import warnings


def is_int(value) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real number (int, float, NumPy scalar) that is not a bool; NaN and infinities included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_flags(**flags) -> None:
    """Refuse on/off options that are not True or False: any other value would be taken by its truth, and "no"
    is true. (An optional flag's None is for the caller to leave out.)"""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_guidance(guidance) -> None:
    """Refuse a guidance scale that is not a finite number (None: the default)."""
    if guidance is not None and not (is_number(guidance) and math.isfinite(guidance)):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn` pointed at the first line outside this package (and outside torch's decorators, which wrap
    its entry points): the user's call, whichever entry point it went through."""
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("p2p_engine",
                                                                                                   "torch"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
