"""Token optimization: learn a class embedding from annotated masks, entirely from a store.

The learned [SoT, class] rows replace a word's text embedding in any later analysis
(``ovstore maps --token FILE``); on MM-DiT stores they are the input rows of the attribution's
text stream. See :func:`optimize_tokens`.
"""

from .config import DEFAULT_CONTEXT, RECIPES, OptimizeConfig
from .masks import load_mask
from .tokens import (
    SOT, TokenFile, combined_attribution, load_token, save_token, store_token_attributions, token_attribution,
    write_tokens,
)
from .tasks import OptimizeRequest, TokenTask, read_tasks_file, tasks_from_options
from .trainer import initial_rows, mask_iou, optimize_tokens

__all__ = [
    "DEFAULT_CONTEXT",
    "OptimizeConfig",
    "OptimizeRequest",
    "RECIPES",
    "SOT",
    "TokenFile",
    "TokenTask",
    "combined_attribution",
    "initial_rows",
    "load_mask",
    "load_token",
    "mask_iou",
    "optimize_tokens",
    "read_tasks_file",
    "save_token",
    "store_token_attributions",
    "tasks_from_options",
    "token_attribution",
    "write_tokens",
]
