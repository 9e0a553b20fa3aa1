"""The seam between rlops and the model server that runs its policies.

Everything outside ``apps/server`` (the actions webhook, rollbacks, canaries, the retraining loop)
talks to a :class:`ServingBackend`, never to a model server's own API. TorchServe is the one backend
today (:mod:`rlops_server.torchserve`); a second one implements this protocol and is named in
:data:`rlops_server.serving.BACKENDS`, and nothing outside ``apps/server`` changes.

A backend reached through a local run directory (``rlops serve start``) can do everything; one reached
only by URL, as in a cluster where pods belong to Kubernetes, cannot restart itself and says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from rlops_server.plan import ServePlan


class ServeError(RuntimeError):
    """Serving could not be started, reached, changed or stopped; the message says why and where to look."""


@dataclass(frozen=True)
class VersionStatus:
    """One served version of a policy, as the server reports it now."""

    name: str
    version: str
    alias: str | None
    """The registry alias it was served as (champion, candidate), as the server last recorded it."""
    default: bool
    """Requests without a version go to it."""
    workers: int
    ready_workers: int
    min_workers: int
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    batcher: str | None = None


@dataclass(frozen=True)
class ServerStatus:
    """A running server: whether it answers, where, and what it serves."""

    healthy: bool
    backend: str
    inference_url: str
    metrics_url: str
    versions: list[VersionStatus] = field(default_factory=list)
    pid: int | None = None
    run_dir: str | None = None
    decision_log_dir: str | None = None
    key_file: str | None = None
    """Where a local server keeps its access keys (inference, management); None: no keys."""
    plan: ServePlan | None = None
    """What it was started with (a local server only)."""

    def of(self, policy: str) -> dict[str, VersionStatus]:
        """The served versions of ``policy`` by version."""
        return {v.version: v for v in self.versions if v.name == policy}

    def default_version(self, policy: str) -> str | None:
        return next((v.version for v in self.versions if v.name == policy and v.default), None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["plan"] = None if self.plan is None else self.plan.to_json()
        return data


class ServingBackend(Protocol):
    """A running model server, local or remote."""

    name: str
    """The backend's name, e.g. ``torchserve``."""

    def describe(self) -> ServerStatus:
        """Health and every served version with its workers."""
        ...

    def set_default(self, policy: str, version: str) -> None:
        """Answer requests without a version with ``version`` (it must be served with a ready worker)."""
        ...

    def scale(self, policy: str, version: str, workers: int) -> None:
        """Run exactly ``workers`` workers for one served version; returns once they are started."""
        ...

    def record_aliases(self, policy: str, aliases: dict[str, int]) -> None:
        """Remember which served version is which registry alias (what ``rlops serve status`` shows)."""
        ...

    def restart(self, plan: ServePlan) -> ServerStatus:
        """Stop and start again with ``plan`` (the stored plan of the running server, see
        :func:`rlops_server.serving.restart`), so that it serves the registry's champion and candidate as
        they are now; nothing else changes. A remote backend cannot, and raises ServeError."""
        ...
