"""Client for a served policy: an action within a deadline, or a safe fallback action.

An RL product acts in a control loop: an answer that comes late is as useless as none. Every call
has one deadline (``timeout``, 100 ms by default as in the seed) that covers connecting, retries and
reading the answer; when it passes, or the server fails, the call returns ``fallback_action`` with
``fallback=True`` and the reason, counts it per reason in :attr:`PolicyClient.fallbacks` and logs it
(at most once a second per reason).

Retries happen only where the request cannot have been processed:

- the connection could not be made (refused, unreachable, connect timeout): nothing was sent;
- TorchServe answered 503: its job queue was full and the request was refused before any worker saw it;
- TorchServe refused the token (0.12 answers 400 with ``"type": "InvalidKeyException"``; 401 is
  accepted too) and the token source now gives a different token: the server restarted with new keys
  and refused the request before any worker saw it.

Nothing else is retried. After a read timeout, a reset connection or another 5xx, the server may
already have chosen an action and written it to the decision log under this ``decision_id``;
sending the request again could log a second, different action for the same decision while the
caller acts on only one of them, and the logged propensities would no longer describe what happened.
Such calls fall back at once. (A pooled keep-alive connection that the server closed while idle is
detected by urllib3 before reuse and replaced, so it costs no retry.)

Connections are reused through one urllib3 connection pool per client, safe to share between threads.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 0.1

FallbackAction = int | Callable[[Sequence[float]], int]
"""A fixed action, or a function of the observation (a safe heuristic) returning one."""

# Fallback reasons, as counted in PolicyClient.fallbacks.
TIMEOUT = "timeout"
CONNECTION = "connection"
UNAVAILABLE = "unavailable"
SERVER_ERROR = "server_error"
REJECTED = "rejected"
BAD_RESPONSE = "bad_response"
REASONS = (TIMEOUT, CONNECTION, UNAVAILABLE, SERVER_ERROR, REJECTED, BAD_RESPONSE)


@dataclass(frozen=True)
class Decision:
    """What to do now. ``fallback`` is true when the action did not come from the policy's distribution
    (the client's fallback, or the server's own fallback for a non-finite model output)."""

    action: int | list[float]
    """An integer for a Discrete policy, a list of floats for a Box policy."""
    propensity: float
    """Probability of ``action`` under the served distribution; 1.0 for a fallback action and for Box
    actions (which have a density, ``log_density``, not a probability)."""
    version: int | str | None
    """Policy version that decided; ``None`` when the client fell back."""
    decision_id: str
    fallback: bool
    reason: str | None
    """Why the action is a fallback (one of :data:`REASONS`, or ``server:<why>``); ``None`` otherwise."""
    latency_s: float
    """Wall time of the call, retries included."""
    log_density: float | None = None
    """Box policies: log-density of ``action`` under the served distribution; None when it has none
    (deterministic serving, fallbacks)."""


class _Failure(Exception):
    def __init__(self, reason: str, detail: str, retry: bool) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.retry = reason, detail, retry


def _floats(observation: Any) -> list[float]:
    values = observation.tolist() if hasattr(observation, "tolist") else list(observation)
    return [float(v) for v in values]


def _token_refused(status: int, body: bytes) -> bool:
    """Whether TorchServe refused the request's token: 400 with its ``InvalidKeyException`` (0.12), or 401."""
    return status == 401 or (status == 400 and b"InvalidKeyException" in body[:500])


