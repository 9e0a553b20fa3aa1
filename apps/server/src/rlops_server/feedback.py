"""The reward feedback service: ``POST /rewards``, ``GET /healthz``, ``GET /metrics``.

Rewards reach the stack after the decision, often much later, and in bulk (a whole episode, or a
batch exported from the product). They are not inference: nothing needs the model, a GPU or the
handler's batching, and the work per reward is validate-and-append. So the endpoint is a small ASGI
service (Starlette on uvicorn) rather than a second TorchServe model:

- a request carries one reward or thousands, validated as a whole and answered with errors that name
  the index and field; TorchServe would split such bodies into its own per-request batching and give
  every reward a model worker's round trip;
- it scales on its own (replicas sized for the reward rate, not for inference) and is secured on its
  own (an optional bearer token for producers; TorchServe's tokens guard inference and management);
- a restart of the model server for a new policy version never drops rewards on the floor.

Rewards are appended through the same bounded, rotating writer as the decision log
(:class:`rlops_server.decision_log.DecisionLog`) to ``<dir>/rewards/date=YYYY-MM-DD/part-*.jsonl``.
A request is accepted or refused as a whole. Re-sending a batch is safe: the join keeps one reward
per ``decision_id``, so a producer may retry any request whose answer it did not see.

Prometheus counters (labels ``policy``/``version`` come from optional fields of the reward; the
reward rate per version is exact only after the join, the counters give the live view)::

    rlops_rewards_received_total{policy,version}
    rlops_rewards_rejected_total{reason}
    rlops_reward_positive_sum_total{policy,version}   sum of rewards > 0
    rlops_reward_negative_sum_total{policy,version}   sum of |rewards| < 0

The reward sum is split in two because a Prometheus counter must never decrease: mean reward per
decision = (rate(positive) - rate(negative)) / rate(received).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from rlops_contracts import REWARD_FIELDS
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rlops_server.decision_log import DecisionLog
from rlops_server.requests import shown, writable_utf8

log = logging.getLogger(__name__)


REWARDS_STREAM = "rewards"
REWARD_FILE_PREFIX = "part-"

MAX_BODY_BYTES = 16 << 20
MAX_HEADER_BYTES = 16 << 10
"""Largest header block (names and values): h11 enforces its 16 KiB limit only on a block that arrives in
pieces, so a block read in one go is measured here."""
MAX_REWARDS_PER_REQUEST = 10_000
MAX_OBSERVATION_LENGTH = 100_000
MAX_ERRORS_SHOWN = 20
MAX_VERSION = 2**63 - 1
"""Largest version label as a number: the reward log holds 64-bit integers."""
MAX_LABEL_SETS = 1000
"""Distinct (policy, version) label pairs before further ones count as ``other``: labels come from
producers, and unbounded label values would exhaust Prometheus."""

_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_INPUT_FIELDS = frozenset(REWARD_FIELDS) - {"time"}
_ACCEPTED_BODY = (
    f'one reward object, or {{"rewards": [reward, ...]}} with 1 to {MAX_REWARDS_PER_REQUEST} rewards'
)
_ACCEPTED = {
    "decision_id": "a non-empty string of at most 200 characters",
    "reward": "a finite number",
    "terminated": "true or false (default false)",
    "truncated": "true or false (default false); not both terminated and truncated",
    "next_observation": f"null or a list of 1 to {MAX_OBSERVATION_LENGTH} finite numbers",
    "policy": "null or a policy name (letters, digits, '.', '_', '-'; at most 100)",
    "version": "null, a positive integer, or a version label (letters, digits, '.', '_', '-')",
}


@dataclass(frozen=True)
class FieldError:
    """One invalid reward: which one (``index`` in the list, ``None`` for a single object) and why."""

    index: int | None
    field: str | None
    message: str
    accepted: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "field": self.field, "message": self.message, "accepted": self.accepted}


class RewardsRejected(ValueError):
    """The body cannot be accepted: ``status`` is the HTTP answer, ``reason`` the metric label."""

    def __init__(self, status: int, reason: str, message: str, errors: list[FieldError] | None = None):
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.errors = errors or []
        self.count = 1

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message}
        if self.errors:
            body["errors"] = [e.to_json() for e in self.errors]
        else:
            body["accepted"] = _ACCEPTED_BODY
        return body


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _is_finite(x: Any) -> bool:
    try:
        return _is_number(x) and math.isfinite(x)
    except OverflowError:  # an integer beyond the range of a float (JSON integers have no limit)
        return False


def validate_reward(obj: Any, index: int | None) -> tuple[dict[str, Any] | None, list[FieldError]]:
    """Check one reward object; returns the record to write (without ``time``) or the errors found."""
    errors: list[FieldError] = []

    def bad(field: str | None, message: str) -> None:
        accepted = _ACCEPTED.get(field or "", "an object with fields " + ", ".join(sorted(_INPUT_FIELDS)))
        errors.append(FieldError(index, field, message, accepted))

    if not isinstance(obj, dict):
        bad(None, f"a reward must be a JSON object, got {type(obj).__name__}")
        return None, errors
    for key in sorted(set(obj) - _INPUT_FIELDS, key=str):
        bad(key, f"unknown field {shown(key)}; accepted fields: {', '.join(sorted(_INPUT_FIELDS))}")

    decision_id = obj.get("decision_id")
    if "decision_id" not in obj:
        bad("decision_id", "missing")
    elif not isinstance(decision_id, str) or not decision_id or len(decision_id) > 200:
        bad("decision_id", f"got {shown(decision_id)}")
    elif not writable_utf8(decision_id):
        bad("decision_id", "holds a lone surrogate (\\ud800-\\udfff), which the UTF-8 reward log cannot hold")

    reward: Any = obj.get("reward")
    if "reward" not in obj:
        bad("reward", "missing")
    elif not _is_finite(reward):
        bad("reward", f"got {shown(reward)}")

    flags = {}
    for key in ("terminated", "truncated"):
        value = obj.get(key, False)
        if not isinstance(value, bool):
            bad(key, f"got {shown(value)}")
        flags[key] = value is True
    if flags["terminated"] and flags["truncated"]:
        bad("truncated", "terminated and truncated are both true: an episode ends one way")

    next_obs = obj.get("next_observation")
    if next_obs is not None:
        if not isinstance(next_obs, list) or not 1 <= len(next_obs) <= MAX_OBSERVATION_LENGTH:
            bad("next_observation", f"got {type(next_obs).__name__} of length {_length(next_obs)}")
        else:
            for i, v in enumerate(next_obs):
                if not _is_finite(v):
                    bad("next_observation", f"element {i} is {shown(v)}")
                    break

    policy = obj.get("policy")
    if policy is not None and not (isinstance(policy, str) and _LABEL_RE.match(policy)):
        bad("policy", f"got {shown(policy)}")
    version = obj.get("version")
    if version is not None and not (
        (isinstance(version, int) and not isinstance(version, bool) and 1 <= version <= MAX_VERSION)
        or (isinstance(version, str) and _LABEL_RE.match(version))
    ):
        bad("version", f"got {shown(version)}")

    if errors:
        return None, errors
    return {
        "decision_id": decision_id,
        "reward": float(reward),
        "terminated": flags["terminated"],
        "truncated": flags["truncated"],
        "next_observation": [float(v) for v in next_obs] if next_obs is not None else None,
        "time": 0.0,
        "policy": policy,
        "version": version,
    }, []


def _length(x: Any) -> int | str:
    return len(x) if isinstance(x, list) else "-"


def parse_rewards(body: bytes) -> list[dict[str, Any]]:
    """Parse and validate a request body; every reward valid, or :class:`RewardsRejected`."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RewardsRejected(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise RewardsRejected(400, "invalid_json", "the body is JSON nested too deeply to be read") from None
    if isinstance(payload, dict) and "rewards" in payload:
        extra = sorted(set(payload) - {"rewards"})
        items = payload["rewards"]
        if extra:
            raise RewardsRejected(400, "invalid_shape", f"unknown top-level keys {extra} beside 'rewards'")
        if not isinstance(items, list) or not 1 <= len(items) <= MAX_REWARDS_PER_REQUEST:
            size = len(items) if isinstance(items, list) else type(items).__name__
            raise RewardsRejected(
                413 if isinstance(items, list) and items else 400,
                "too_many" if isinstance(items, list) and items else "invalid_shape",
                f"'rewards' must be a list of 1 to {MAX_REWARDS_PER_REQUEST} rewards, got {size}",
            )
        indexed: Iterable[tuple[int | None, Any]] = enumerate(items)
        n = len(items)
    elif isinstance(payload, dict):
        indexed, n = [(None, payload)], 1
    else:
        raise RewardsRejected(400, "invalid_shape", f"the body is a JSON {type(payload).__name__}")

    records, errors = [], []
    for index, item in indexed:
        record, errs = validate_reward(item, index)
        if record is not None:
            records.append(record)
        errors.extend(errs)
    if errors:
        shown = errors[:MAX_ERRORS_SHOWN]
        more = f" (first {len(shown)} of {len(errors)} errors shown)" if len(errors) > len(shown) else ""
        bad_rewards = len({e.index for e in errors})
        rejected = RewardsRejected(
            422, "invalid_field", f"{bad_rewards} of {n} rewards are invalid; none was accepted{more}", shown
        )
        rejected.count = n
        raise rejected
    return records


