"""What to learn: one class per :class:`TokenTask`, from the API or a JSON-lines file."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidInputError
from ..inputs import read_lines

__all__ = ["OptimizeRequest", "TokenTask", "read_tasks_file", "tasks_from_options"]


@dataclass(frozen=True)
class TokenTask:
    """One class to learn: its init word and one or more (image, mask) pairs.

    Masks are file paths or arrays of any size; they are resized to the image size.
    """

    init_word: str
    images: tuple[int, ...]
    masks: tuple[object, ...]
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.init_word.strip():
            raise InvalidInputError("--init needs a word (the class name to start from)")
        if len(self.images) != len(self.masks) or not self.images:
            raise InvalidInputError(
                f"give one --mask per --image (got {len(self.images)} images and {len(self.masks)} masks)"
            )

    @property
    def label(self) -> str:
        return self.name or self.init_word


def read_tasks_file(path: str | Path) -> list[TokenTask]:
    """Tasks from JSON lines: ``{"init": "cat", "images": [0, 4], "masks": ["cat0.png",
    "cat4.png"], "name": "cat"}`` (``name`` optional; mask paths relative to the file).

    Errors name the line. Class names must be distinct and usable as file names, since
    each token is written to ``NAME.safetensors``.
    """
    path = Path(path)
    tasks: list[TokenTask] = []
    for number, line in ((l.number, l.text) for l in read_lines(path, "--tasks-file")):
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
            init, images, masks = item["init"], item["images"], item["masks"]
        except (json.JSONDecodeError, TypeError, KeyError, IndexError) as exc:
            raise InvalidInputError(f"{where}: expected a JSON object with init, images and masks ({exc})") from None
        if not isinstance(images, list) or not isinstance(masks, list) or \
                not all(isinstance(i, int) and not isinstance(i, bool) for i in images) or \
                not all(isinstance(m, str) and m.strip() for m in masks):
            raise InvalidInputError(f"{where}: images must be a list of image indices and masks a list of files")
        if not isinstance(init, str) or not init.strip():
            raise InvalidInputError(f"{where}: \"init\" must be a word (the class name to start from)")
        name = str(item.get("name") or init)
        if not re.fullmatch(r"[\w.+-]+", name):
            raise InvalidInputError(f"{where}: class name {name!r} cannot be a file name; use letters, digits, . _ + -")
        if any(t.label == name for t in tasks):
            raise InvalidInputError(f"{where}: class {name!r} is given twice; merge its images into one line")
        tasks.append(TokenTask(str(init), tuple(images), tuple(path.parent / m for m in masks), name=name))
    if not tasks:
        raise InvalidInputError(f"--tasks-file {path} names no class")
    return tasks


@dataclass(frozen=True)
class OptimizeRequest:
    """The classes of one ``ovstore optimize`` run and where their tokens go, checked.

    ``folder``: ``out`` is a folder of ``NAME.safetensors`` (a tasks file), else one token
    file; ``inputs`` are the paths the run reads (store, tasks file, masks), never replaced.
    """

    tasks: tuple[TokenTask, ...]
    out: Path
    folder: bool
    inputs: tuple[Path, ...]


def tasks_from_options(
    store: str | Path,
    out: str | Path,
    *,
    images: Sequence[int] = (),
    masks: Sequence[str | Path] = (),
    init: str | None = None,
    name: str | None = None,
    tasks_file: str | Path | None = None,
    overwrite: bool = False,
) -> OptimizeRequest:
    """The tasks of ``optimize``'s options, with their one-line errors: a ``tasks_file`` (one
    class per line, ``out`` a folder) or one class from ``init`` and ``images``/``masks``
    pairs (``out`` a ``.safetensors`` file), never both. ``out`` is checked here too (never an
    input; an earlier token only with ``overwrite``), before any training."""
    from ..outputs import open_output

    out = Path(out)
    if tasks_file is not None:
        if images or masks or init or name:
            raise InvalidInputError("--tasks-file names every class; drop --image/--mask/--init/--name")
        if out.suffix == ".safetensors":
            raise InvalidInputError(f"--out {out}: with --tasks-file, give a folder (one NAME.safetensors per class)")
        tasks = read_tasks_file(tasks_file)
    else:
        if not init or not images or not masks:
            raise InvalidInputError("give --init WORD with --image N --mask FILE pairs, or --tasks-file F")
        if out.suffix != ".safetensors":
            raise InvalidInputError(f"--out {out}: a token file must end in .safetensors")
        tasks = [TokenTask(init_word=init, images=tuple(images), masks=tuple(Path(m) for m in masks), name=name)]
    inputs = (Path(store), *([Path(tasks_file)] if tasks_file is not None else []),
              *[m for t in tasks for m in t.masks if isinstance(m, Path)])
    open_output(out, "optimize", kind="dir" if tasks_file is not None else "file", inputs=inputs,
                overwrite=overwrite)  # refused before the training, not after
    return OptimizeRequest(tuple(tasks), out, tasks_file is not None, inputs)
