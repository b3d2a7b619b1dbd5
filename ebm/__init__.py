"""ebm: energy-based models with contrastive divergence and Langevin negatives."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ebm.checkpoint import load_model as load_model

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``ebm.load_model`` (imported on first use, so ``import ebm`` stays free of torch)."""
    if name == "load_model":
        from ebm.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'ebm' has no attribute {name!r}")
