"""Human durations in config files: "20m", "90s", "1h30m", "250ms", or a number of seconds."""

import math
import re
from typing import Annotated

from pydantic import AllowInfNan, BeforeValidator

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds in `value`; raises ValueError with the accepted forms when it is not a duration.

    Only finite seconds, zero or more: `nan` and `inf` parse as floats, and used to pass (`idle_timeout: nan`
    meant never, an upstream timeout of nan failed every request); tests/unit/config/test_config_files.py."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 20m or 1h30m, not a boolean")
    if isinstance(value, int | float):
        return _seconds(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 90s, 20m or 1h30m, got {type(value).__name__}")
    text = value.strip().lower().replace(" ", "")
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return _seconds(number)
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{value!r} is not a duration; use e.g. 90s, 20m, 1h30m, 250ms or seconds")
    return _seconds(total)


def _seconds(value: float) -> float:
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond a float's range
        raise ValueError("a duration must be a finite number of seconds; this one is too large") from None
    if not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, not {seconds}")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration), AllowInfNan(False)]
"""Seconds, finite and zero or more, written in config as a number or as "20m", "90s", "1h30m"."""


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"
