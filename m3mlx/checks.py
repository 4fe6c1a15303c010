"""What every entry point checks its input against: the error bad input raises, text that
must be valid UTF-8, and the range of every generation option.

Every exception class m3mlx defines (InputError, ConfigError, LoadError, ConvertError, ...)
means "the input was wrong, and the message says what to do"; the command line prints such
errors as one line. Anything else escaping m3mlx is a bug.
"""

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence


class InputError(ValueError):
    """A bad argument or file: what was wrong and what to do about it."""


def check_text(text: str, what: str) -> str:
    """`text` unless it holds characters that are not Unicode scalar values: the lone
    surrogates Python uses for bytes that were not UTF-8 (argv, files read with
    surrogateescape). They cannot be tokenized or saved, so they are refused here, by name."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (undecodable byte at character "
                         f"{e.start}); convert it to UTF-8 first, e.g. with iconv") from None
    return text


def parse_json(text, **options) -> Any:
    """json.loads for text m3mlx did not write (a checkpoint's files, the metadata of a cache or
    session file, tool-call arguments). JSON nested deeper than Python's parser follows raises
    RecursionError there; here it is a ValueError like any other bad JSON, so every caller's
    `except ValueError` turns it into its own one-line message."""
    try:
        return json.loads(text, **options)
    except RecursionError:
        raise ValueError("the JSON nests too deeply to be read") from None


@dataclass(frozen=True)
class Range:
    """The values a generation option takes: an int or a finite number between two bounds."""

    kind: type  # int or float
    low: float
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None is allowed (and means "not set")

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        low, high = (str(self.kind(b)) if self.kind is int else f"{b:g}"
                     for b in (self.low, self.high or 0))
        if self.high is None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        return (f"{what} in {'(' if self.low_open else '['}{low}, {high}"
                f"{')' if self.high_open else ']'}")

    def check(self, name: str, value: Any):
        """`value` as an int or float, or InputError naming the option and its range."""
        if value is None and self.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
                self.kind is int and not isinstance(value, numbers.Integral)):
            raise InputError(f"{name}={value!r}: must be {self.describe()}")
        value = int(value) if self.kind is int else float(value)
        below = value <= self.low if self.low_open else value < self.low
        above = self.high is not None and (value >= self.high if self.high_open
                                           else value > self.high)
        if not math.isfinite(value) or below or above:
            raise InputError(f"{name}={value!r}: must be {self.describe()}")
        return value


# Every generation option and the values it takes: the Python API (m3mlx.generate), session
# files and the command-line options (cli/options.py builds its types from this table).
OPTION_RANGES = {
    "max_tokens": Range(int, 0),
    "temperature": Range(float, 0),
    "top_p": Range(float, 0, 1, low_open=True),
    "top_k": Range(int, 0),
    "min_p": Range(float, 0, 1, high_open=True),
    "repetition_penalty": Range(float, 0, low_open=True),
    "repetition_context_size": Range(int, 1),
    "seed": Range(int, 0, 2**64 - 1, optional=True),  # what mx.random.key takes
    "prefill_step_size": Range(int, 1),
}


def check_option(name: str, value: Any):
    """The checked value of generation option `name`; InputError when it is out of range."""
    return OPTION_RANGES[name].check(name, value)


def check_stop_strings(stop_strings: Sequence[str]) -> List[str]:
    if isinstance(stop_strings, str) or not isinstance(stop_strings, (list, tuple)):
        raise InputError(f"stop_strings must be a list of strings, got {stop_strings!r}")
    for s in stop_strings:
        check_text(s, "a stop string")
        if not s:
            raise InputError("a stop string is empty: it would match before the first token; "
                             "remove it")
    return list(stop_strings)

