"""Input hygiene in one place: the text files users write and the numbers they type.

Every reader of a user's text or JSON-lines file goes through :func:`read_text` /
:func:`read_lines`, so a byte-order mark (any file saved by Notepad) never becomes part of the
first line, Windows line ends never end up in a prompt, and a file that is not UTF-8 gets a
one-line error naming the line. Numeric options are checked here too (with the valid range
named), so that the Python API refuses the same values as the command line.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

__all__ = [
    "Line",
    "read_text",
    "read_lines",
    "parse_names",
    "read_names_file",
    "check_int",
    "check_float",
    "check_seed",
    "SEED_MAX",
    "available_memory",
    "check_memory",
    "human_bytes",
]

_BOM = "\ufeff"
#: Seeds are stored as int64 and passed to ``torch.Generator.manual_seed``.
SEED_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Line:
    """One non-blank line of a user's file, with its 1-based line number in that file."""

    number: int
    text: str


def read_text(path: str | Path, what: str) -> str:
    """The text of a user's file: UTF-8 (a leading byte-order mark is dropped), with ``\\r\\n``
    and lone ``\\r`` line ends made ``\\n``.

    ``what`` names the file in errors (``"--prompts-file"``, ``"prompts file"``...).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise InvalidInputError(f"{what} {path} is a directory; pass a text file") from None
    except OSError as exc:
        raise InvalidInputError(f"{what} {path} cannot be read ({exc.strerror or exc}); check the path and "
                                "its permissions") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InvalidInputError(f"{what} {path} is UTF-16 text; save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InvalidInputError(f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                                "save the file as UTF-8") from None
    if text.startswith(_BOM):
        text = text[1:]
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise InvalidInputError(f"{what} {path}, line {line}: contains a NUL character (a binary file?); "
                                "pass a text file")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_lines(path: str | Path, what: str, *, comments: bool = True) -> list[Line]:
    """The non-blank lines of a user's file, stripped, each with its original line number.

    Only ``\\n`` ends a line (not the form feeds and Unicode separators that
    ``str.splitlines`` also splits at, which would shift the numbers). With ``comments``,
    lines starting with ``#`` are skipped too.
    """
    lines = []
    for number, raw in enumerate(read_text(path, what).split("\n"), start=1):
        text = raw.strip()
        if text and not (comments and text.startswith("#")):
            lines.append(Line(number, text))
    return lines


def parse_names(text: str, what: str) -> tuple[str, ...]:
    """Comma-separated names (``"cat,dog"``); an empty name (``"a,,b"``, a trailing comma) is an
    error, because dropping it would shift the ids of the names after it."""
    parts = [p.strip() for p in text.split(",")]
    for k, part in enumerate(parts, start=1):
        if not part:
            raise InvalidInputError(f"{what} {text!r}: name {k} is empty; write names separated by single "
                                    "commas, e.g. cat,dog,person")
    return tuple(parts)


def read_names_file(path: str | Path, what: str) -> tuple[str, ...]:
    """One name per line (ids follow the line order). A blank line between names is an error
    naming the line, since skipping it would shift the ids after it; blank lines at the
    end and ``#`` comments are ignored."""
    lines = read_text(path, what).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for number, raw in enumerate(lines, start=1):
        name = raw.strip()
        if name.startswith("#"):
            continue
        if not name:
            raise InvalidInputError(f"{what} {path}, line {number} is blank; write one name per line "
                                    "(ids follow the order) without blank lines")
        names.append(name)
    if not names:
        raise InvalidInputError(f"{what} {path} names nothing; write one name per line")
    return tuple(names)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value: object, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]`` (either bound may be open: None)."""
    if not _is_int(value):
        raise InvalidInputError(f"{name} {value!r} must be an integer")
    value = int(value)  # type: ignore[arg-type]
    if (low is not None and value < low) or (high is not None and value > high):
        raise InvalidInputError(f"{name} {value} is out of range; valid: {_range(low, high)}")
    return value


def check_float(value: object, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float within the bounds (``low_open``: ``low`` itself excluded)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{name} {value!r} must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} {value} must be a finite number; valid: {_range(low, high, low_open, high_open)}")
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        raise InvalidInputError(f"{name} {value:g} is out of range; valid: {_range(low, high, low_open, high_open)}")
    return value


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{low} {'<' if low_open else '<='} value {'<' if high_open else '<='} {high}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return "any finite number"


def check_seed(seed: object, name: str = "seed") -> int:
    """A generator seed: an integer in 0..2**63-1 (stored as int64, given to
    ``torch.Generator.manual_seed``)."""
    if not _is_int(seed):
        raise InvalidInputError(f"{name} {seed!r} must be an integer in 0..{SEED_MAX}")
    if not 0 <= int(seed) <= SEED_MAX:  # type: ignore[arg-type]
        raise InvalidInputError(f"{name} {seed} is out of range; valid: 0..{SEED_MAX} (2**63 - 1)")
    return int(seed)  # type: ignore[arg-type]


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable; total memory elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 2**62


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def check_memory(nbytes: int, what: str, fix: str) -> None:
    """Refuse, before allocating, an array of ``nbytes`` that does not fit the memory available
    now; the error names the estimate and ``fix``."""
    free = available_memory()
    if nbytes > free:
        raise InvalidInputError(f"{what} would take about {human_bytes(nbytes)} of memory, more than the "
                                f"{human_bytes(free)} available; {fix}")

