"""Token-optimization settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..analyze import MapConfig
from ..errors import InvalidInputError
from ..inputs import check_float, check_int

__all__ = ["OptimizeConfig", "RECIPES", "DEFAULT_CONTEXT"]

RECIPES = ("reference",)
DEFAULT_CONTEXT = "A photograph of a {}"


@dataclass(frozen=True, slots=True)
class OptimizeConfig:
    """The reference recipe of OVAM token optimization, every number a setting.

    Parameters
    ----------
    recipe
        ``reference``: parameter [SoT, class] rows of the encoded context sentence; forward
        = default OVAM maps of the two rows, bilinearly upsampled to the mask size;
        min-max normalisation over the whole map tensor; cross-entropy with the mask as
        class index (0 background, 1 class); SGD; the lowest-loss embedding is kept.
    context
        Sentence whose encoding initialises the rows; ``{}`` is replaced by the init word.
    epochs, lr, lr_step, lr_gamma
        SGD with StepLR (reference: 800 epochs, learning rate 100, x0.7 every 120 epochs).
    maps
        Layer/step selection and aggregation of the forward maps (default: the analysis
        defaults).
    """

    recipe: str = "reference"
    context: str = DEFAULT_CONTEXT
    epochs: int = 800
    lr: float = 100.0
    lr_step: int = 120
    lr_gamma: float = 0.7
    maps: MapConfig = field(default_factory=MapConfig)

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise InvalidInputError(f"--recipe {self.recipe!r} is not one of {', '.join(RECIPES)}")
        check_int(self.epochs, "--epochs", 1, 1_000_000)
        check_float(self.lr, "--lr", 0.0, low_open=True)
        check_int(self.lr_step, "--lr-step", 1)
        check_float(self.lr_gamma, "--lr-gamma", 0.0, 1.0, low_open=True)
        if "{}" not in self.context:
            raise InvalidInputError(
                f"--context {self.context!r} must contain {{}} where the init word goes, "
                "e.g. 'A photograph of a {}'"
            )
        if self.maps.normalize != "none" or self.maps.size is not None:
            raise InvalidInputError("the maps of token optimization are normalised by the recipe; "
                                    "leave MapConfig.normalize and size at their defaults")

    def hyperparameters(self) -> dict[str, object]:
        """What a token file records about how it was made."""
        return {"recipe": self.recipe, "context": self.context, "epochs": self.epochs, "lr": self.lr,
                "lr_step": self.lr_step, "lr_gamma": self.lr_gamma, "layers": list(self.maps.layers.patterns),
                "resolutions": [list(r) for r in self.maps.layers.resolutions],
                "steps": list(self.maps.steps) if self.maps.steps else None}
