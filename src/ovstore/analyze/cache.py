"""Prepared queries of recently used images, kept in memory (bounded, least recently used
evicted first), and each open store's key projections, read once.

Reading and laying out an image's queries costs far more than a few prompts' maps (an
SD-1.5 image at four stored calls: 92 MB of float16 to decompress and convert), so someone
re-analysing one image for a handful of words pays it once, not once per call. The cache
is process-wide and shared by every :func:`~ovstore.analyze.compute_maps` call on the same
open :class:`~ovstore.store.Store`; ``ovstore serve`` keeps its own, sized by ``--cache-mb``.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

__all__ = ["QueryCache", "prepared_bytes", "set_query_cache", "shared_query_cache", "store_cache_key",
           "stored_key_projection"]

#: default bound of the process-wide cache (``OVSTORE_QUERY_CACHE_MB`` overrides it; 0 turns it off)
DEFAULT_CACHE_MB = 1024


def prepared_bytes(prepared: dict[str, Any]) -> int:
    """Bytes one image's prepared queries take (``{layer: PreparedQueries}``)."""
    return sum(int(p.data.numel()) * int(p.data.element_size()) for p in prepared.values())


class QueryCache:
    """``key -> prepared queries`` of at most ``max_images`` entries and ``max_bytes`` bytes
    (the most recent entry is always kept, whatever its size, unless ``max_bytes`` is 0,
    which keeps nothing). Thread-safe: concurrent misses of one key read it once.

    ``load(key)`` reads a missing entry; :meth:`get` may be given another loader."""

    def __init__(self, load: Callable[[Any], dict[str, Any]] | None = None, *, max_images: int = 96,
                 max_bytes: int = 2 * 2**30) -> None:
        if max_images < 1 or max_bytes < 0:
            raise ValueError("the query cache needs room for at least one image")
        self._load = load
        self.max_images = int(max_images)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[dict[str, Any], int]] = OrderedDict()
        self._loading: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._entries.values())

    def images(self) -> list[Hashable]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: Hashable, load: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """The prepared queries of ``key``, read through ``load()`` (else the cache's loader) on a miss."""
        if hasattr(key, "__index__"):  # an image index, numpy's included
            key = int(key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
                self.misses += 1
        if not owner:
            return pending.result()
        try:
            if load is not None:
                prepared = load()
            elif self._load is not None:
                prepared = self._load(key)
            else:
                raise ValueError("this query cache has no loader: pass load=")
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            if self.max_bytes > 0:
                self._entries[key] = (prepared, prepared_bytes(prepared))
                self._entries.move_to_end(key)
                self._evict()
        pending.set_result(prepared)
        return prepared

    def discard(self, match: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key ``match`` accepts (a closed store's images)."""
        with self._lock:
            for key in [k for k in self._entries if match(k)]:
                del self._entries[key]

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = int(max_bytes)
            if self.max_bytes == 0:
                self._entries.clear()
            self._evict()

    def _evict(self) -> None:
        total = sum(size for _, size in self._entries.values())
        while len(self._entries) > 1 and (len(self._entries) > self.max_images or total > self.max_bytes):
            _, (_, size) = self._entries.popitem(last=False)
            total -= size


def _default_bytes() -> int:
    raw = os.environ.get("OVSTORE_QUERY_CACHE_MB", "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_CACHE_MB
    except ValueError:
        mb = DEFAULT_CACHE_MB
    return max(0, int(mb * 2**20))


_shared: QueryCache | None = None
_shared_lock = threading.Lock()


def shared_query_cache() -> QueryCache:
    """The process-wide cache :func:`~ovstore.analyze.compute_maps` reads through (1 GiB by
    default; ``OVSTORE_QUERY_CACHE_MB`` or :func:`set_query_cache` change it)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = QueryCache(max_images=4096, max_bytes=_default_bytes())
        return _shared


def set_query_cache(max_mb: float) -> None:
    """Bound the process-wide query cache to ``max_mb`` MiB (0: keep nothing, free it now)."""
    if not max_mb >= 0:
        raise ValueError(f"the query cache size must be >= 0 MiB, not {max_mb}")
    shared_query_cache().resize(int(max_mb * 2**20))


_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_next_token = [0]
_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def store_cache_key(store: Any) -> int:
    """A number for this open store object, unique in the process; its cache entries are
    dropped when the object is collected (a store re-opened is read again)."""
    with _shared_lock:
        token = _tokens.get(store)
        if token is None:
            token = _tokens[store] = _next_token[0]
            _next_token[0] += 1
            weakref.finalize(store, _forget, token)
        return token


def _forget(token: int) -> None:
    if _shared is not None:
        _shared.discard(lambda key: isinstance(key, tuple) and key[:1] == (token,))


def stored_key_projection(store: Any, layer: str, read: Callable[[], Any]) -> Any:
    """``read()``'s result for ``layer`` of this open store, read once: key projections never
    change after capture, and SD-1.5's are 36 MB of float32 to decompress."""
    with _shared_lock:
        per_store = _projections.setdefault(store, {})
        if layer in per_store:
            return per_store[layer]
    value = read()
    with _shared_lock:
        return per_store.setdefault(layer, value)
