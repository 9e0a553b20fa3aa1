"""The retraining loop's config: what ``rlops loop run-once --config F`` and the ``rlops-loop`` CronJob read.

Plain data, checked key by key with errors that name the file and the key, and free of torch and Ray:
the Pulumi program validates a stack's loop config with :func:`parse_config` before any resource exists,
where no trainer is installed. The algorithm's ``train`` settings are checked against its config dataclass
(:mod:`rlops_trainer.hyperparams`), the gate's against :class:`OPESettings`.

An algorithm name has an implementation per kind of action space (``bc``, ``cql``, ``iql`` for Discrete
and Box actions, ``td3bc`` for Box actions only), and which one trains is known only when the served logs
are joined: the ``train`` settings must suit at least one implementation of the name here, and suit the
one the data picks when the loop trains.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rlops_trainer.hyperparams import ESTIMATORS, OFFLINE, OFFLINE_CONTINUOUS, FQEConfig, apply_overrides

from rlops_delivery import analysis

ALGORITHMS: tuple[str, ...] = tuple(dict.fromkeys([*OFFLINE, *OFFLINE_CONTINUOUS]))
"""Every offline algorithm name the loop trains (as ``rlops train NAME``)."""

DEFAULT_STEPS: tuple[float, ...] = (0.1, 0.5, 1.0)
"""Canary steps: the candidate's share of the traffic at each (1.0: after promotion)."""


class LoopError(RuntimeError):
    """An iteration cannot go on; the message says why and what to do. The state is kept for a rerun."""


class OPEGateError(ValueError):
    """The gate cannot be run as asked (no logs, unknown versions, mismatched spaces)."""


def parse_steps(text: str) -> tuple[float, ...]:
    """``"10,50,100"`` (percent of the traffic) as fractions; strictly increasing, each in (0, 100]."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if (
        not values
        or any(not (0 < v <= 100) for v in values)
        or any(b <= a for a, b in itertools.pairwise(values))
    ):
        raise ValueError(
            f"steps {text!r}: expected strictly increasing percentages of the traffic in (0, 100], "
            "separated by commas, such as 10,50,100"
        )
    return tuple(v / 100 for v in values)


@dataclass(frozen=True)
class OPESettings:
    estimator: str | None = None
    """Estimator the gate decides on; None: dr with propensities, else fqe."""
    margin: float = 0.0
    relative: bool = False
    against: str = "value"
    gamma: float = 0.99
    confidence: float = 0.95
    n_bootstrap: int = 500
    fqe_steps: int = FQEConfig.steps
    fqe_models: int = FQEConfig.ensemble
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator is not None and self.estimator not in ESTIMATORS:
            raise OPEGateError(f"estimator {self.estimator!r}: choose from {', '.join(ESTIMATORS)}")
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise OPEGateError(f"margin must be >= 0, got {self.margin}")
        if self.against not in ("value", "upper"):
            raise OPEGateError(f"against must be 'value' or 'upper', got {self.against!r}")
        if not 0 < self.gamma <= 1:
            raise OPEGateError(f"gamma must be in (0, 1], got {self.gamma}")
        if not 0 < self.confidence < 1:
            raise OPEGateError(f"confidence must be in (0, 1), got {self.confidence}")
        for name in ("n_bootstrap", "fqe_steps", "fqe_models"):
            if getattr(self, name) < 1:
                raise OPEGateError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class CanaryConfig:
    steps: tuple[float, ...] = DEFAULT_STEPS
    interval_s: float | None = None
    """None: the analysis file's interval."""
    step_min_s: float = 60.0
    step_timeout_s: float = 600.0


@dataclass(frozen=True)
class LoopConfig:
    policy: str
    algorithm: str = "cql"
    train: dict[str, Any] = field(default_factory=dict)
    """Fields of the algorithm's config dataclass (as ``rlops train ALGO --set``)."""
    min_new_transitions: int = 1000
    reward_wait_s: float = 60.0
    max_decision_files: int = 0
    """Train on at most this many of the most recent decision files (0: every file consumed so far)."""
    gate: OPESettings = field(default_factory=OPESettings)
    canary: CanaryConfig = field(default_factory=CanaryConfig)


