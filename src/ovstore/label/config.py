"""Labelling settings: classes, how their maps are made, and how masks are refined."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "LabelConfig", "MODES", "NORMALIZATIONS", "DEFAULT_SWEEP", "label_config", "parse_class_thresholds", "parse_sweep",
]

MODES = ("separate", "compete")
NORMALIZATIONS = ("minmax", "max")
#: Default DiffuMask sweep (min-max normalised maps): 0.5, 0.55, ..., 0.95, chosen with the default
#: threshold on a toy-world calibration set (lower sweeps pick lower thresholds and label more).
DEFAULT_SWEEP = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))


@dataclass(frozen=True)
class LabelConfig:
    """How an image's class maps become a semantic label mask.

    Parameters
    ----------
    classes
        Class names, numbered from 1 in this order (0 is background, 255 ignore).
    prompt_template
        Sentence of a class word (``{}``); its class-word tokens give the class map.
    tokens
        Learned token files by class name; those classes use the token instead of the word.
    mode
        ``separate``: every class is its own attribution (its own softmax);
        ``compete``: all classes share one softmax (start-of-text + every class), so a pixel's
        attention is divided between them.
    normalize
        How each class map of an image is brought to [0, 1] before thresholding:
        ``minmax`` (default): ``(map - min) / (max - min)``; ``max``: ``map / max``, the
        reference protocol of OVAM/DAAM. They differ by the map's floor: on the toy-world
        model a class map's minimum is about two thirds of its maximum, so under ``max`` any
        threshold up to about 0.6 labels nearly the whole image. In ``compete`` mode each class is still
        normalised on its own, after the joint softmax.
    threshold
        Default threshold on the normalised maps (0.6: chosen on a toy-world calibration set
        disjoint from the benchmark's evaluation set, see BENCHMARKS.md; DAAM-style
        evaluations of Stable Diffusion use ``normalize="max"`` with about 0.4).
    class_thresholds
        Per-class thresholds overriding ``threshold``.
    adaptive
        DiffuMask-style adaptive threshold per class and image: sweep ``sweep`` and keep the
        threshold where the mask area is most stable (see ``refine.adaptive_threshold``).
    sweep
        Thresholds tried by ``adaptive`` (at least two distinct values in (0, 1); sorted).
    crf
        DenseCRF refinement (needs the ``crf`` extra: ``pip install 'ovstore[crf]'``). Its
        unary comes from each class's margin over its threshold, so per-class and adaptive
        thresholds still decide what is labelled; the pairwise terms align the labels with
        the image's colour edges.
    min_component
        Connected class regions smaller than this many pixels become background.
    prompt_classes_only
        Only classes whose name appears in the image's generation prompt may be labelled.
    """

    classes: tuple[str, ...]
    prompt_template: str = "a photograph of a {}"
    tokens: dict[str, Path] = field(default_factory=dict)
    mode: str = "separate"
    normalize: str = "minmax"
    threshold: float = 0.6
    class_thresholds: dict[str, float] = field(default_factory=dict)
    adaptive: bool = False
    sweep: tuple[float, ...] = DEFAULT_SWEEP
    crf: bool = False
    min_component: int = 0
    prompt_classes_only: bool = False

    def __post_init__(self) -> None:
        classes = tuple(c.strip() for c in self.classes)
        if not classes or any(not c for c in classes):
            raise InvalidInputError("--classes needs non-empty class names, e.g. --classes cat,dog,person")
        bad = [c for c in classes if ":" in c or any(ord(ch) < 32 for ch in c)]
        if bad:
            raise InvalidInputError(f"class name {bad[0]!r} has ':' or a control character, which labelmap.txt "
                                    "(NAME:R,G,B::) cannot hold; rename the class")
        if len(set(classes)) != len(classes):
            raise InvalidInputError(f"--classes has duplicates: {', '.join(classes)}")
        if len(classes) > 254:
            raise InvalidInputError("at most 254 classes fit an 8-bit label PNG (0 background, 255 ignore)")
        object.__setattr__(self, "classes", classes)
        if "{}" not in self.prompt_template:
            raise InvalidInputError(f"--prompt-template {self.prompt_template!r} needs {{}} for the class word")
        if self.mode not in MODES:
            raise InvalidInputError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        for name in list(self.tokens) + list(self.class_thresholds):
            if name not in classes:
                raise InvalidInputError(f"{name!r} has a token or threshold but is not in --classes")
        if self.normalize not in NORMALIZATIONS:
            raise InvalidInputError(f"--normalize {self.normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
        sweep = tuple(sorted(float(t) for t in self.sweep))
        if len(set(sweep)) < 2:
            raise InvalidInputError(f"--sweep needs at least two different thresholds, got {list(self.sweep)}")
        if len(set(sweep)) != len(sweep):
            raise InvalidInputError(f"--sweep has duplicates: {list(self.sweep)}")
        object.__setattr__(self, "sweep", sweep)
        for t in [self.threshold, *self.class_thresholds.values(), *self.sweep]:
            if not 0 < t < 1:
                raise InvalidInputError(f"threshold {t} must lie between 0 and 1 (maps are normalised to [0, 1])")
        if self.min_component < 0:
            raise InvalidInputError("--min-component must be >= 0")

    def threshold_of(self, name: str) -> float:
        return self.class_thresholds.get(name, self.threshold)

    def describe(self) -> dict[str, object]:
        """Settings recorded with every labelled image (provenance)."""
        return {
            "classes": list(self.classes), "prompt_template": self.prompt_template,
            "tokens": {k: str(v) for k, v in self.tokens.items()}, "mode": self.mode,
            "normalize": self.normalize, "threshold": self.threshold, "class_thresholds": dict(self.class_thresholds),
            "adaptive": self.adaptive, "sweep": list(self.sweep) if self.adaptive else None,
            "crf": self.crf, "min_component": self.min_component,
            "prompt_classes_only": self.prompt_classes_only,
        }


def parse_sweep(text: str) -> tuple[float, ...]:
    """``--sweep``: ``"0.5,0.6,0.7"`` or ``"START:STOP:STEP"`` (STOP included)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            count = int(np.floor((stop - start) / step + 1e-9)) + 1
            return tuple(round(start + k * step, 6) for k in range(count))
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidInputError(f"--sweep {text!r}: write A,B,C or START:STOP:STEP with STEP > 0, "
                                "e.g. 0.3:0.9:0.05") from None


