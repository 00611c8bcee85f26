"""The prepared queries of recently shown images, kept in memory (bounded, least recently used
evicted first): reading and laying out an image's queries costs more than its maps, so a
page of images answers a new prompt without touching the store again."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["QueryCache", "prepared_bytes"]


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
