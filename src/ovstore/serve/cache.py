"""Pages of recently shown images, their prepared queries laid side by side: one engine pass
per layer answers a page. The per-image cache they are built from is the analysis engine's
:class:`~ovstore.analyze.QueryCache`, which the viewer's plan reads through."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..analyze import QueryCache, prepared_bytes

__all__ = ["PageBatches", "QueryCache", "prepared_bytes"]


class PageBatches:
    """The prepared queries of whole pages of images laid side by side on the pixel axis, per
    layer ``(head, channel, step * image * pixel)``: one pass of the engine per layer answers a
    page (the token softmax is per pixel, so images are just more pixels). Built from
    ``read(image)`` (a plan's cached reads, :meth:`~ovstore.analyze.MapPlan.read`); the most recent
    ``max_pages`` pages of at most ``max_bytes`` in all."""

    def __init__(self, read: Callable[[int], dict[str, Any]], *, max_pages: int = 2,
                 max_bytes: int = 512 * 2**20) -> None:
        self.read = read
        self.max_pages = int(max_pages)
        self.max_bytes = int(max_bytes)
        self._pages: OrderedDict[tuple[int, ...], tuple[dict[str, Any], int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, images: tuple[int, ...]) -> dict[str, Any] | None:
        """The page's batched queries, or None when the page is larger than ``max_bytes``."""
        import torch

        from ..analyze import PreparedQueries

        images = tuple(int(i) for i in images)
        with self._lock:
            entry = self._pages.get(images)
            if entry is not None:
                self._pages.move_to_end(images)
                return entry[0]
        per_image = [self.read(i) for i in images]
        size = sum(prepared_bytes(p) for p in per_image)
        if size > self.max_bytes:
            return None
        batched = {}
        for name in per_image[0]:
            parts = [p[name] for p in per_image]
            heads, channels, _ = parts[0].data.shape
            steps, pixels = parts[0].steps, parts[0].pixels
            data = torch.stack([q.data.view(heads, channels, steps, pixels) for q in parts], dim=3)
            batched[name] = PreparedQueries(data.reshape(heads, channels, steps * len(parts) * pixels), steps,
                                            len(parts) * pixels, max(q.max_norm for q in parts))
        with self._lock:
            self._pages[images] = (batched, size)
            self._pages.move_to_end(images)
            total = sum(s for _, s in self._pages.values())
            while len(self._pages) > 1 and (len(self._pages) > self.max_pages or total > self.max_bytes):
                _, (_, dropped) = self._pages.popitem(last=False)
                total -= dropped
        return batched

