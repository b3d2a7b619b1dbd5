"""ebm: energy-based models with contrastive divergence and Langevin negatives."""

__version__ = "0.1.0"
