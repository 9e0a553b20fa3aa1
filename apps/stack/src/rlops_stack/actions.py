"""The two automatic actions of the stack, also run by hand: roll a policy back, scale its serving up.

**Rollback** moves the registry's ``champion`` alias back to the previous champion (the registry's
own rollback, recorded in its ``history.jsonl`` with who and why), then makes that version
TorchServe's default for the model through the management API (``PUT /models/<name>/<version>/set-default``)
and records the new aliases in the server's ``state.json``. Run from an alert it names the version that
misbehaves (``from_version``): once that version is no longer the champion there is nothing to roll
back, so repeated notifications of the same alert change nothing, except that serving is brought back in
line with the registry if an earlier attempt could not reach it.

**Scale-up** raises the workers of one served version (``PUT /models/<name>/<version>?min_worker=N``)
by a step, never beyond a maximum; at the maximum it does nothing. **Scale** sets them to a number, for
people (``rlops scale``).

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

from rlops_contracts import CANDIDATE, CHAMPION
from rlops_server import process
from rlops_trainer.registry import Registry, RegistryError

from rlops_stack.http import request_json

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


# --- TorchServe's management API -----------------------------------------------------------------------


@dataclass(frozen=True)
class Serving:
    """A running TorchServe: where its management API is and the key it wants.

    Locally :meth:`find` reads both from the run directory of ``rlops serve start``; in a cluster
    :meth:`at` takes the management URL and a file with the management key (``run_dir`` is then None).
    """

    run_dir: Path | None
    management_url: str
    token: str | None

    @classmethod
    def find(cls, run_dir: Path) -> Serving:
        run_dir = Path(run_dir).resolve()
        state = process.running_state(run_dir)
        if state is None:
            raise ActionError(
                f"no TorchServe is running from {run_dir} (rlops serve status --run-dir {run_dir})"
            )
        return cls(run_dir, state.management_url, process.read_keys(run_dir).get("management"))

    @classmethod
    def at(cls, management_url: str, token_file: Path | None = None) -> Serving:
        token = None
        if token_file is not None:
            try:
                token = Path(token_file).read_text(encoding="utf-8").strip() or None
            except OSError as e:
                raise ActionError(f"management key file {token_file} cannot be read ({e.strerror})") from e
        return cls(None, management_url.rstrip("/"), token)

    def models(self) -> list[str]:
        """Names of the models TorchServe has registered."""
        names: list[str] = []
        token = ""
        while True:
            listed = self.call("GET", "/models?limit=100" + (f"&next_page_token={token}" if token else ""))
            if not isinstance(listed, dict):
                raise ActionError(f"TorchServe listed its models as {listed!r}, expected an object")
            names += [str(m.get("modelName")) for m in listed.get("models", [])]
            token = str(listed.get("nextPageToken") or "")
            if not token:
                return names

    def call(self, method: str, path: str, timeout: float = 10.0) -> Any:
        url = f"{self.management_url}{path}"
        try:
            status, body = request_json(method, url, token=self.token, timeout=timeout)
        except OSError as e:
            raise ActionError(
                f"TorchServe's management API at {self.management_url} cannot be reached: {e}"
            ) from e
        if status >= 300:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise ActionError(f"TorchServe answered {status} to {method} {path}: {message}")
        return body

    def versions(self, name: str) -> list[dict[str, Any]]:
        """TorchServe's description of every registered version of ``name``."""
        described = self.call("GET", f"/models/{name}/all")
        if not isinstance(described, list):
            raise ActionError(f"TorchServe described model {name} as {described!r}, expected a list")
        return described

    def default_version(self, name: str) -> str | None:
        described = self.call("GET", f"/models/{name}")
        if isinstance(described, list) and described:
            return str(described[0].get("modelVersion"))
        return None

    def record_aliases(self, name: str, aliases: dict[str, int]) -> None:
        """Write the registry's aliases into the server's state.json (what ``rlops serve status`` shows)."""
        if self.run_dir is None:
            return
        state = process.ServerState.read(self.run_dir)
        if state is None:
            return
        by_version = {str(v): a for a, v in aliases.items() if a in (CHAMPION, CANDIDATE)}
        for model in state.models:
            if model.name == name:
                model.alias = by_version.get(model.version)
        state.write(self.run_dir)


