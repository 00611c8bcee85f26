"""Turning command-line prompts, prompt files and JSONL into per-image generation requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidInputError
from ..inputs import SEED_MAX, check_seed, read_lines
from ..store import ImageRecord

__all__ = ["read_prompts_file", "build_requests", "PromptSpec"]

#: ``(prompt, negative_prompt or None, seed or None)`` as read from the user.
PromptSpec = tuple[str, str | None, int | None]


def read_prompts_file(path: str | Path) -> list[PromptSpec]:
    """Read one prompt per line, or JSONL objects with ``prompt``, ``negative_prompt``, ``seed``.

    Blank lines and lines starting with ``#`` are skipped; a byte-order mark and Windows line
    ends are dropped (:func:`ovstore.inputs.read_lines`). Errors name the line number.
    """
    path = Path(path)
    specs: list[PromptSpec] = []
    for line in read_lines(path, "prompts file"):
        if line.text.startswith("{"):
            specs.append(_parse_json_line(line.text, path, line.number))
        else:
            specs.append((line.text, None, None))
    if not specs:
        raise InvalidInputError(f"prompts file {path} has no prompt (one per line, or JSONL)")
    return specs


def _parse_json_line(text: str, path: Path, number: int) -> PromptSpec:
    where = f"{path}, line {number}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where}: invalid JSON ({exc.msg}); write {{\"prompt\": \"...\"}}") from None
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: expected a JSON object with a \"prompt\" key")
    unknown = set(obj) - {"prompt", "negative_prompt", "seed"}
    if unknown:
        raise InvalidInputError(
            f"{where}: unknown keys {sorted(unknown)}; allowed: prompt, negative_prompt, seed"
        )
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidInputError(f"{where}: \"prompt\" must be a non-empty string")
    return (prompt, *line_options(obj, where))


def line_options(obj: dict, where: str) -> tuple[str | None, int | None]:
    """A JSON line's optional ``negative_prompt`` and ``seed`` (prompts and images files alike),
    checked; ``where`` names the line in errors."""
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InvalidInputError(f"{where}: \"negative_prompt\" must be a string")
    seed = obj.get("seed")
    if seed is not None:
        check_seed(seed, f"{where}: \"seed\"")
    return negative, seed


def build_requests(
    specs: Sequence[PromptSpec],
    *,
    seed: int = 0,
    negative_prompt: str | None = None,
    guidance: float = 7.5,
    num_inference_steps: int = 50,
) -> list[ImageRecord]:
    """One :class:`ImageRecord` per prompt: image ``i`` gets seed ``seed + i`` unless its
    line names one, and the run's negative prompt unless its line names one."""
    if not specs:
        raise InvalidInputError("no prompt given; pass --prompt TEXT or --prompts-file FILE")
    check_seed(seed, "--seed")
    records = []
    for i, (prompt, negative, own_seed) in enumerate(specs):
        if not prompt.strip():
            raise InvalidInputError(f"prompt {i} is empty; give every image a prompt")
        if own_seed is None and seed + i > SEED_MAX:
            raise InvalidInputError(f"--seed {seed} gives image {i} the seed {seed + i}, beyond the largest "
                                    f"seed {SEED_MAX} (2**63 - 1); start from a smaller --seed")
        if own_seed is not None:
            check_seed(own_seed, f"the seed of prompt {i}")
        records.append(ImageRecord(
            prompt=prompt,
            negative_prompt=negative if negative is not None else (negative_prompt or ""),
            seed=own_seed if own_seed is not None else seed + i,
            guidance=float(guidance),
            num_inference_steps=int(num_inference_steps),
        ))
    return records
