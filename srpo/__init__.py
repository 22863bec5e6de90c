"""srpo: Semantic-Relative Preference Optimization for diffusers flow-matching models."""

__version__ = "0.1.0"
