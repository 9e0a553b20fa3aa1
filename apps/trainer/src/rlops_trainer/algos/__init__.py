"""Offline RL algorithms for discrete actions; each reads top to bottom in its own module."""
