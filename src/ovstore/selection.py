"""Layer and step selection shared by capture and analysis.

Both sides select layers by module-path pattern and by resolution, and UNet calls by
index specification; keeping the parsing in one place keeps the two sides consistent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError

__all__ = ["LayerSelection", "parse_index_spec", "parse_resolution", "resolve_indices"]


def parse_resolution(text: str | int) -> tuple[int, int]:
    """Parse ``"16"``, ``16`` or ``"16x24"`` into ``(height, width)``."""
    if isinstance(text, int):
        return (text, text)
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) == 2:
        return (values[0], values[1])
    raise InvalidInputError(
        f"resolution {text!r} is not understood; write it as 16 or 16x16 (height x width)"
    )


@dataclass(frozen=True, slots=True)
class LayerSelection:
    """Which cross-attention layers to use.

    Parameters
    ----------
    patterns
        fnmatch patterns matched against the diffusers module path
        (``up_blocks.*``, ``*attentions.0*``); empty means every layer.
    resolutions
        ``(h, w)`` resolutions to keep; empty means every resolution.
    include_mid
        Whether the mid-block layers are kept when no pattern names them.
    """

    patterns: tuple[str, ...] = ()
    resolutions: tuple[tuple[int, int], ...] = ()
    include_mid: bool = True

    def select(self, layers: Sequence[tuple[str, tuple[int, int]]]) -> list[str]:
        """Return the names of ``(name, (h, w))`` layers that match, in the given order."""
        names = [n for n, _ in layers]
        for pattern in self.patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise InvalidInputError(
                    f"layer pattern {pattern!r} matches no cross-attention layer; "
                    f"available layers: {', '.join(names)}"
                )
        available = sorted({hw for _, hw in layers})
        for hw in self.resolutions:
            if hw not in available:
                shown = ", ".join(f"{h}x{w}" for h, w in available)
                raise InvalidInputError(
                    f"no cross-attention layer has resolution {hw[0]}x{hw[1]}; available: {shown}"
                )
        chosen = []
        for name, hw in layers:
            if self.patterns:
                if not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                    continue
            elif not self.include_mid and name.startswith("mid_block"):
                continue
            if self.resolutions and hw not in self.resolutions:
                continue
            chosen.append(name)
        if not chosen:
            raise InvalidInputError(
                "the layer selection keeps no layer; loosen the patterns or resolutions "
                f"(available: {', '.join(names)})"
            )
        return chosen


def parse_index_spec(spec: str | Iterable[int] | None) -> tuple[str, ...] | None:
    """Normalise an index specification such as ``"0:10:2,15,-1"``.

    Returns the comma-separated parts, validated but not yet resolved against a length
    (the number of UNet calls is only known once the scheduler is set up).
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        items = list(spec)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in items):
            raise InvalidInputError(f"index list {items!r} must hold integers, e.g. [0, 5, -1]")
        return tuple(str(int(i)) for i in items)
    parts = tuple(p.strip() for p in spec.split(","))
    if not any(parts):
        raise InvalidInputError(f"empty index specification {spec!r}; write e.g. 0:10,20,-1")
    if not all(parts):
        raise InvalidInputError(f"index specification {spec!r} has an empty part (two commas in a row or a "
                                "trailing comma); write e.g. 0:10,20,-1")
    for part in parts:
        try:
            fields = [int(x) if x.strip() else None for x in part.split(":")]
        except ValueError:
            raise InvalidInputError(
                f"index specification part {part!r} is not an integer or a start:stop:step "
                "slice; write e.g. 0:10,20,-1"
            ) from None
        if len(fields) > 3:
            raise InvalidInputError(f"index specification part {part!r} has too many ':'; write start:stop:step")
        if len(fields) == 3 and fields[2] == 0:
            raise InvalidInputError(f"index specification part {part!r} has step 0; the step of start:stop:step "
                                    "must be a non-zero integer (e.g. 0:10:2, or ::-1 backwards)")
    return parts


def resolve_indices(spec: tuple[str, ...] | None, length: int, what: str = "step") -> list[int]:
    """Resolve a parsed specification against ``length`` into sorted unique indices."""
    if spec is None:
        return list(range(length))
    chosen: set[int] = set()
    for part in spec:
        if ":" in part:
            fields = [int(x) if x else None for x in part.split(":")]
            chosen.update(range(length)[slice(*fields)])
        else:
            i = int(part)
            if not -length <= i < length:
                raise InvalidInputError(
                    f"{what} index {i} is out of range: there are {length} {what}s "
                    f"(valid: 0..{length - 1}, or negative from the end)"
                )
            chosen.add(i % length)
    if not chosen:
        raise InvalidInputError(f"the {what} selection {','.join(spec)} keeps no {what}")
    return sorted(chosen)
