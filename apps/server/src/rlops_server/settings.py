"""The policy server's settings: the ``handler:`` section of a served version's config.

The backend carries them to every worker (TorchServe: the archive's model-config yaml); they are plain
data, read without torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ServingSettings:
    """Per-model serving settings: the ``handler:`` section of the archive's model-config yaml."""

    max_batch_observations: int = 1024
    """Most observations one request may carry (413 above); a server batch may hold several requests."""
    fallback_action: int | None = None
    """Action answered when the model's outputs are not finite; None: the most frequent action in the
    training data (model card ``reference.actions``)."""
    seed: int | None = None
    """Seed of the sampling generator; None: fresh entropy in every worker."""
    metrics_flush_seconds: float = 1.0
    """How often counters and gauges are handed to the metrics backend (latency observations too)."""
    decision_log_dir: str | None = None
    """Where decisions are logged; the RLOPS_DECISION_LOG_DIR environment variable overrides it; None and
    no variable: decisions are not logged."""
    decision_log_max_queue: int = 10000
    """Decisions waiting to be written before new ones are dropped (and counted)."""
    decision_log_write_through: bool = True
    """Hand a batch's decision lines to the operating system before answering it, so that a worker killed
    right after answering loses none (one system call per batch); false: a background thread writes
    them a moment later, and a killed worker loses what it had not written yet."""
    worker_log_level: str = "WARNING"
    """Level of the worker's root logger. TorchServe's worker logs a line per batch at INFO and its
    frontend copies every worker line into its own logs; metrics and rlops messages stay at INFO."""

    def __post_init__(self) -> None:
        problems = []
        if type(self.max_batch_observations) is not int or self.max_batch_observations < 1:
            problems.append(
                f"max_batch_observations must be an integer >= 1, got {self.max_batch_observations!r}"
            )
        if self.fallback_action is not None and (
            type(self.fallback_action) is not int or self.fallback_action < 0
        ):
            problems.append(
                f"fallback_action must be an action index >= 0 or null, got {self.fallback_action!r}"
            )
        if self.seed is not None and type(self.seed) is not int:
            problems.append(f"seed must be an integer or null, got {self.seed!r}")
        flush = self.metrics_flush_seconds
        if isinstance(flush, bool) or not isinstance(flush, int | float) or not 0.01 <= flush <= 60:
            problems.append(f"metrics_flush_seconds must be a number in [0.01, 60], got {flush!r}")
        if self.decision_log_dir is not None and not (
            isinstance(self.decision_log_dir, str) and self.decision_log_dir
        ):
            problems.append(
                f"decision_log_dir must be a non-empty path or null, got {self.decision_log_dir!r}"
            )
        if not isinstance(cast(object, self.decision_log_write_through), bool):  # from yaml: any type
            problems.append(
                f"decision_log_write_through must be true or false, got {self.decision_log_write_through!r}"
            )
        if type(self.decision_log_max_queue) is not int or self.decision_log_max_queue < 1:
            problems.append(
                f"decision_log_max_queue must be an integer >= 1, got {self.decision_log_max_queue!r}"
            )
        if self.worker_log_level not in LOG_LEVELS:
            problems.append(
                f"worker_log_level must be one of {', '.join(LOG_LEVELS)}, got {self.worker_log_level!r}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, source: str = "handler settings"
    ) -> ServingSettings:
        """Settings from a mapping (the yaml ``handler:`` section); unknown keys are an error."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            return cls(**dict(data))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)
