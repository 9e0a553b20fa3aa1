"""Start, reach, restart and stop a policy server, whatever backend runs it.

:func:`start` is the one way to start a local server: ``rlops serve start`` and the canary's restart both
call it with a :class:`~rlops_server.plan.ServePlan`. The server keeps the plan in its run directory
(``plan.json``, beside the backend's own state), so :func:`restart` starts exactly the same server
again, now with the registry's current champion and candidate. :func:`connect` and :func:`remote` give a
:class:`~rlops_server.backend.ServingBackend` for the actions, the canary and the status command.

Backends are modules named in :data:`BACKENDS` that provide ``start(plan)``, ``stop(run_dir, timeout_s)``,
``inference_token(run_dir)`` and ``BACKEND``, a class with ``local(run_dir)`` and ``remote(url, token_file)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from rlops_contracts.durable import replace_atomic

from rlops_server.backend import ServeError, ServerStatus, ServingBackend
from rlops_server.plan import DEFAULT_RUN_DIR, ServePlan
from rlops_server.runfiles import CONFIG_MODE

BACKENDS: dict[str, str] = {"torchserve": "rlops_server.torchserve.backend"}
"""Backend name → module."""
DEFAULT_BACKEND = "torchserve"
PLAN_FILE = "plan.json"

__all__ = [
    "BACKENDS",
    "DEFAULT_RUN_DIR",
    "ServeError",
    "ServePlan",
    "connect",
    "inference_token",
    "remote",
    "restart",
    "running",
    "start",
    "status",
    "stop",
]


def _module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise ServeError(f"unknown serving backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(BACKENDS[name])


def _backend_of(run_dir: Path) -> str:
    """The backend a local server was started with (its plan says; servers without one are TorchServe)."""
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        return DEFAULT_BACKEND
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return str(data.get("backend", DEFAULT_BACKEND))
    except (OSError, ValueError, AttributeError) as e:
        raise ServeError(f"{path}: not a serve plan ({e}); remove it if no server runs from {run_dir}") from e


def start(plan: ServePlan) -> ServerStatus:
    """Start a local server as ``plan`` says; returns once every served version has a ready worker."""
    plan = _absolute(plan)
    status = cast(ServerStatus, _module(plan.backend).start(plan))
    _store(plan)
    return status


def _absolute(plan: ServePlan) -> ServePlan:
    # A restart may come from another working directory.
    return plan.replace(
        run_dir=Path(plan.run_dir).resolve(),
        registry=Path(plan.registry).resolve(),
        decision_log_dir=None if plan.decision_log_dir is None else Path(plan.decision_log_dir).resolve(),
    )


def _store(plan: ServePlan) -> None:
    replace_atomic(
        Path(plan.run_dir) / PLAN_FILE, json.dumps(plan.to_json(), indent=2) + "\n", mode=CONFIG_MODE
    )


def stop(run_dir: Path = DEFAULT_RUN_DIR, timeout_s: float = 30.0) -> str:
    """Stop the local server of ``run_dir`` (workers write their queued decisions first); what happened."""
    run_dir = Path(run_dir).resolve()
    return cast(str, _module(_backend_of(run_dir)).stop(run_dir, timeout_s))


def connect(run_dir: Path = DEFAULT_RUN_DIR) -> ServingBackend:
    """The local server of ``run_dir``; ServeError when none runs there."""
    run_dir = Path(run_dir).resolve()
    module = _module(_backend_of(run_dir))
    return cast(ServingBackend, module.BACKEND.local(run_dir))


def remote(
    management_url: str, token_file: Path | None = None, backend: str = DEFAULT_BACKEND
) -> ServingBackend:
    """A server known only by its management URL (and the file with its management key), as in a cluster."""
    return cast(ServingBackend, _module(backend).BACKEND.remote(management_url, token_file))


def running(run_dir: Path = DEFAULT_RUN_DIR) -> bool:
    try:
        connect(run_dir)
    except ServeError:
        return False
    return True


def status(run_dir: Path = DEFAULT_RUN_DIR) -> ServerStatus:
    """Health, served versions with their workers, URLs and plan of the local server of ``run_dir``."""
    described = connect(run_dir).describe()
    if not (Path(run_dir).resolve() / PLAN_FILE).is_file():
        return described
    return dataclasses.replace(described, plan=stored_plan(run_dir))


def restart(run_dir: Path = DEFAULT_RUN_DIR, **changes: Any) -> ServerStatus:
    """Stop the local server of ``run_dir`` and start it again with its stored plan (``changes`` replace
    settings of it); it then serves the registry's champion and candidate as they are now."""
    run_dir = Path(run_dir).resolve()
    plan = _absolute(stored_plan(run_dir).replace(**changes, run_dir=run_dir))
    status = connect(run_dir).restart(plan)
    _store(plan)
    return status


def stored_plan(run_dir: Path = DEFAULT_RUN_DIR) -> ServePlan:
    """The plan the local server of ``run_dir`` was last started with."""
    path = Path(run_dir).resolve() / PLAN_FILE
    if not path.is_file():
        raise ServeError(
            f"{path}: missing; the server of {run_dir} was started without a stored plan: stop it and start "
            "it again with rlops serve start"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ServePlan.from_json(data, str(path))
    except ValueError as e:
        raise ServeError(str(e) if str(path) in str(e) else f"{path}: {e}") from e


def inference_token(run_dir: Path = DEFAULT_RUN_DIR) -> Callable[[], str | None]:
    """The local server's inference key as a function that reads it afresh, for a restart-proof client
    (:class:`rlops_server.client.PolicyClient`)."""
    run_dir = Path(run_dir).resolve()
    return cast(Callable[[], str | None], _module(_backend_of(run_dir)).inference_token(run_dir))