class _LogCollector(Collector):
    """Exposes the reward log's own counters, read at scrape time."""

    def __init__(self, reward_log: DecisionLog) -> None:
        self.log = reward_log

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        yield CounterMetricFamily(
            "rlops_reward_log_written", "Reward records written to the reward log.", value=self.log.written
        )
        yield CounterMetricFamily(
            "rlops_reward_log_dropped",
            "Reward records refused because the log queue was full.",
            value=self.log.dropped,
        )
        yield CounterMetricFamily(
            "rlops_reward_log_failed", "Reward records lost to I/O errors.", value=self.log.failed
        )
        yield GaugeMetricFamily(
            "rlops_reward_log_pending_records",
            "Reward records queued, not yet written.",
            value=self.log.pending,
        )


class FeedbackMetrics:
    """The service's Prometheus metrics, in their own registry (one per app, so tests stay apart)."""

    def __init__(self, reward_log: DecisionLog) -> None:
        self.registry = CollectorRegistry()
        labels = ["policy", "version"]
        self.received = Counter(
            "rlops_rewards_received",
            "Rewards accepted, by policy and version.",
            labels,
            registry=self.registry,
        )
        self.rejected = Counter(
            "rlops_rewards_rejected",
            "Rewards refused, by reason (a body that is not even parsed counts once).",
            ["reason"],
            registry=self.registry,
        )
        self.positive = Counter(
            "rlops_reward_positive_sum",
            "Sum of the positive rewards accepted.",
            labels,
            registry=self.registry,
        )
        self.negative = Counter(
            "rlops_reward_negative_sum",
            "Sum of the absolute values of the negative rewards accepted.",
            labels,
            registry=self.registry,
        )
        self.registry.register(_LogCollector(reward_log))
        self._label_sets: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def _labels(self, policy: Any, version: Any) -> tuple[str, str]:
        key = ("unknown" if policy is None else str(policy), "unknown" if version is None else str(version))
        with self._lock:
            if key in self._label_sets:
                return key
            if len(self._label_sets) >= MAX_LABEL_SETS:
                return ("other", "other")
            self._label_sets.add(key)
        return key

    def accepted(self, records: list[dict[str, Any]]) -> None:
        sums: dict[tuple[str, str], list[float]] = {}
        for r in records:
            acc = sums.setdefault(self._labels(r["policy"], r["version"]), [0, 0.0, 0.0])
            acc[0] += 1
            if r["reward"] > 0:
                acc[1] += r["reward"]
            else:
                acc[2] -= r["reward"]
        for key, (n, pos, neg) in sums.items():
            self.received.labels(*key).inc(n)
            self.positive.labels(*key).inc(pos)
            self.negative.labels(*key).inc(neg)


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(
    directory: Path | str,
    *,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_queue: int = 100_000,
    rotate_bytes: int = 64 << 20,
    rotate_seconds: float = 300.0,
) -> Starlette:
    """The ASGI app. Its reward log is ``app.state.log`` and is closed (drained) on shutdown."""
    reward_log = DecisionLog(
        directory,
        max_queue=max_queue,
        rotate_bytes=rotate_bytes,
        rotate_seconds=rotate_seconds,
        stream=REWARDS_STREAM,
        file_prefix=REWARD_FILE_PREFIX,
        write_through=True,
    )
    metrics = FeedbackMetrics(reward_log)
    expected = f"Bearer {token}".encode() if token else None

    def reject(e: RewardsRejected) -> JSONResponse:
        metrics.rejected.labels(e.reason).inc(e.count)
        return _error(e.status, e.to_json())

    async def post_rewards(request: Request) -> Response:
        header_bytes = sum(len(k) + len(v) + 4 for k, v in request.scope["headers"])
        if header_bytes > MAX_HEADER_BYTES:
            metrics.rejected.labels("headers_too_large").inc()
            return _error(
                431,
                {
                    "error": f"the request's headers have {header_bytes} bytes; at most {MAX_HEADER_BYTES}",
                    "accepted": "a header block of at most 16 KiB",
                },
            )
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                metrics.rejected.labels("unauthorized").inc()
                return _error(
                    401,
                    {"error": "missing or wrong token", "accepted": "header 'Authorization: Bearer <token>'"},
                    {"WWW-Authenticate": "Bearer"},
                )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return reject(
                RewardsRejected(413, "too_large", f"the body has {declared} bytes; at most {max_body_bytes}")
            )
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    return reject(
                        RewardsRejected(413, "too_large", f"the body exceeds {max_body_bytes} bytes")
                    )
                chunks.append(chunk)
        except ClientDisconnect:
            # The producer went away mid-body: nothing was accepted and there is nobody to answer.
            metrics.rejected.labels("client_disconnect").inc()
            return Response(status_code=400)
        try:
            # Validating thousands of rewards takes milliseconds: keep it off the event loop.
            records = await run_in_threadpool(parse_rewards, b"".join(chunks))
        except RewardsRejected as e:
            return reject(e)
        now = time.time()
        for r in records:
            r["time"] = now
        # Written through to the operating system before the answer: an accepted reward survives a kill.
        accepted = await run_in_threadpool(reward_log.encode_and_write, records)
        metrics.accepted(records[:accepted])
        if accepted < len(records):
            metrics.rejected.labels("queue_full").inc(len(records) - accepted)
            return _error(
                503,
                {
                    "error": f"the reward log is full: {accepted} of {len(records)} rewards accepted; "
                    "send the request again (rewards are de-duplicated by decision_id)",
                    "accepted_count": accepted,
                },
                {"Retry-After": "1"},
            )
        return JSONResponse({"accepted": accepted}, status_code=202)

    async def healthz(request: Request) -> Response:
        body = {
            "status": "ok" if reward_log.healthy else "writer stopped",
            "pending": reward_log.pending,
            "written": reward_log.written,
            "dropped": reward_log.dropped,
            "failed": reward_log.failed,
        }
        return JSONResponse(body, status_code=200 if reward_log.healthy else 503)

    async def get_metrics(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(reward_log.close)

    app = Starlette(
        routes=[
            Route("/rewards", post_rewards, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", get_metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.log = reward_log
    app.state.metrics = metrics
    return app


def serve(
    directory: Path | str, host: str = "127.0.0.1", port: int = 8090, *, token: str | None = None
) -> None:
    """Run the service in the foreground until SIGINT/SIGTERM; the reward log is drained on the way out."""
    app = create_app(directory, token=token)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info", lifespan="on")


@contextlib.contextmanager
def serve_in_thread(
    directory: Path | str, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None, **options: Any
) -> Iterator[tuple[str, Starlette]]:
    """Run the service on a background thread (``port=0`` picks a free port); yields ``(base_url, app)``.

    For embedding next to other work in one process (the local demo, tests); leaving the block stops the
    server and drains the reward log.
    """
    app = create_app(directory, token=token, **options)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="rlops-feedback", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            app.state.log.close()
            raise RuntimeError(f"the feedback service did not start on {host}:{port} (see the log above)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}", app
    finally:
        server.should_exit = True
        thread.join(30)
