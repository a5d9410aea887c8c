"""Command-line pieces every script shares; standard library only (sweep/summarize/plot import it
without torch).

- `ArgParser`: argparse whose errors are one line `error: ...` (exit code 2); negative numbers in
  scientific notation (`--alpha0 -1e-3`) are values, not options; a `type=float` flag refuses
  nan and +-inf (unless its default is infinite: then inf is a meaningful setting).
- `UsageError`: bad input; `error_line(e)` is its one line.
- `check_number` / `require_finite`: the range check of a numeric flag, naming the flag.
- `duration_seconds`: "D-HH:MM:SS", "HH:MM:SS", "MM:SS", "D-HH[:MM]" or a bare number (seconds
  for --max-time, minutes for SLURM's --time).
"""

from __future__ import annotations

import argparse
import math
import re
import sys

__all__ = ["ArgParser", "UsageError", "check_number", "duration_seconds", "error_line", "first_line", "flag_name",
           "parse_max_time", "require_finite"]

TIME_FORMATS = '"HH:MM:SS", "D-HH:MM:SS", "MM:SS" or a number of seconds'


class UsageError(Exception):
    """Bad input (a flag, a file, a folder): printed as one `error: ...` line, exit code 2."""


def error_line(exc: BaseException) -> str:
    """`error: <message on one line>` for an exception that stands for bad input."""
    return "error: " + (" ".join(str(exc).split()) or type(exc).__name__)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries such as torch write several), or its type."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def flag_name(dest: str) -> str:
    """argparse dest -> the flag as typed: "weight_decay_base" -> "--weight-decay-base"."""
    return dest if dest.startswith("-") else "--" + dest.replace("_", "-")


# --------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------


def check_number(value, flag: str, *, low=None, high=None, low_open=False, high_open=False, integer=False,
                 allow_inf=False) -> float:
    """`value` as a number within [low, high] (open ends as asked), else ValueError naming `flag`.

    nan is always refused, +-inf unless `allow_inf`. `flag` is the flag as typed or an argparse dest.
    """
    flag = flag_name(flag)
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{flag} must be {'an integer' if integer else 'a number'}, got {value!r}") from None
    if integer and number != value:
        raise ValueError(f"{flag} must be an integer, got {value!r}")
    if math.isnan(number) or (math.isinf(number) and not allow_inf):
        raise ValueError(f"{flag} must be a finite number, got {value!r}")
    bad = (low is not None and (number < low or (low_open and number == low))) or \
          (high is not None and (number > high or (high_open and number == high)))
    if bad:
        lo = "(-inf, " if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"{flag} must be in {lo}{hi}, got {value!r}")
    return number


def require_finite(value, flag: str) -> float:
    """`value` as a float; ValueError naming `flag` for nan, +-inf or a non-number."""
    return check_number(value, flag)


# --------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------


def duration_seconds(text, bare_unit: float = 1.0, decimals: bool = True) -> float:
    """Seconds of "D-HH:MM:SS", "D-HH:MM", "D-HH", "HH:MM:SS", "MM:SS" or a bare number (times
    `bare_unit`: 1 for --max-time's seconds, 60 for SLURM's minutes). Minutes and seconds after
    the first field are below 60; `decimals=False` accepts whole numbers only (SLURM's --time).
    ValueError when unreadable."""
    num = r"\d+(?:\.\d*)?" if decimals else r"\d+"
    m = re.fullmatch(rf"(?:(\d+)-)?({num})(?::({num}))?(?::({num}))?", str(text).strip())
    if not m:
        raise ValueError(f"cannot read the duration {text!r}")
    days, a, b, c = m.groups()
    a, b, c = float(a), (float(b) if b else None), (float(c) if c else None)
    if any(x is not None and x >= 60 for x in (b, c)):
        raise ValueError(f"cannot read the duration {text!r}: minutes and seconds must be below 60")
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * bare_unit


def parse_max_time(text) -> float | None:
    """--max-time in seconds ({TIME_FORMATS}); None when unset ("", "none", "inf", "unlimited")."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        if str(text).strip().lower() in ("", "none", "inf", "infinite", "unlimited"):
            return None
        try:
            seconds = duration_seconds(text)
        except ValueError:
            raise ValueError(f"--max-time: cannot read {text!r}; use {TIME_FORMATS}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"--max-time must be a positive duration, got {text!r}; use {TIME_FORMATS}")
    return seconds


# --------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------

# "-1", "-.5", "-1e-3", "-2.5E+4", "-inf": values, not options (argparse alone knows only the first
# two; the finite check then names the flag of a "-inf")
_NEGATIVE_NUMBER = re.compile(r"^-(?:(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


class ArgParser(argparse.ArgumentParser):
    """argparse with errors as one line `error: ...` on stderr (exit code 2), defaults shown in
    --help, negative numbers in scientific notation read as values, and non-finite floats refused."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.type is not float or not hasattr(namespace, action.dest):
                continue
            default_inf = isinstance(action.default, float) and math.isinf(action.default)
            values = getattr(namespace, action.dest)
            for value in values if isinstance(values, (list, tuple)) else [values]:
                if isinstance(value, float) and not (math.isfinite(value) or (default_inf and value > 0)):
                    self.error(f"argument {'/'.join(action.option_strings) or action.dest}: "
                               f"must be a finite number, got {value}")
        return namespace, extras
