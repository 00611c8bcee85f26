"""``ovstore images``: the stored images as PNG files, under the output discipline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .outputs import open_output
from .store import Store, open_store

__all__ = ["ImagesResult", "write_images"]


@dataclass(frozen=True)
class ImagesResult:
    """Images written (``00000.png``, ...) into ``out`` and damaged images skipped."""

    out: Path
    written: tuple[int, ...]
    damaged: tuple[int, ...]


def write_images(store: Store | str | Path, out: str | Path, *, overwrite: bool = False) -> ImagesResult:
    """Write every complete image of ``store`` as ``out/NNNNN.png``; damaged images are
    skipped (listed in the result). The folder is built aside and
    published complete; an existing one is replaced only with ``overwrite``."""
    from PIL import Image

    s = store if isinstance(store, Store) else open_store(store)
    target = open_output(out, "images", kind="dir", inputs=[s.path], overwrite=overwrite)
    written, damaged = [], []
    with target.writing(marker=False) as tmp:  # recognised by its names: nothing but NNNNN.png
        for i in s.complete_images():
            try:
                picture = s.image(i)
            except StoreError:
                damaged.append(i)
                continue
            Image.fromarray(picture).save(tmp / f"{i:05d}.png")
            written.append(i)
    return ImagesResult(target.path, tuple(written), tuple(damaged))
