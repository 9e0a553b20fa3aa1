"""Offline RL algorithms for discrete actions; each reads top to bottom in its own module.

``ALGORITHMS`` maps a name to ``(config dataclass, train function)``; ``train(cfg, data, run)``
returns a :class:`rlops_trainer.training.TrainResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rlops_trainer.algos import bc, cql, iql
from rlops_trainer.datasets import Transitions
from rlops_trainer.training import RunOptions, TrainResult

TrainFn = Callable[[Any, Transitions, RunOptions], TrainResult]

ALGORITHMS: dict[str, tuple[type[Any], TrainFn]] = {
    "bc": (bc.BCConfig, bc.train),
    "cql": (cql.CQLConfig, cql.train),
    "iql": (iql.IQLConfig, iql.train),
}

LEARNERS = {"bc": bc.BCLearner, "cql": cql.CQLLearner, "iql": iql.IQLLearner}
"""The learner class of each algorithm (used by the Ray Train path to build the same networks)."""
