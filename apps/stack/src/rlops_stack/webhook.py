"""The actions webhook: Alertmanager's receiver for the alerts that act by themselves.

``POST /alerts`` takes Alertmanager's webhook payload (version 4). Every firing alert whose ``action``
label is ``rollback`` or ``scale_up`` is acted on for its ``policy`` and ``version`` labels
(:mod:`rlops_stack.actions`); other alerts and resolved ones are ignored. The same action for the same
policy version is not repeated within the cooldown, which makes the repeats Alertmanager sends while an
alert keeps firing harmless; rollback is idempotent on its own (it only moves a champion that is the
named version), scale-up is bounded by its maximum.

``GET /metrics`` (Prometheus) counts the actions by outcome and reports, asked of the serving backend
at scrape time, the workers and ready workers of every served version. ``GET /healthz``
answers once the app runs.

A bad payload is answered 400 with what was wrong and where; a missing or wrong bearer token 401.
Actions run one at a time, off the event loop.

Started by ``rlops stack up``, it logs to a file that rolls over by size (``--log-file``,
``--log-max-bytes``): ``webhook.log.1`` … ``.<backups>`` beside it, the names its earlier starts' logs
get too (:func:`rlops_server.runfiles.open_console_log`). Its stdout and stderr follow the current file.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from rlops_contracts.metrics import ACTIONS_TAKEN, SERVING_READY_WORKERS, SERVING_WORKERS
from rlops_server import serving
from rlops_server.backend import ServeError, ServingBackend
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlops_stack import actions
from rlops_stack.local import LOG_BACKUPS, WEBHOOK_LOG_MAX_BYTES, WebhookSettings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
PAYLOAD_VERSION = "4"


class PayloadError(ValueError):
    """The body is not an Alertmanager webhook payload; the message names the field."""


@dataclass(frozen=True)
class Alert:
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    fingerprint: str

    @property
    def name(self) -> str:
        return self.labels["alertname"]


def _strings(obj: Any, where: str) -> dict[str, str]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    ):
        raise PayloadError(f"{where} must be an object of strings")
    return dict(obj)


def parse_payload(body: bytes) -> list[Alert]:
    """The alerts of an Alertmanager webhook payload (version 4), validated."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError(f"the body is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise PayloadError(
            f"the body must be a JSON object (Alertmanager's webhook payload), got {type(data).__name__}"
        )
    if data.get("version") != PAYLOAD_VERSION:
        raise PayloadError(
            f"'version' must be {PAYLOAD_VERSION!r} (Alertmanager's webhook payload), "
            f"got {data.get('version')!r}"
        )
    items = data.get("alerts")
    if not isinstance(items, list):
        raise PayloadError("'alerts' must be a list")
    alerts = []
    for i, item in enumerate(items):
        where = f"alerts[{i}]"
        if not isinstance(item, dict):
            raise PayloadError(f"{where} must be an object")
        status = item.get("status")
        if status not in ("firing", "resolved"):
            raise PayloadError(f"{where}.status must be 'firing' or 'resolved', got {status!r}")
        labels = _strings(item.get("labels"), f"{where}.labels")
        if not labels.get("alertname"):
            raise PayloadError(f"{where}.labels has no alertname")
        annotations = _strings(item.get("annotations", {}), f"{where}.annotations")
        starts_at = item.get("startsAt", "")
        fingerprint = item.get("fingerprint", "")
        if not isinstance(starts_at, str) or not isinstance(fingerprint, str):
            raise PayloadError(f"{where}.startsAt and {where}.fingerprint must be strings")
        alerts.append(Alert(status, labels, annotations, starts_at, fingerprint))
    return alerts


def serving_of(settings: WebhookSettings) -> ServingBackend:
    """The server the webhook acts on: by management URL (cluster) or local run directory."""
    if settings.management_url:
        return serving.remote(settings.management_url, settings.management_token_file)
    return actions.local_serving(Path(settings.serve_run_dir))


