"""Rollout records: every canary and its decision, with the evidence, kept in the registry.

One JSON file per rollout under the policy's folder of the registry, next to its versions and their
alias history::

    <registry>/<policy>/rollouts/<id>.json     the rollout, rewritten atomically as it progresses
    <registry>/<policy>/rollouts/.lock         held (flock) by the one rollout running for the policy

A published model card is never rewritten, so what happens to a version after publication lives here
and in the registry's ``history.jsonl`` (a promotion, or the candidate alias moved back on a rollback,
with a reason naming this record). The record holds what a reviewer needs to audit the decision: every
measurement of every check (query, value, threshold, samples), the traffic each version answered, and
the outcome with its reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlops_contracts.durable import replace_atomic
from rlops_trainer.card import jsonable

ROLLOUTS_DIR = "rollouts"
LOCK_FILE = ".lock"

RUNNING = "running"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
REJECTED = "rejected"
"""Stopped before any traffic moved (the OPE gate on served logs said no)."""
ABORTED = "aborted"
"""Interrupted (a signal, an error): traffic went back to the champion, nothing was promoted."""
STATES: tuple[str, ...] = (RUNNING, PROMOTED, ROLLED_BACK, REJECTED, ABORTED)


class RolloutBusy(RuntimeError):
    """Another rollout of the same policy holds the lock."""


@dataclass
class RolloutRecord:
    id: str
    policy: str
    champion: int
    candidate: int
    state: str
    started_at: str
    settings: dict[str, Any]
    finished_at: str | None = None
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    forced: str | None = None
    """The reason given to start it although the registry's gate did not allow promoting the candidate."""
    ope: dict[str, Any] | None = None
    """The OPE gate on served logs run before any traffic moved."""
    steps: list[dict[str, Any]] = field(default_factory=list)
    """Per step: share, started_at, ended_at, outcome and every measurement."""
    traffic: dict[str, Any] | None = None
    """Requests and decisions each version answered during the rollout, as Prometheus counted them."""
    decision: dict[str, Any] | None = None
    """outcome, reason, at, failed checks, the last measurement of every check, and the actions taken."""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = jsonable(asdict(self), "rollout record")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutRecord:
        return cls(**data)


def new_id(candidate: int) -> str:
    """A sortable, unique id: the UTC start time and the candidate version."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + f"-v{candidate}"


def rollouts_dir(registry: Path, policy: str) -> Path:
    return Path(registry) / policy / ROLLOUTS_DIR


def write(registry: Path, record: RolloutRecord) -> Path:
    """Write (or rewrite) a record atomically; returns its path."""
    d = rollouts_dir(registry, record.policy)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{record.id}.json"
    replace_atomic(path, json.dumps(record.to_json(), indent=2, allow_nan=False) + "\n")
    return path


def read_all(registry: Path, policy: str) -> list[RolloutRecord]:
    """Every rollout record of ``policy``, oldest first."""
    d = rollouts_dir(registry, policy)
    if not d.is_dir():
        return []
    out = []
    for path in sorted(d.glob("*.json")):
        try:
            out.append(RolloutRecord.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: not a rollout record: {e}") from None
    return out


@contextlib.contextmanager
def locked(registry: Path, policy: str) -> Iterator[None]:
    """Hold the rollout lock of ``policy``: one rollout at a time. The lock dies with its process."""
    d = rollouts_dir(registry, policy)
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            running = [r for r in read_all(registry, policy) if r.state == RUNNING]
            which = f" ({running[-1].id}, pid {running[-1].pid})" if running else ""
            raise RolloutBusy(
                f"a rollout of {policy} is already running{which}; wait for it or stop it (Ctrl-C or "
                "SIGTERM sends its traffic back to the champion)"
            ) from None
        yield
    finally:
        os.close(fd)


def is_locked(registry: Path, policy: str) -> bool:
    """Whether a live process holds the rollout lock of ``policy``."""
    path = rollouts_dir(registry, policy) / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
