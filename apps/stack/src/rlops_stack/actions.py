"""The two automatic actions of the stack, also run by hand: roll a policy back, scale its serving up.

**Rollback** moves the registry's ``champion`` alias back to the previous champion (the registry's
own rollback, recorded in its ``history.jsonl`` with who and why), then makes that version the
server's default for the policy and records the new aliases with it (the serving backend's
``set_default`` and ``record_aliases``, :class:`rlops_server.backend.ServingBackend`). Run from an
alert it names the version that misbehaves (``from_version``): once that version is no longer the
champion there is nothing to roll back, so repeated notifications of the same alert change nothing,
except that serving is brought back in line with the registry if an earlier attempt could not reach it.

**Scale-up** raises the workers of one served version (the backend's ``scale``) by a step, never
beyond a maximum; at the maximum it does nothing. **Scale** sets them to a number, for people
(``rlops scale``).

Every action returns an :class:`ActionResult` and is appended to an actions record (JSON lines), the
audit trail of the webhook and of ``rlops rollback``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlops_contracts import CHAMPION
from rlops_server import serving
from rlops_server.backend import ServeError, ServingBackend
from rlops_trainer.registry import Registry, RegistryError

log = logging.getLogger(__name__)

ROLLBACK = "rollback"
SCALE_UP = "scale_up"
SCALE = "scale"
ACTIONS = (ROLLBACK, SCALE_UP)
"""What alerts may ask for (their ``action`` label); ``scale`` is for people."""
DONE, SKIPPED, FAILED = "done", "skipped", "failed"
OUTCOMES = (DONE, SKIPPED, FAILED)


class ActionError(RuntimeError):
    """An action could not be done; the message says why and what to do instead."""


@dataclass
class ActionResult:
    action: str
    policy: str
    version: str | None
    outcome: str
    """done, skipped (nothing to do) or failed."""
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def record(path: Path | None, result: ActionResult, **extra: Any) -> None:
    """Append ``result`` (and ``extra``, such as the alert) as one line to the actions record."""
    if path is None:
        return
    line = (json.dumps({**result.to_json(), **extra}, default=str) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    # One write of one line with O_APPEND: concurrent writers (webhook, a person) never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_record(path: Path) -> list[dict[str, Any]]:
    """Every entry of an actions record, oldest first (a line cut short by a crash is skipped)."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


# --- serving ------------------------------------------------------------------------------------------


def local_serving(run_dir: Path) -> ServingBackend:
    """The local server of ``run_dir``; ActionError when none runs there."""
    try:
        return serving.connect(run_dir)
    except ServeError as e:
        raise ActionError(str(e)) from e


# --- rollback -------------------------------------------------------------------------------------------


def _point_serving_at(backend: ServingBackend, name: str, version: int) -> str:
    """Make ``version`` the server's default for ``name``; returns what happened, in words."""
    described = backend.describe()
    if described.default_version(name) == str(version):
        return f"serving already answers {name} with version {version}"
    backend.set_default(name, str(version))
    return f"serving now answers {name} with version {version}"


