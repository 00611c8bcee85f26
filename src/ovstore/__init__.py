"""ovstore: an open-vocabulary attention-map store for text-to-image diffusion models.

Capture a diffusers pipeline's cross-attention queries once (:mod:`ovstore.capture`), keep
them in a documented Zarr store (:mod:`ovstore.store`), and compute OVAM maps for any words
later (:mod:`ovstore.analyze`) without the UNet.
"""

from ._version import __version__
from .errors import OvstoreError
from .store import open_store

__all__ = ["__version__", "OvstoreError", "compute_maps", "open_store"]


def __getattr__(name: str):
    # analysis pulls in torch; keep `import ovstore` light for store-only users
    if name == "compute_maps":
        from .analyze import compute_maps

        return compute_maps
    raise AttributeError(name)