def parse_class_thresholds(items: Mapping[str, float] | Sequence[str] | None) -> dict[str, float]:
    """Per-class thresholds from ``{"cat": 0.5}`` or ``["cat=0.5", ...]`` (``--class-threshold``)."""
    if isinstance(items, Mapping):
        return {str(k): float(v) for k, v in items.items()}
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidInputError(f"--class-threshold {item!r}: write CLASS=VALUE, e.g. cat=0.5")
    return out


def label_config(
    *,
    classes: str | Sequence[str] | None = None,
    classes_file: str | Path | None = None,
    tokens: Sequence[str | Path] = (),
    class_thresholds: Mapping[str, float] | Sequence[str] | None = None,
    adaptive: bool = False,
    sweep: str | Sequence[float] | None = None,
    **settings,
) -> LabelConfig:
    """The :class:`LabelConfig` of ``ovstore label``'s options: class names from ``classes``
    (comma-separated or a list), then ``classes_file`` (one per line), then the names of the
    learned ``tokens`` files not yet among them; ``settings`` are the other fields."""
    from ..inputs import parse_names, read_names_file

    if isinstance(classes, str):
        names = list(parse_names(classes, "--classes"))
    else:
        names = list(classes or ())
    if classes_file is not None:
        names += read_names_file(classes_file, "--classes-file")
    if sweep is not None and not adaptive:
        raise InvalidInputError("--sweep sets the thresholds tried by --adaptive; add --adaptive")
    by_name: dict[str, str | Path] = {}
    if tokens:
        from ..optimize import load_token

        by_name = {load_token(t).name: t for t in tokens}
    for name in by_name:
        if name not in names:
            names.append(name)
    thresholds = parse_class_thresholds(class_thresholds)
    if isinstance(sweep, str):
        settings["sweep"] = parse_sweep(sweep)
    elif sweep is not None:
        settings["sweep"] = tuple(sweep)
    return LabelConfig(classes=tuple(names), tokens=by_name, class_thresholds=thresholds, adaptive=adaptive,
                       **settings)
