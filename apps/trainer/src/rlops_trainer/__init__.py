"""rlops trainer: from a transition dataset to a gated, exported policy in the registry."""

__version__ = "0.1.0"
