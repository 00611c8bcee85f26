"""Turning command-line prompts, prompt files and JSONL into per-image generation requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidInputError
from ..store.format import ImageRecord

__all__ = ["read_prompts_file", "build_requests", "PromptSpec"]

#: ``(prompt, negative_prompt or None, seed or None)`` as read from the user.
PromptSpec = tuple[str, str | None, int | None]


def read_prompts_file(path: str | Path) -> list[PromptSpec]:
    """Read one prompt per line, or JSONL objects with ``prompt``, ``negative_prompt``, ``seed``.

    Blank lines and lines starting with ``#`` are skipped. Errors name the line number.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidInputError(f"prompts file {path} does not exist; check the --prompts-file path") from None
    except IsADirectoryError:
        raise InvalidInputError(f"prompts file {path} is a directory; pass a text or JSONL file") from None
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"prompts file {path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise InvalidInputError(f"prompts file {path} cannot be read ({exc.strerror or exc}); check the path "
                                "and its permissions") from None
    specs: list[PromptSpec] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("{"):
            specs.append(_parse_json_line(text, path, number))
        else:
            specs.append((text, None, None))
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
    negative = obj.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise InvalidInputError(f"{where}: \"negative_prompt\" must be a string")
    seed = obj.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidInputError(f"{where}: \"seed\" must be a non-negative integer")
    return (prompt, negative, seed)


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
    records = []
    for i, (prompt, negative, own_seed) in enumerate(specs):
        if not prompt.strip():
            raise InvalidInputError(f"prompt {i} is empty; give every image a prompt")
        records.append(ImageRecord(
            prompt=prompt,
            negative_prompt=negative if negative is not None else (negative_prompt or ""),
            seed=own_seed if own_seed is not None else seed + i,
            guidance=float(guidance),
            num_inference_steps=int(num_inference_steps),
        ))
    return records
