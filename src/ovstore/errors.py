"""Exceptions raised by ovstore.

Every error says what was received, what was expected and what to do next, so that the
command line can print it as one line instead of a traceback.
"""

from __future__ import annotations

__all__ = [
    "OvstoreError",
    "InvalidInputError",
    "ModelLoadError",
    "StoreError",
    "StoreFormatError",
    "StoreDamagedError",
    "StoreLockedError",
    "IncompatibleStoreError",
    "IncompleteImageError",
    "OutputError",
]


class OvstoreError(Exception):
    """Root of every error ovstore raises on purpose."""


class InvalidInputError(OvstoreError, ValueError):
    """An argument, prompt, file or selection that cannot be used as given."""


class ModelLoadError(OvstoreError):
    """A model (pipeline, text encoder or tokenizer) could not be loaded."""


class StoreError(OvstoreError):
    """A store could not be read or written."""


class StoreFormatError(StoreError):
    """A path is not an ovstore store, or has a format version this library cannot read."""


class StoreDamagedError(StoreFormatError):
    """A store's metadata or an array's description cannot be read (truncated or edited
    ``zarr.json``, missing keys): the store is damaged, not merely of another kind."""


class StoreLockedError(StoreError):
    """Another process holds the store's lock while it adds image slots."""


class IncompatibleStoreError(StoreError):
    """An append to an existing store does not match how the store was created."""


class IncompleteImageError(StoreError, KeyError):
    """An image slot was requested that does not exist or is not marked complete."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class OutputError(OvstoreError):
    """An output (maps, tokens, labels, reports, images) could not be written, or another
    process is writing it; the message says what was kept and what to do."""
