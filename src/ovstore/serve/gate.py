"""Admission of map computations: a few at a time, a bounded queue behind them, and requests
that a newer request of the same view has superseded dropped before they start (the user typed
past them), so a burst of requests never piles up work or threads."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

__all__ = ["Busy", "RequestGate", "Superseded"]

T = TypeVar("T")


class Busy(Exception):
    """Too many computations are waiting already; the client should retry later (503)."""


class Superseded(Exception):
    """A newer request of the same view arrived while this one waited (409)."""


class RequestGate:
    """At most ``active`` computations at once and ``waiting`` queued behind them; a queued
    request waits at most ``wait_s`` seconds. Requests may name a ``view`` (one page element,
    e.g. the left or right prompt of one browser tab) and a sequence number ``seq``: a waiting
    request whose view has seen a higher ``seq`` is dropped."""

    def __init__(self, *, active: int = 1, waiting: int = 32, wait_s: float = 20.0, views: int = 1024) -> None:
        self.active = int(active)
        self.waiting = int(waiting)
        self.wait_s = float(wait_s)
        self._views = int(views)
        self._running = 0
        self._queued = 0
        self._latest: OrderedDict[str, int] = OrderedDict()
        self._cond = threading.Condition()
        self.dropped = 0
        self.refused = 0

    def _newer(self, view: str | None, seq: int | None) -> bool:
        return view is not None and seq is not None and self._latest.get(view, seq) > seq

    def note(self, view: str | None, seq: int | None) -> None:
        """Record that ``view`` asked for ``seq`` (waiting requests of older ``seq`` are dropped)."""
        if view is None or seq is None:
            return
        with self._cond:
            if seq > self._latest.get(view, -1):
                self._latest[view] = seq
                self._latest.move_to_end(view)
                while len(self._latest) > self._views:
                    self._latest.popitem(last=False)
                self._cond.notify_all()

    @contextmanager
    def slot(self, view: str | None = None, seq: int | None = None) -> Iterator[None]:
        """Hold one computation slot (raises :class:`Busy` or :class:`Superseded`)."""
        self.note(view, seq)
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            if self._running >= self.active and self._queued >= self.waiting:
                self.refused += 1
                raise Busy(f"{self._queued} requests are waiting already; retry later")
            self._queued += 1
            try:
                while True:
                    if self._newer(view, seq):
                        self.dropped += 1
                        raise Superseded("a newer request of this view replaced this one")
                    if self._running < self.active:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.refused += 1
                        raise Busy(f"no computation slot within {self.wait_s:g} s; retry later")
                    self._cond.wait(left)
            finally:
                self._queued -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def run(self, fn: Callable[[], T], view: str | None = None, seq: int | None = None) -> T:
        with self.slot(view, seq):
            return fn()
