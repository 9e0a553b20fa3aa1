"""What a local server runs: every setting of ``rlops serve start``, as one value.

:func:`rlops_server.serving.start` takes a :class:`ServePlan`; the server keeps it in its state, so a
restart (a canary loading its candidate, a rollback) starts the same server again with nothing reset.
The plan is the backend's business to carry out (:mod:`rlops_server.backend`); it names no backend's
own files or flags. Serving is the registry's champion of ``policy`` as the default version, and its
candidate beside it when one is set, as the registry says at each start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlops_server.settings import ServingSettings

DEFAULT_RUN_DIR = Path(".rlops/serve")
DEFAULT_DECISION_LOG_DIR = Path(".rlops/logs")
"""Log root shared with the reward service and the join: decisions go to <root>/decisions/."""

ADAPTIVE = "adaptive"
DELAY = "delay"
BATCHERS = (ADAPTIVE, DELAY)
"""``adaptive``: a request that finds a worker idle goes at once, a busy worker fills its batch for up to
``max_batch_delay_ms``; ``delay``: every batch that is not full waits up to ``max_batch_delay_ms``."""

_LIMITS = {
    "batch_size": (1, 4096),
    "max_batch_delay_ms": (1, 10_000),
    "workers": (1, 64),
}


@dataclass(frozen=True)
class ServePlan:
    """One server: the policy it serves, where it listens, how it batches, where it logs."""

    policy: str
    """Policy name in the registry; its champion is the default version, its candidate served beside."""
    registry: Path
    run_dir: Path = DEFAULT_RUN_DIR
    """Where the server keeps its config, archives, logs and state."""
    host: str = "127.0.0.1"
    """Address the inference API listens on (0.0.0.0 in a container)."""
    port: int = 8080
    management_port: int = 8081
    """Management API port; it listens on 127.0.0.1 only."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8082
    grpc_port: int = 7070
    """gRPC inference port; the gRPC management API uses the next one."""
    workers: int = 1
    """Workers per policy version."""
    batch_size: int = 16
    """Most requests a worker takes at once (1: no batching)."""
    max_batch_delay_ms: int = 1
    """How long a worker waits for a batch to fill (see :data:`BATCHERS`)."""
    batcher: str = ADAPTIVE
    max_batch_observations: int = ServingSettings.max_batch_observations
    """Most observations one request may carry."""
    decision_log_dir: Path | None = DEFAULT_DECISION_LOG_DIR
    """Log root for decisions; None: decisions are not logged."""
    access_log: bool = False
    """Log every request (costs latency)."""
    log_max_bytes: int = 100 << 20
    """Size at which each of the server's logs rolls over into a numbered archive."""
    timeout_s: float = 120.0
    """Seconds to wait until every served version has a ready worker."""
    backend: str = "torchserve"

    def __post_init__(self) -> None:
        for name, (low, high) in _LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        ports = {k: getattr(self, k) for k in ("port", "management_port", "metrics_port", "grpc_port")}
        ports["grpc_port + 1"] = self.grpc_port + 1
        for name, port in ports.items():
            if type(port) is not int or not 1 <= port <= 65535:
                raise ValueError(f"{name} must be a TCP port (1-65535), got {port!r}")
        used = list(ports.values())
        if len(set(used)) != len(used):
            raise ValueError(f"ports must differ; got {ports}")
        if self.batcher not in BATCHERS:
            raise ValueError(f"batcher must be one of {', '.join(BATCHERS)}, got {self.batcher!r}")
        for name in ("host", "metrics_host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c.isspace() or c in "/[]" for c in value):
                raise ValueError(f"{name} must be an address such as 127.0.0.1 or 0.0.0.0, got {value!r}")
        self.serving_settings()  # checks max_batch_observations
        if type(self.log_max_bytes) is not int or self.log_max_bytes < 1:
            raise ValueError(f"log_max_bytes must be an integer >= 1, got {self.log_max_bytes!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s!r}")

    def serving_settings(self) -> ServingSettings:
        """The handler's settings this plan asks for."""
        return ServingSettings(max_batch_observations=self.max_batch_observations)

    def replace(self, **changes: Any) -> ServePlan:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("registry", "run_dir", "decision_log_dir"):
            data[key] = None if data[key] is None else str(data[key])
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "serve plan") -> ServePlan:
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            listed = ", ".join(sorted(known))
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {listed}")
        values = dict(data)
        for key in ("registry", "run_dir", "decision_log_dir"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        try:
            return cls(**values)
        except TypeError as e:
            raise ValueError(f"{source}: {e}") from None
