"""The one set of input checks used everywhere (library, configs, tasks, training loop).

Every error names the field, the value it got and what is allowed, so a typo fails in
milliseconds with a message a user can act on, instead of after a model download.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def check_choice(field: str, value, allowed: Iterable) -> None:
    """``value`` must be one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{field} must be one of {allowed}, got {field}={value!r}")


def check_int(field: str, value, minimum: int = 1, allow_none: bool = False) -> None:
    """``value`` must be an integer ≥ ``minimum`` (a bool is not an integer here), or None if allowed."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        expected = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{field} must be {expected}{' or null' if allow_none else ''}, got {field}={value!r}")


def check_bool(field: str, value) -> bool:
    """``value`` must be a boolean (``true``/``false``): ``"no"`` or ``"abc"`` are refused, never read
    as truthy strings."""
    if not isinstance(value, bool):
        raise ValueError(f"{field} must be true or false, got {field}={value!r}")
    return value


def check_float(field: str, value, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, allow_none: bool = False) -> float:
    """``value`` must be a finite number in the interval given (open ends with ``*_open``); returns it as float."""
    if value is None and allow_none:
        return value
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else format(low, 'g')}, {'inf' if high is None else format(high, 'g')}{hi}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok = (not isinstance(value, bool) and math.isfinite(number)
          and (low is None or (number > low if low_open else number >= low))
          and (high is None or (number < high if high_open else number <= high)))
    if not ok:
        raise ValueError(f"{field} must be a finite number in {interval}{' or null' if allow_none else ''}, "
                         f"got {field}={value!r}")
    return number


def check_known_fields(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Every key of a config section ``where`` must be a field its dataclass knows."""
    allowed = sorted(allowed)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; allowed: {allowed}")