class WorkersCollector(Collector):
    """Workers and ready workers per served version, asked of the serving backend at scrape time."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["policy", "version"]
        workers = GaugeMetricFamily(SERVING_WORKERS, "Serving workers per policy version", labels=labels)
        ready = GaugeMetricFamily(
            SERVING_READY_WORKERS, "Serving workers ready to answer per policy version", labels=labels
        )
        try:
            described = serving_of(self.settings).describe().versions
        except (actions.ActionError, ServeError, OSError):
            described = []  # no server: no samples (the torchserve target is down instead)
        for v in described:
            workers.add_metric([v.name, v.version], v.workers)
            ready.add_metric([v.name, v.version], v.ready_workers)
        yield workers
        yield ready


class Dispatcher:
    """Runs the action an alert asks for, once per cooldown per (action, policy, version)."""

    def __init__(self, settings: WebhookSettings, record_to: Path | None, counter: Counter) -> None:
        self.settings = settings
        self.record_to = record_to
        self.counter = counter
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str, str], float] = {}

    def handle(self, alert: Alert, received_at: float) -> actions.ActionResult | None:
        action = alert.labels.get("action")
        if alert.status != "firing" or action is None:
            return None
        policy, version = alert.labels.get("policy", ""), alert.labels.get("version", "")
        reason = (
            f"alert {alert.name} (started {alert.starts_at}): {alert.annotations.get('summary', '')}".strip()
        )
        extra = {
            "alert": alert.name,
            "labels": alert.labels,
            "starts_at": alert.starts_at,
            "received_at": received_at,
        }
        with self._lock:
            if action not in actions.ACTIONS or not policy or not version:
                result = actions.ActionResult(
                    str(action),
                    policy,
                    version or None,
                    actions.FAILED,
                    f"alert {alert.name}: action {action!r} needs labels policy and version and one of "
                    f"{', '.join(actions.ACTIONS)}",
                )
            else:
                key = (action, policy, version)
                since = time.monotonic() - self._last.get(key, -float("inf"))
                if since < self.settings.cooldown_s:
                    result = actions.ActionResult(
                        action,
                        policy,
                        version,
                        actions.SKIPPED,
                        f"{action} of {policy} version {version} ran "
                        f"{since:.0f} s ago (cooldown {self.settings.cooldown_s:g} s)",
                    )
                elif action == actions.ROLLBACK:
                    result = self._rollback(policy, version, reason)
                else:
                    result = self._scale_up(policy, version, reason)
                if result.outcome == actions.DONE:
                    self._last[key] = time.monotonic()
            actions.record(self.record_to, result, reason=reason, **extra)
        self.counter.labels(
            result.action if result.action in actions.ACTIONS else "unknown", result.outcome
        ).inc()
        return result

    def _serving(self) -> ServingBackend | None:
        """The server to act on by its management URL (cluster); None: the local run directory's."""
        if not self.settings.management_url:
            return None
        return serving.remote(self.settings.management_url, self.settings.management_token_file)

    def _scale_up(self, policy: str, version: str, reason: str) -> actions.ActionResult:
        return actions.scale_up(
            self.settings.serve_run_dir,
            policy,
            version,
            step=self.settings.scale_step,
            max_workers=self.settings.max_workers,
            reason=reason,
            backend=self._serving(),
        )

    def _rollback(self, policy: str, version: str, reason: str) -> actions.ActionResult:
        if not version.isdigit():
            return actions.ActionResult(
                actions.ROLLBACK,
                policy,
                version,
                actions.FAILED,
                f"version label {version!r} is not a version number",
            )
        return actions.rollback(
            self.settings.registry,
            policy,
            reason=reason,
            from_version=int(version),
            serve_run_dir=self.settings.serve_run_dir,
            backend=self._serving(),
            who="alertmanager",
        )


def create_app(settings: WebhookSettings, *, token: str | None, record_to: Path | None) -> Starlette:
    """The webhook app; ``token``: the bearer token Alertmanager must send (None: no check)."""
    registry = CollectorRegistry()
    counter = Counter(
        ACTIONS_TAKEN.removesuffix("_total"),
        "Actions run for alerts",
        ["action", "outcome"],
        registry=registry,
    )
    for action in actions.ACTIONS:
        for outcome in actions.OUTCOMES:
            counter.labels(action, outcome)
    registry.register(WorkersCollector(settings))
    dispatcher = Dispatcher(settings, record_to, counter)

    async def post_alerts(request: Request) -> Response:
        received_at = time.time()
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"the body is larger than {MAX_BODY_BYTES} bytes"}, status_code=413)
        try:
            alerts = parse_payload(body)
        except PayloadError as e:
            return JSONResponse(
                {"error": str(e), "accepted": "Alertmanager's webhook payload, version 4"}, status_code=400
            )
        results = []
        for alert in alerts:
            result = await run_in_threadpool(dispatcher.handle, alert, received_at)
            if result is not None:
                results.append(result.to_json())
        return JSONResponse({"results": results})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def get_metrics(request: Request) -> Response:
        data = await run_in_threadpool(generate_latest, registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/alerts", post_alerts, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", get_metrics, methods=["GET"]),
        ]
    )


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ValueError(f"--token-file {path}: cannot be read ({e.strerror})") from e
    if not token:
        raise ValueError(f"--token-file {path}: the file is empty")
    return token


class RotatingConsoleLog(logging.handlers.RotatingFileHandler):
    """A log file that rolls over by size, with the process's stdout and stderr pointed at the current file:
    what is printed rather than logged (a traceback, a warning) lands beside the log lines, not in an
    earlier file."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._follow()

    def doRollover(self) -> None:
        super().doRollover()
        self._follow()

    def _follow(self) -> None:
        if self.stream is None:
            return
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd in (1, 2):
            os.dup2(self.stream.fileno(), fd)


def serve(
    settings: WebhookSettings,
    *,
    host: str,
    port: int,
    token: str | None,
    record_to: Path | None,
    log_file: Path | None = None,
    log_max_bytes: int = WEBHOOK_LOG_MAX_BYTES,
    log_backups: int = LOG_BACKUPS,
) -> None:
    """Run the webhook in the foreground until interrupted; logs to stderr, or to ``log_file``, rolled
    over at ``log_max_bytes`` with ``log_backups`` earlier files kept."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    options: dict[str, Any] = {}
    if log_file is None:
        logging.basicConfig(level=logging.INFO, format=fmt)
    else:
        handler = RotatingConsoleLog(log_file, log_max_bytes, log_backups)
        handler.setFormatter(logging.Formatter(fmt))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        options["log_config"] = None  # uvicorn's loggers reach the file through the root logger
    app = create_app(settings, token=token, record_to=record_to)
    serving = settings.management_url or f"the one of {settings.serve_run_dir}"
    log.info(
        "actions webhook on http://%s:%d/alerts: registry %s, TorchServe %s",
        host,
        port,
        settings.registry,
        serving,
    )
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, **options)