def rollback(
    registry: Path | str,
    policy: str,
    *,
    reason: str,
    from_version: int | None = None,
    to: int | None = None,
    serve_run_dir: Path | None = None,
    backend: ServingBackend | None = None,
    who: str | None = None,
    record_to: Path | None = None,
) -> ActionResult:
    """Point ``champion`` back at the previous champion (or back to ``to``) and serve it.

    ``from_version``: act only while that version is the champion (what an alert names); otherwise the
    rollback has happened already and only serving is brought in line with the registry.
    ``to``: roll back through the champions before it until ``to`` is the champion again.
    ``serve_run_dir``: the local server to switch (none running there: only the registry moves);
    ``backend``: a server to switch instead (e.g. by its management URL); neither: serving is left alone.
    """
    reg = Registry(registry)
    result = ActionResult(ROLLBACK, policy, None if from_version is None else str(from_version), FAILED, "")
    try:
        aliases = reg.aliases(policy)
        champion = aliases.get(CHAMPION)
        if champion is None:
            raise ActionError(
                f"policy {policy!r} has no champion in registry {reg.root}: nothing to roll back"
            )
        moved: list[int] = []
        if from_version is not None and champion != from_version:
            result.outcome = SKIPPED
            said = f"version {from_version} of {policy} is not the champion (the champion is {champion})"
        elif to is not None and champion == to:
            result.outcome = SKIPPED
            said = f"version {to} of {policy} is already the champion"
        else:
            if to is not None:
                earlier = reg.champion_stack(policy)[:-1]
                if to not in earlier:
                    listed = ", ".join(map(str, earlier)) or "none"
                    raise ActionError(
                        f"version {to} of {policy} was not a champion before {champion}; "
                        f"earlier champions: {listed}"
                    )
            while True:
                moved.append(reg.rollback(policy, reason, who=who))
                if to is None or moved[-1] == to:
                    break
            result.outcome = DONE
            said = f"rolled {policy} back from version {champion} to version {moved[-1]}"
        result.details.update(previous=champion, champion=reg.aliases(policy).get(CHAMPION), steps=moved)
        if backend is None and serve_run_dir is not None:
            if not serving.running(serve_run_dir):
                said += f"; no server runs from {serve_run_dir}: it serves the champion when started"
            else:
                backend = local_serving(serve_run_dir)
        if backend is not None:
            current = reg.aliases(policy)
            said += "; " + _point_serving_at(backend, policy, current[CHAMPION])
            backend.record_aliases(policy, current)
        result.message = said
    except (ActionError, RegistryError, ServeError, OSError) as e:
        done = result.details.get("steps")
        result.outcome = FAILED
        result.message = (
            f"the registry champion of {policy} moved to version {result.details['champion']}, but: {e}"
            if done
            else str(e)
        )
    log.info("rollback %s: %s: %s", policy, result.outcome, result.message)
    record(record_to, result, reason=reason, who=who)
    return result


# --- scaling --------------------------------------------------------------------------------------------


def _scale(
    action: str,
    serve_run_dir: Path,
    policy: str,
    version: str | int,
    target: Any,
    *,
    reason: str,
    record_to: Path | None,
    backend: ServingBackend | None = None,
) -> ActionResult:
    """Set the workers of one served version to ``target(current) -> int`` (current: its workers now)."""
    result = ActionResult(action, policy, str(version), FAILED, "")
    try:
        backend = backend or local_serving(serve_run_dir)
        served = backend.describe().of(policy)
        entry = served.get(str(version))
        if entry is None:
            raise ActionError(
                f"the server does not serve version {version} of {policy} "
                f"(it serves {', '.join(sorted(served)) or 'nothing'})"
            )
        current = max(entry.min_workers, entry.workers)
        wanted = int(target(current))
        result.details.update(
            workers_before=entry.workers, ready_before=entry.ready_workers, workers_wanted=wanted
        )
        if wanted == current:
            result.outcome = SKIPPED
            result.message = f"version {version} of {policy} already has {current} workers"
        else:
            backend.scale(policy, str(version), wanted)
            after = backend.describe().of(policy)[str(version)]
            result.details.update(workers_after=after.workers, ready_after=after.ready_workers)
            result.outcome = DONE
            result.message = f"scaled version {version} of {policy} from {current} to {wanted} workers"
    except (ActionError, ServeError, OSError) as e:
        result.outcome = FAILED
        result.message = str(e)
    log.info("%s %s %s: %s: %s", action, policy, version, result.outcome, result.message)
    record(record_to, result, reason=reason)
    return result


def scale_up(
    serve_run_dir: Path,
    policy: str,
    version: str | int,
    *,
    step: int = 1,
    max_workers: int = 4,
    reason: str = "",
    record_to: Path | None = None,
    backend: ServingBackend | None = None,
) -> ActionResult:
    """Add ``step`` workers to one served version, up to ``max_workers``; waits until they are started."""
    if step < 1 or max_workers < 1:
        raise ValueError(f"step and max_workers must be >= 1, got {step} and {max_workers}")
    return _scale(
        SCALE_UP,
        serve_run_dir,
        policy,
        version,
        lambda current: max(current, min(current + step, max_workers)),
        reason=reason,
        record_to=record_to,
        backend=backend,
    )


def scale(
    serve_run_dir: Path,
    policy: str,
    version: str | int,
    workers: int,
    *,
    reason: str = "",
    record_to: Path | None = None,
    backend: ServingBackend | None = None,
) -> ActionResult:
    """Set the workers of one served version to exactly ``workers`` (up or down, by hand)."""
    if not 1 <= workers <= 64:
        raise ValueError(f"workers must be between 1 and 64, got {workers}")
    return _scale(
        SCALE,
        serve_run_dir,
        policy,
        version,
        lambda _: workers,
        reason=reason,
        record_to=record_to,
        backend=backend,
    )
