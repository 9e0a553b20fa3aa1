"""Offline RL algorithms; each reads top to bottom in its own module.

An algorithm name (``bc``, ``cql``, ``iql``, ``td3bc``) has an implementation per kind of action space:
``ALGORITHMS`` maps a name to ``(config dataclass, train function)`` for Discrete actions,
``CONTINUOUS_ALGORITHMS`` for Box actions; :func:`implementation` picks the one that matches a dataset.
``train(cfg, data, run)`` returns a :class:`rlops_trainer.training.TrainResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlops_trainer.algos import bc, bc_continuous, cql, cql_continuous, iql, iql_continuous, td3bc
from rlops_trainer.datasets import DatasetMeta, Transitions
from rlops_trainer.training import RunOptions, TrainResult

TrainFn = Callable[[Any, Transitions, RunOptions], TrainResult]

ALGORITHMS: dict[str, tuple[type[Any], TrainFn]] = {
    "bc": (bc.BCConfig, bc.train),
    "cql": (cql.CQLConfig, cql.train),
    "iql": (iql.IQLConfig, iql.train),
}
"""The implementations for Discrete actions."""

CONTINUOUS_ALGORITHMS: dict[str, tuple[type[Any], TrainFn]] = {
    "bc": (bc_continuous.ContinuousBCConfig, bc_continuous.train),
    "cql": (cql_continuous.ContinuousCQLConfig, cql_continuous.train),
    "iql": (iql_continuous.ContinuousIQLConfig, iql_continuous.train),
    "td3bc": (td3bc.TD3BCConfig, td3bc.train),
}
"""The implementations for Box actions."""

NAMES: tuple[str, ...] = tuple(dict.fromkeys([*ALGORITHMS, *CONTINUOUS_ALGORITHMS]))
"""Every offline algorithm name (``rlops train NAME``)."""

LEARNERS = {"bc": bc.BCLearner, "cql": cql.CQLLearner, "iql": iql.IQLLearner}
"""The learner class of each Discrete algorithm (used by the Ray Train path to build the same networks)."""


def implementation(name: str, continuous: bool) -> tuple[type[Any], TrainFn]:
    """``(config dataclass, train function)`` of ``name`` for Box (``continuous``) or Discrete actions;
    ValueError names what is accepted."""
    table = CONTINUOUS_ALGORITHMS if continuous else ALGORITHMS
    if name in table:
        return table[name]
    if name in NAMES:
        kind, other = ("Box", "Discrete") if continuous else ("Discrete", "Box")
        raise ValueError(
            f"{name} trains on {other} actions only; for {kind} actions the algorithms are {', '.join(table)}"
        )
    raise ValueError(f"unknown algorithm '{name}'; accepted: {', '.join(NAMES)}")


def for_dataset(name: str, meta: DatasetMeta) -> tuple[type[Any], TrainFn]:
    """The implementation of ``name`` that matches the dataset's action space."""
    return implementation(name, meta.is_continuous)