class PolicyClient:
    """Ask ``<base_url>/predictions/<model>[/<version>]`` for actions (see the module docstring).

    ``retries`` counts extra attempts after a safe failure; the n-th waits ``backoff * 2**(n-1)``
    seconds, within the deadline. ``token`` is TorchServe's inference key, sent as a bearer token, or a
    function returning the current key (e.g. :func:`rlops_server.serving.inference_token` over a run
    directory): TorchServe makes new keys at every start, and a client given a function follows them.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        version: int | str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retries: int = 2,
        backoff: float = 0.005,
        fallback_action: FallbackAction = 0,
        token: str | Callable[[], str | None] | None = None,
        pool_size: int = 8,
    ) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must look like http://host:port, got {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout}")
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must not be negative, got {retries} and {backoff}")
        self.model, self.version = model, version
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.fallback_action = fallback_action
        path = url.path.rstrip("/") + "/predictions/" + urllib.parse.quote(model, safe="")
        if version is not None:
            path += "/" + urllib.parse.quote(str(version), safe="")
        self.path = path
        self.url = f"{url.scheme}://{url.netloc}{path}"
        self._headers = {"Content-Type": "application/json"}
        self._token_source = token if callable(token) else None
        self._set_token(token() if callable(token) else token)
        pool_cls = urllib3.HTTPSConnectionPool if url.scheme == "https" else urllib3.HTTPConnectionPool
        # block=False: a burst beyond pool_size opens extra connections instead of waiting for one.
        self._pool = pool_cls(url.hostname, url.port, maxsize=pool_size, block=False, retries=False)
        self._lock = threading.Lock()
        self.requests = 0
        self.retried = 0
        self.fallbacks: Counter[str] = Counter()
        self._last_warned: dict[str, float] = {}
        self._unwarned: Counter[str] = Counter()

    # --- public API ---------------------------------------------------------------------------------

    def act(
        self,
        observation: Sequence[float] | Any,
        *,
        decision_id: str | None = None,
        episode_id: str | None = None,
        step: int | None = None,
        deterministic: bool | None = None,
        action_mask: Sequence[bool | int] | None = None,
    ) -> Decision:
        """One decision. ``decision_id`` defaults to a new uuid4 so that rewards can be posted for it."""
        obs = _floats(observation)
        decision_id = decision_id or uuid.uuid4().hex
        body: dict[str, Any] = {"observation": obs, "decision_id": decision_id}
        if episode_id is not None:
            body["episode_id"] = episode_id
        if step is not None:
            body["step"] = step
        if deterministic is not None:
            body["deterministic"] = deterministic
        if action_mask is not None:
            body["action_mask"] = list(action_mask)
        start = time.perf_counter()
        try:
            answer = self._call(body, start)
            decision = self._parse_one(answer, decision_id, start)
        except _Failure as f:
            return self._fallback(obs, decision_id, f, start)
        return decision

    def act_batch(
        self,
        observations: Sequence[Sequence[float]] | Any,
        *,
        decision_ids: Sequence[str] | None = None,
        episode_ids: Sequence[str | None] | None = None,
        steps: Sequence[int | None] | None = None,
        deterministic: bool | None = None,
    ) -> list[Decision]:
        """Decisions for several observations in one request (all fall back together on failure)."""
        obs = [_floats(o) for o in observations]
        n = len(obs)
        ids = list(decision_ids) if decision_ids is not None else [uuid.uuid4().hex for _ in range(n)]
        for name, seq in (("decision_ids", ids), ("episode_ids", episode_ids), ("steps", steps)):
            if seq is not None and len(seq) != n:
                raise ValueError(
                    f"{name} has {len(seq)} entries for {n} observations; give one per observation"
                )
        body: dict[str, Any] = {"observations": obs, "decision_ids": ids}
        if episode_ids is not None:
            body["episode_ids"] = list(episode_ids)
        if steps is not None:
            body["steps"] = list(steps)
        if deterministic is not None:
            body["deterministic"] = deterministic
        start = time.perf_counter()
        try:
            answer = self._call(body, start)
            items = answer.get("decisions") if isinstance(answer, dict) else answer
            if not isinstance(items, list) or len(items) != n:
                raise _Failure(BAD_RESPONSE, f"expected {n} decisions, got {str(answer)[:200]}", retry=False)
            return [self._parse_one(item, ids[i], start) for i, item in enumerate(items)]
        except _Failure as f:
            return [self._fallback(o, i, f, start) for o, i in zip(obs, ids, strict=True)]

    def stats(self) -> dict[str, Any]:
        """Counters since creation: requests, retries, fallbacks by reason."""
        with self._lock:
            return {"requests": self.requests, "retries": self.retried, "fallbacks": dict(self.fallbacks)}

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------------------

    def _call(self, body: dict[str, Any], start: float) -> Any:
        data = json.dumps(body, separators=(",", ":")).encode()
        deadline = start + self.timeout
        attempt = 0
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                raise _Failure(TIMEOUT, f"no answer within {self.timeout * 1e3:.0f} ms", retry=False)
            with self._lock:
                self.requests += 1
            try:
                return self._attempt(data, remaining)
            except _Failure as f:
                if not f.retry or attempt >= self.retries:
                    raise
                pause = self.backoff * 2**attempt
                if time.perf_counter() + pause >= deadline:
                    raise
                attempt += 1
                with self._lock:
                    self.retried += 1
                time.sleep(pause)

    def _set_token(self, token: str | None) -> None:
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        else:
            self._headers.pop("Authorization", None)

    def _refreshed_token(self) -> bool:
        """Whether the token source gives a new token (now in use)."""
        if self._token_source is None:
            return False
        try:
            token = self._token_source()
        except Exception as e:  # a half-written key file mid-restart: keep the old token, fall back
            log.debug("token source failed: %s", e)
            return False
        if not token or self._headers.get("Authorization") == f"Bearer {token}":
            return False
        with self._lock:
            self._set_token(token)
        return True

    def _attempt(self, data: bytes, remaining: float) -> Any:
        try:
            r = self._pool.urlopen(
                "POST",
                self.path,
                body=data,
                headers=self._headers,
                timeout=urllib3.Timeout(connect=remaining, read=remaining),
                retries=False,
                redirect=False,
                assert_same_host=False,
            )
        except NewConnectionError as e:
            raise _Failure(CONNECTION, f"cannot connect to {self.url}: {e}", retry=True) from None
        except ConnectTimeoutError:
            raise _Failure(TIMEOUT, f"connecting to {self.url} timed out", retry=True) from None
        except ReadTimeoutError:
            raise _Failure(TIMEOUT, f"no answer within {self.timeout * 1e3:.0f} ms", retry=False) from None
        except ProtocolError as e:
            raise _Failure(CONNECTION, f"connection to {self.url} broke: {e}", retry=False) from None
        except (HTTPError, OSError) as e:
            raise _Failure(CONNECTION, f"request to {self.url} failed: {e}", retry=False) from None
        if r.status == 503:
            raise _Failure(UNAVAILABLE, f"503 from {self.url}: {r.data[:200]!r}", retry=True)
        if _token_refused(r.status, r.data) and self._refreshed_token():
            raise _Failure(REJECTED, f"{r.status} from {self.url}: the server's keys changed", retry=True)
        if r.status >= 500:
            raise _Failure(SERVER_ERROR, f"{r.status} from {self.url}: {r.data[:200]!r}", retry=False)
        if r.status != 200:
            raise _Failure(REJECTED, f"{r.status} from {self.url}: {r.data[:500]!r}", retry=False)
        try:
            return json.loads(r.data)
        except ValueError:
            raise _Failure(BAD_RESPONSE, f"not JSON: {r.data[:200]!r}", retry=False) from None

    def _parse_one(self, answer: Any, decision_id: str, start: float) -> Decision:
        if not isinstance(answer, dict):
            raise _Failure(BAD_RESPONSE, f"expected a JSON object, got {str(answer)[:200]}", retry=False)
        action, propensity = answer.get("action"), answer.get("propensity", 1.0)
        log_density = answer.get("log_density")
        if isinstance(action, list):
            # A Box policy: a vector of finite numbers, a log-density or null, no probability.
            if not action or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in action
            ):
                raise _Failure(
                    BAD_RESPONSE, f"'action' is {action!r}, expected a list of finite numbers", retry=False
                )
            if log_density is not None and (
                isinstance(log_density, bool) or not isinstance(log_density, int | float)
            ):
                raise _Failure(
                    BAD_RESPONSE, f"'log_density' is {log_density!r}, expected a number or null", retry=False
                )
            action, propensity = [float(v) for v in action], 1.0
        elif isinstance(action, bool) or not isinstance(action, int):
            raise _Failure(
                BAD_RESPONSE, f"'action' is {action!r}, expected an integer or a list of numbers", retry=False
            )
        if isinstance(propensity, bool) or not isinstance(propensity, int | float):
            raise _Failure(BAD_RESPONSE, f"'propensity' is {propensity!r}, expected a number", retry=False)
        server_fallback = answer.get("fallback") is True
        reason = None
        if server_fallback:
            reason = f"server:{answer.get('reason') or answer.get('fallback_reason') or 'fallback'}"
            self._count(reason, f"the server answered its fallback action ({reason})")
        return Decision(
            action=action,
            propensity=float(propensity),
            version=answer.get("version"),
            decision_id=str(answer.get("decision_id") or decision_id),
            fallback=server_fallback,
            reason=reason,
            latency_s=time.perf_counter() - start,
            log_density=None if log_density is None else float(log_density),
        )

    def _fallback(self, obs: list[float], decision_id: str, failure: _Failure, start: float) -> Decision:
        self._count(failure.reason, failure.detail)
        fb = self.fallback_action
        action = fb(obs) if callable(fb) else fb
        return Decision(
            action=int(action),
            propensity=1.0,
            version=None,
            decision_id=decision_id,
            fallback=True,
            reason=failure.reason,
            latency_s=time.perf_counter() - start,
        )

    def _count(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        with self._lock:
            self.fallbacks[reason] += 1
            # One warning per reason and second: a flapping server must not flood the log.
            if now - self._last_warned.get(reason, -1e9) < 1.0:
                self._unwarned[reason] += 1
                return
            self._last_warned[reason] = now
            suppressed = self._unwarned.pop(reason, 0)
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        log.warning("fallback action for %s (%s): %s%s", self.model, reason, detail, more)
