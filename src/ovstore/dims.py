"""Dimension names shared by the store, the xarray views and the analysis results.

Defined once so that every array ovstore writes or returns speaks the same words.
"""

__all__ = [
    "IMAGE", "BRANCH", "STEP", "HEAD", "Y", "X", "CHANNEL",
    "IMAGE_Y", "IMAGE_X", "RGB", "TOKEN", "WORD", "QUERY_DIMS",
]

IMAGE = "image"
BRANCH = "branch"
STEP = "step"
HEAD = "head"
Y = "y"
X = "x"
CHANNEL = "channel"
IMAGE_Y = "image_y"
IMAGE_X = "image_x"
RGB = "rgb"
TOKEN = "token"
WORD = "word"

#: Dimension order of every stored query array.
QUERY_DIMS = (IMAGE, BRANCH, STEP, HEAD, Y, X, CHANNEL)