def _workers(entry: dict[str, Any]) -> tuple[int, int]:
    workers = entry.get("workers") or []
    return len(workers), sum(1 for w in workers if w.get("status") == "READY")


# --- rollback -------------------------------------------------------------------------------------------


def _point_serving_at(serving: Serving, name: str, version: int) -> str:
    """Make ``version`` TorchServe's default for ``name``; returns what happened, in words."""
    described = {str(e.get("modelVersion")): e for e in serving.versions(name)}
    if str(version) not in described:
        raise ActionError(
            f"TorchServe does not serve version {version} of {name} "
            f"(it serves {', '.join(sorted(described))}); "
            f"restart serving to load the champion: rlops serve stop --run-dir {serving.run_dir} && "
            f"rlops serve start --name {name} --run-dir {serving.run_dir}"
        )
    _, ready = _workers(described[str(version)])
    if ready == 0:
        raise ActionError(f"version {version} of {name} is registered in TorchServe but has no ready worker")
    if serving.default_version(name) == str(version):
        return f"TorchServe already answers {name} with version {version}"
    serving.call("PUT", f"/models/{name}/{version}/set-default")
    return f"TorchServe now answers {name} with version {version}"


def rollback(
    registry: Path | str,
    policy: str,
    *,
    reason: str,
    from_version: int | None = None,
    to: int | None = None,
    serve_run_dir: Path | None = None,
    serving: Serving | None = None,
    who: str | None = None,
    record_to: Path | None = None,
) -> ActionResult:
    """Point ``champion`` back at the previous champion (or back to ``to``) and serve it.

    ``from_version``: act only while that version is the champion (what an alert names); otherwise the
    rollback has happened already and only serving is brought in line with the registry.
    ``to``: roll back through the champions before it until ``to`` is the champion again.
    ``serve_run_dir``: the local TorchServe to switch (none running there: only the registry moves);
    ``serving``: a TorchServe to switch by its management URL instead; neither: serving is left alone.
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
        if serving is None and serve_run_dir is not None:
            if process.running_state(Path(serve_run_dir).resolve()) is None:
                said += f"; no TorchServe runs from {serve_run_dir}: it serves the champion when started"
            else:
                serving = Serving.find(serve_run_dir)
        if serving is not None:
            current = reg.aliases(policy)
            said += "; " + _point_serving_at(serving, policy, current[CHAMPION])
            serving.record_aliases(policy, current)
        result.message = said
    except (ActionError, RegistryError, process.ServeError, OSError) as e:
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
    serving: Serving | None = None,
) -> ActionResult:
    """Set the workers of one served version to ``target(current) -> int`` (current: its workers now)."""
    result = ActionResult(action, policy, str(version), FAILED, "")
    try:
        serving = serving or Serving.find(serve_run_dir)
        described = {str(e.get("modelVersion")): e for e in serving.versions(policy)}
        entry = described.get(str(version))
        if entry is None:
            raise ActionError(
                f"TorchServe does not serve version {version} of {policy} "
                f"(it serves {', '.join(sorted(described))})"
            )
        before, ready = _workers(entry)
        current = max(int(entry.get("minWorkers") or 0), before)
        wanted = int(target(current))
        result.details.update(workers_before=before, ready_before=ready, workers_wanted=wanted)
        if wanted == current:
            result.outcome = SKIPPED
            result.message = f"version {version} of {policy} already has {current} workers"
        else:
            # synchronous=true: the answer comes once the workers have started (or stopped).
            serving.call(
                "PUT",
                f"/models/{policy}/{version}?min_worker={wanted}&max_worker={wanted}&synchronous=true",
                timeout=120.0,
            )
            after = {str(e.get("modelVersion")): e for e in serving.versions(policy)}[str(version)]
            result.details.update(workers_after=_workers(after)[0], ready_after=_workers(after)[1])
            result.outcome = DONE
            result.message = f"scaled version {version} of {policy} from {current} to {wanted} workers"
    except (ActionError, process.ServeError, OSError) as e:
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
    serving: Serving | None = None,
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
        serving=serving,
    )


def scale(
    serve_run_dir: Path,
    policy: str,
    version: str | int,
    workers: int,
    *,
    reason: str = "",
    record_to: Path | None = None,
    serving: Serving | None = None,
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
        serving=serving,
    )
