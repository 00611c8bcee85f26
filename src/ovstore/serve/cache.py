"""The prepared queries of recently shown images, kept in memory (bounded, least recently used
evicted first): reading and laying out an image's queries costs more than its maps, so a
page of images answers a new prompt without touching the store again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["PageBatches", "QueryCache", "prepared_bytes"]


def prepared_bytes(prepared: dict[str, Any]) -> int:
    """Bytes one image's prepared queries take (``{layer: PreparedQueries}``)."""
    return sum(int(p.data.numel()) * int(p.data.element_size()) for p in prepared.values())


class QueryCache:
    """``image -> prepared queries`` of at most ``max_images`` images and ``max_bytes`` bytes
    (the most recent image is always kept, whatever its size). Thread-safe: concurrent misses
    of one image read it once."""

    def __init__(self, load: Callable[[int], dict[str, Any]], *, max_images: int = 96,
                 max_bytes: int = 2 * 2**30) -> None:
        if max_images < 1 or max_bytes < 1:
            raise ValueError("the query cache needs room for at least one image")
        self._load = load
        self.max_images = int(max_images)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[int, tuple[dict[str, Any], int]] = OrderedDict()
        self._loading: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, image: int) -> bool:
        with self._lock:
            return int(image) in self._entries

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def images(self) -> list[int]:
        """Cached images, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, image: int) -> dict[str, Any]:
        """The prepared queries of ``image``, read through ``load`` on a miss."""
        image = int(image)
        with self._lock:
            entry = self._entries.get(image)
            if entry is not None:
                self._entries.move_to_end(image)
                self.hits += 1
                return entry[0]
            pending = self._loading.get(image)
            owner = pending is None
            if owner:
                pending = self._loading[image] = Future()
                self.misses += 1
        if not owner:
            return pending.result()
        try:
            prepared = self._load(image)
        except BaseException as exc:
            with self._lock:
                del self._loading[image]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[image]
            self._entries[image] = (prepared, prepared_bytes(prepared))
            self._entries.move_to_end(image)
            self._evict()
        pending.set_result(prepared)
        return prepared

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        while len(self._entries) > 1 and (len(self._entries) > self.max_images or total > self.max_bytes):
            _, (_, size) = self._entries.popitem(last=False)
            total -= size


class PageBatches:
    """The prepared queries of whole pages of images laid side by side on the pixel axis, per
    layer ``(head, channel, step * image * pixel)``: one pass of the engine per layer answers a
    page (the token softmax is per pixel, so images are just more pixels). Built from a
    :class:`QueryCache`; the most recent ``max_pages`` pages of at most ``max_bytes`` in all."""

    def __init__(self, cache: QueryCache, *, max_pages: int = 2, max_bytes: int = 512 * 2**20) -> None:
        self.cache = cache
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
        per_image = [self.cache.get(i) for i in images]
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