_KEYS = {
    "": (
        "policy",
        "algorithm",
        "train",
        "min_new_transitions",
        "reward_wait",
        "max_decision_files",
        "gate",
        "canary",
    ),
    "gate": (
        "estimator",
        "margin",
        "relative",
        "against",
        "gamma",
        "confidence",
        "bootstrap",
        "fqe_steps",
        "fqe_models",
        "seed",
    ),
    "canary": ("steps", "interval", "step_duration", "step_timeout"),
}


def _section(raw: Any, where: str, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LoopError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(_KEYS[key]))
    if unknown:
        raise LoopError(f"{where}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(_KEYS[key])}")
    return dict(raw)


def _int(value: Any, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LoopError(f"{where}: {value!r} is not an integer >= {minimum}")
    return value


def parse_config(raw: Any, source: str) -> LoopConfig:
    """Validate a loop config (parsed YAML); errors name the file and the key."""
    top = _section(raw, source, "")
    if not isinstance(top.get("policy"), str) or not top["policy"]:
        raise LoopError(f"{source}: policy: the policy name in the registry is required")
    algorithm = top.get("algorithm", "cql")
    if algorithm not in ALGORITHMS:
        raise LoopError(f"{source}: algorithm: {algorithm!r}; accepted: {', '.join(ALGORITHMS)}")
    train = top.get("train") or {}
    if not isinstance(train, dict):
        raise LoopError(f"{source}: train: expected a mapping of {algorithm} config fields")
    problems = {
        kind: train_problem(table[algorithm], train)
        for kind, table in (("Discrete", OFFLINE), ("Box", OFFLINE_CONTINUOUS))
        if algorithm in table
    }
    if all(problems.values()):
        if len(problems) == 1:
            raise LoopError(f"{source}: train: {next(iter(problems.values()))}")
        raise LoopError(
            f"{source}: train: "
            + "; ".join(f"for {kind} actions, {problem}" for kind, problem in problems.items())
        )
    try:
        g = _section(top.get("gate"), f"{source}: gate", "gate")
        renamed = {"bootstrap": "n_bootstrap"}
        gate = OPESettings(**{renamed.get(k, k): v for k, v in g.items()})
        c = _section(top.get("canary"), f"{source}: canary", "canary")
        canary = CanaryConfig(
            steps=parse_steps(text_value(c["steps"])) if "steps" in c else DEFAULT_STEPS,
            interval_s=analysis.parse_duration(c["interval"], "canary.interval") if "interval" in c else None,
            step_min_s=analysis.parse_duration(c.get("step_duration", "1m"), "canary.step_duration"),
            step_timeout_s=analysis.parse_duration(c.get("step_timeout", "10m"), "canary.step_timeout"),
        )
        reward_wait = analysis.parse_duration(top.get("reward_wait", "1m"), "reward_wait")
    except (OPEGateError, analysis.AnalysisError, TypeError, ValueError) as e:
        raise LoopError(f"{source}: {e}") from None
    return LoopConfig(
        policy=top["policy"],
        algorithm=algorithm,
        train=dict(train),
        min_new_transitions=_int(top.get("min_new_transitions", 1000), f"{source}: min_new_transitions", 1),
        reward_wait_s=reward_wait,
        max_decision_files=_int(top.get("max_decision_files", 0), f"{source}: max_decision_files", 0),
        gate=gate,
        canary=canary,
    )


def train_problem(config_cls: type[Any], train: dict[str, Any]) -> str | None:
    """What is wrong with ``train`` as fields of ``config_cls`` (an algorithm's config dataclass), or None."""
    try:
        apply_overrides(config_cls(), [f"{k}={text_value(v)}" for k, v in train.items()])
    except ValueError as e:
        return str(e).replace("--set ", "")
    return None


def text_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def load_config(path: Path) -> LoopConfig:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoopError(f"{path}: no such loop config") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LoopError(f"{path}: cannot be read as YAML: {e}") from None
    return parse_config(raw, str(path))
