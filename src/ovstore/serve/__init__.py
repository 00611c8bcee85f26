"""``ovstore serve``: a local web viewer of one store. Type any words and see where every stored
image attends to them, over a paged grid; compare two prompts, try ``ovstore label``'s
normalisation and threshold, use learned tokens, copy the command that reproduces the view.

Read-only and offline (the page's assets ship in the package); loads only what analysis loads.
"""

from .app import ViewerServer, make_app, serve
from .cache import QueryCache
from .gate import Busy, RequestGate, Superseded
from .service import MAX_TEXT_CHARS, LearnedToken, MapResult, MapService, find_learned_tokens

__all__ = [
    "Busy",
    "LearnedToken",
    "MAX_TEXT_CHARS",
    "MapResult",
    "MapService",
    "QueryCache",
    "RequestGate",
    "Superseded",
    "ViewerServer",
    "find_learned_tokens",
    "make_app",
    "serve",
]
