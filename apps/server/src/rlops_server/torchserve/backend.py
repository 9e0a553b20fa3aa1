"""TorchServe as the serving backend: :class:`TorchServeBackend` and the start of a local server.

A backend is reached two ways. :meth:`TorchServeBackend.local` reads a local server's run directory
(``rlops serve start``): URLs, keys, the served versions and the plan it was started with, so it can
also restart itself. :meth:`TorchServeBackend.remote` takes only a management URL and a key file, as the
actions webhook beside TorchServe in a Kubernetes pod does; it cannot restart (the pods are Kubernetes').
Every call goes through TorchServe's management API with the management key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlops_contracts import CANDIDATE, CHAMPION
from rlops_contracts.registry import RegistryReader

from rlops_server.backend import ServeError, ServerStatus, VersionStatus
from rlops_server.http import request_json
from rlops_server.plan import ADAPTIVE, DELAY, ServePlan
from rlops_server.torchserve import process
from rlops_server.torchserve.archive import build_archive
from rlops_server.torchserve.config import (
    LOG_MAX_BYTES,
    METRICS_FILE,
    ModelSettings,
    ServedModel,
    ServerConfig,
)

NAME = "torchserve"


class TorchServeBackend:
    """A running TorchServe, by its management API (see the module docstring)."""

    name = NAME

    def __init__(
        self,
        management_url: str,
        token: Callable[[], str | None],
        *,
        run_dir: Path | None = None,
        state: process.ServerState | None = None,
    ) -> None:
        self.management_url = management_url.rstrip("/")
        self._token = token
        self.run_dir = run_dir
        self.state = state

    @classmethod
    def local(cls, run_dir: Path) -> TorchServeBackend:
        """The server started from ``run_dir``; ServeError when none runs there."""
        run_dir = Path(run_dir).resolve()
        state = process.running_state(run_dir)
        if state is None:
            raise ServeError(
                f"no server is running from {run_dir} (start one with rlops serve start --run-dir {run_dir})"
            )
        return cls(
            state.management_url,
            lambda: process.read_keys(run_dir).get("management"),
            run_dir=run_dir,
            state=state,
        )

    @classmethod
    def remote(cls, management_url: str, token_file: Path | None = None) -> TorchServeBackend:
        """A TorchServe known only by its management URL and the file holding its management key."""

        def token() -> str | None:
            if token_file is None:
                return None
            try:
                return Path(token_file).read_text(encoding="utf-8").strip() or None
            except OSError as e:
                raise ServeError(f"management key file {token_file} cannot be read ({e.strerror})") from e

        return cls(management_url, token)

    # --- the management API ------------------------------------------------------------------------

    def _call(self, method: str, path: str, timeout: float = 10.0) -> Any:
        try:
            status, body = request_json(
                method, f"{self.management_url}{path}", token=self._token(), timeout=timeout
            )
        except OSError as e:
            raise ServeError(
                f"TorchServe's management API at {self.management_url} cannot be reached: {e}"
            ) from e
        if status >= 300:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise ServeError(f"TorchServe answered {status} to {method} {path}: {message}")
        return body

    def policies(self) -> list[str]:
        """Names of the models TorchServe has registered."""
        names: list[str] = []
        page = ""
        while True:
            listed = self._call("GET", "/models?limit=100" + (f"&next_page_token={page}" if page else ""))
            if not isinstance(listed, dict):
                raise ServeError(f"TorchServe listed its models as {listed!r}, expected an object")
            names += [str(m.get("modelName")) for m in listed.get("models", [])]
            page = str(listed.get("nextPageToken") or "")
            if not page:
                return names

    def _versions(self, policy: str) -> list[VersionStatus]:
        described = self._call("GET", f"/models/{policy}/all")
        if not isinstance(described, list):
            raise ServeError(f"TorchServe described model {policy} as {described!r}, expected a list")
        default = self._call("GET", f"/models/{policy}")
        default_version = (
            str(default[0].get("modelVersion")) if isinstance(default, list) and default else None
        )
        aliases = {m.version: m.alias for m in self.state.models if m.name == policy} if self.state else {}
        out = []
        for entry in described:
            version = str(entry.get("modelVersion"))
            workers = entry.get("workers") or []
            out.append(
                VersionStatus(
                    name=policy,
                    version=version,
                    alias=aliases.get(version),
                    default=version == default_version,
                    workers=len(workers),
                    ready_workers=sum(1 for w in workers if w.get("status") == "READY"),
                    min_workers=int(entry.get("minWorkers") or 0),
                    batch_size=entry.get("batchSize"),
                    max_batch_delay_ms=entry.get("maxBatchDelay"),
                    # The flag selects rlops' batcher, which the local start installs with it.
                    batcher=ADAPTIVE if entry.get("continuousBatching") else DELAY,
                )
            )
        return out

    # --- ServingBackend --------------------------------------------------------------------------------

    def describe(self) -> ServerStatus:
        state = self.state
        names = sorted({m.name for m in state.models}) if state else self.policies()
        versions = [v for name in names for v in self._versions(name)]
        healthy = False
        if state is not None:
            keys = process.read_keys(Path(state.run_dir))
            try:
                code, ping = request_json("GET", f"{state.inference_url}/ping", token=keys.get("inference"))
                healthy = code == 200 and isinstance(ping, dict) and ping.get("status") == "Healthy"
            except OSError:
                healthy = False
        else:
            healthy = bool(versions) and all(v.ready_workers > 0 for v in versions)
        return ServerStatus(
            healthy=healthy,
            backend=NAME,
            inference_url=state.inference_url if state else "",
            metrics_url=state.metrics_url if state else "",
            versions=versions,
            pid=state.pid if state else None,
            run_dir=state.run_dir if state else None,
            decision_log_dir=state.decision_log_dir if state else None,
            key_file=state.key_file if state else None,
        )

    def set_default(self, policy: str, version: str) -> None:
        served = {v.version: v for v in self._versions(policy)}
        if str(version) not in served:
            restart = (
                f"; restart serving to load it: rlops serve stop --run-dir {self.run_dir} && "
                f"rlops serve start --name {policy} --run-dir {self.run_dir}"
                if self.run_dir
                else ""
            )
            raise ServeError(
                f"TorchServe does not serve version {version} of {policy} (it serves "
                f"{', '.join(sorted(served)) or 'nothing'}){restart}"
            )
        if served[str(version)].ready_workers == 0:
            raise ServeError(
                f"version {version} of {policy} is registered in TorchServe but has no ready worker"
            )
        if not served[str(version)].default:
            self._call("PUT", f"/models/{policy}/{version}/set-default")

    def scale(self, policy: str, version: str, workers: int) -> None:
        if type(workers) is not int or not 1 <= workers <= 64:
            raise ServeError(f"workers must be an integer between 1 and 64, got {workers!r}")
        # synchronous=true: the answer comes once the workers have started (or stopped).
        self._call(
            "PUT",
            f"/models/{policy}/{version}?min_worker={workers}&max_worker={workers}&synchronous=true",
            timeout=120.0,
        )

    def record_aliases(self, policy: str, aliases: dict[str, int]) -> None:
        if self.run_dir is None:
            return
        state = process.ServerState.read(self.run_dir)
        if state is None:
            return
        by_version = {str(v): a for a, v in aliases.items() if a in (CHAMPION, CANDIDATE)}
        for model in state.models:
            if model.name == policy:
                model.alias = by_version.get(model.version)
        state.write(self.run_dir)
        self.state = state

    def restart(self, plan: ServePlan) -> ServerStatus:
        if self.run_dir is None:
            raise ServeError(
                f"TorchServe at {self.management_url} is not a local server: it cannot be restarted from "
                "here (in a cluster the Rollout starts new pods)"
            )
        process.stop(self.run_dir)
        return start(plan.replace(run_dir=self.run_dir))


# --- starting a local server -------------------------------------------------------------------------


def _wait_ready(backend: TorchServeBackend, state: process.ServerState, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    problem = "no answer yet"
    run_dir = Path(state.run_dir)
    while time.monotonic() < deadline:
        if not process.alive(state):
            raise ServeError(f"torchserve exited while starting\n{process.log_tail(run_dir)}")
        try:
            report = backend.describe()
        except (OSError, ServeError) as e:
            problem = str(e)
        else:
            if report.healthy and all(v.ready_workers > 0 for v in report.versions):
                return
            problem = json.dumps([v.__dict__ for v in report.versions])
        time.sleep(0.25)
    raise ServeError(
        f"torchserve was not ready within {timeout_s:.0f} s ({problem})\n{process.log_tail(run_dir)}"
    )


def start(plan: ServePlan) -> ServerStatus:
    """Start TorchServe from ``plan.run_dir`` with the registry's champion of ``plan.policy`` (the default
    version) and its candidate, if set; returns once every version has a ready worker."""
    run_dir = Path(plan.run_dir).resolve()
    if process.running_state(run_dir) is not None:
        raise ServeError(
            f"a server from {run_dir} is already running; stop it first "
            f"(rlops serve stop --run-dir {run_dir})"
        )
    aliases = RegistryReader(plan.registry).aliases(plan.policy)
    if CHAMPION not in aliases:
        listed = ", ".join(f"{a} → {v}" for a, v in sorted(aliases.items())) or "none"
        raise ServeError(
            f"policy {plan.policy!r} has no champion to serve; promote a version first "
            f"(rlops registry promote). Aliases: {listed}"
        )
    settings = ModelSettings(
        batch_size=plan.batch_size,
        max_batch_delay_ms=plan.max_batch_delay_ms,
        min_workers=plan.workers,
        max_workers=plan.workers,
        batcher=plan.batcher,
    )
    store = run_dir / "model-store"
    served: list[process.ModelVersionState] = []
    models: list[ServedModel] = []
    wanted = [(CHAMPION, aliases[CHAMPION])]
    if aliases.get(CANDIDATE) not in (None, aliases[CHAMPION]):
        wanted.append((CANDIDATE, aliases[CANDIDATE]))
    for alias, version in wanted:
        built = build_archive(
            plan.registry,
            plan.policy,
            version,
            store,
            model_settings=settings,
            serving=plan.serving_settings(),
        )
        served.append(
            process.ModelVersionState(plan.policy, str(version), alias, built.path.name, settings.batcher)
        )
        models.append(ServedModel(plan.policy, str(version), built.path.name, settings))
    config = ServerConfig(
        model_store=store,
        metrics_config=run_dir / METRICS_FILE,
        models=tuple(models),
        inference_host=plan.host,
        inference_port=plan.port,
        management_port=plan.management_port,
        metrics_host=plan.metrics_host,
        metrics_port=plan.metrics_port,
        grpc_inference_port=plan.grpc_port,
        grpc_management_port=plan.grpc_port + 1,
        default_workers_per_model=plan.workers,
    )

    state = start_server(
        run_dir,
        config,
        served,
        decision_log_dir=plan.decision_log_dir,
        access_log=plan.access_log,
        log_max_bytes=plan.log_max_bytes,
        timeout_s=plan.timeout_s,
    )
    return TorchServeBackend.local(Path(state.run_dir)).describe()


def start_server(
    run_dir: Path,
    config: ServerConfig,
    served: list[process.ModelVersionState],
    *,
    decision_log_dir: Path | None = None,
    access_log: bool = False,
    log_max_bytes: int = LOG_MAX_BYTES,
    timeout_s: float = 120.0,
) -> process.ServerState:
    """Start TorchServe with ``config`` (its archives already in the model store) and wait until every
    version has a ready worker; for a server beyond what a plan describes (benchmarks, tests)."""
    run_dir = Path(run_dir).resolve()

    def ready(state: process.ServerState) -> None:
        backend = TorchServeBackend(
            state.management_url,
            lambda: process.read_keys(run_dir).get("management"),
            run_dir=run_dir,
            state=state,
        )
        _wait_ready(backend, state, timeout_s)

    return process.start(
        run_dir,
        config,
        served,
        decision_log_dir=decision_log_dir,
        access_log=access_log,
        log_max_bytes=log_max_bytes,
        wait_ready=ready,
    )


BACKEND = TorchServeBackend
"""The backend class (rlops_server.serving looks it up by this name)."""


def stop(run_dir: Path, timeout_s: float = 30.0) -> str:
    return process.stop(run_dir, timeout_s)


def inference_token(run_dir: Path) -> Callable[[], str | None]:
    """The inference key of the server in ``run_dir`` as a function that reads it afresh (TorchServe makes
    new keys at every start); a broken key file raises ServeError now."""
    process.read_keys(run_dir)
    return process.inference_token(run_dir)
