"""Drive a real Gymnasium environment with actions from the served policy, and send its rewards back.

Each of ``concurrency`` workers owns one environment and runs whole episodes: per step it asks the
server for an action (:class:`rlops_server.client.PolicyClient`, with ``episode_id``, ``step`` and a
``decision_id`` derived from them), steps the environment, and keeps the reward. At the end of the
episode it posts the episode's rewards in one request to the feedback service, each with
``terminated`` / ``truncated`` and the observation that followed the step.

A step whose action came from the client's fallback gets no reward posted: the decision log may hold
a different action for that ``decision_id`` (the server can have decided after the client gave up),
and a reward joined onto an action that was not taken would corrupt the dataset. The join then sees
that decision as unrewarded, and the previous step still gets its next observation from its reward.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import urllib3
from urllib3.util import Retry

from rlops_server.client import PolicyClient

log = logging.getLogger(__name__)


class TrafficError(RuntimeError):
    """The run could not start (unknown environment, unreachable services); the message says which."""


@dataclass
class TrafficSummary:
    """What a traffic run did, as printed and written to the JSON summary."""

    env_id: str
    model: str
    episodes: int
    steps: int
    mean_return: float
    std_return: float
    min_return: float
    max_return: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    wall_time_s: float
    decisions_per_s: float
    fallbacks: dict[str, int] = field(default_factory=dict)
    """Fallback decisions by reason (client reasons, and ``server:…`` for the server's own fallback)."""
    errors: int = 0
    """Decisions whose request failed (every client fallback reason except ``timeout``)."""
    timeouts: int = 0
    retries: int = 0
    rewards_posted: int = 0
    rewards_failed: int = 0
    """Rewards the feedback service did not accept (after retries)."""
    rewards_skipped: int = 0
    """Rewards not posted because the step's action was a client fallback."""
    versions: dict[str, int] = field(default_factory=dict)
    """Decisions answered by each policy version."""
    run_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RewardSender:
    """Posts rewards in batches; safe to retry because the join keeps one reward per decision_id."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        self.url = base_url.rstrip("/") + "/rewards"
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        retry = Retry(total=4, backoff_factor=0.2, status_forcelist=(502, 503, 504), allowed_methods=None)
        self._http = urllib3.PoolManager(retries=retry, timeout=timeout)

    def send(self, rewards: list[dict[str, Any]]) -> str | None:
        """Post ``rewards``; ``None`` when accepted, else why not."""
        body = json.dumps({"rewards": rewards}, separators=(",", ":")).encode()
        try:
            r = self._http.request("POST", self.url, body=body, headers=self._headers)
        except urllib3.exceptions.HTTPError as e:
            return f"{self.url}: {e}"
        if r.status != 202:
            return f"{self.url} answered {r.status}: {r.data[:300].decode(errors='replace')}"
        return None

    def check(self) -> None:
        """Fail early when the feedback service is not there."""
        health = self.url.removesuffix("/rewards") + "/healthz"
        try:
            r = self._http.request("GET", health, retries=Retry(total=2, backoff_factor=0.2))
        except urllib3.exceptions.HTTPError as e:
            raise TrafficError(f"the feedback service at {health} is not reachable: {e}") from None
        if r.status != 200:
            raise TrafficError(
                f"the feedback service at {health} is not healthy: {r.status} {r.data[:200]!r}"
            )


@dataclass
class _Totals:
    returns: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    steps: int = 0
    rewards_posted: int = 0
    rewards_failed: int = 0
    rewards_skipped: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    first_error: str | None = None


def _env_action(space: Any) -> Callable[[int | list[float]], Any]:
    """What ``env.step`` takes for an answered action: the integer of a Discrete policy, or for a Box
    environment the vector as an array of the space's shape. The client's own fallback is an integer
    (it does not know the policy's space); in a Box environment it becomes the middle of the bounds."""
    import gymnasium as gym

    if not isinstance(space, gym.spaces.Box):
        return lambda action: action
    middle = ((space.low.astype(np.float64) + space.high.astype(np.float64)) / 2).astype(space.dtype)

    def box(action: int | list[float]) -> Any:
        if isinstance(action, list):
            return np.asarray(action, dtype=space.dtype).reshape(space.shape)
        return middle

    return box


def run_traffic(
    client: PolicyClient,
    rewards: RewardSender | None,
    env_id: str,
    episodes: int,
    *,
    concurrency: int = 1,
    seed: int = 0,
    deterministic: bool | None = None,
    max_steps: int | None = None,
    on_episode: Callable[[float], None] | None = None,
) -> TrafficSummary:
    """Run ``episodes`` episodes of ``env_id`` on ``concurrency`` threads (episode i seeded ``seed + i``)."""
    import gymnasium as gym

    if episodes < 1 or concurrency < 1:
        raise TrafficError(f"episodes and concurrency must be at least 1, got {episodes} and {concurrency}")
    try:
        envs = [gym.make(env_id) for _ in range(min(concurrency, episodes))]
    except gym.error.Error as e:
        raise TrafficError(f"cannot make environment {env_id!r}: {e}") from None
    if rewards is not None:
        rewards.check()
    env_action = _env_action(envs[0].action_space)
    run_id = uuid.uuid4().hex[:12]
    totals = _Totals()
    lock = threading.Lock()
    next_episode = iter(range(episodes))

    def worker(env: Any) -> None:
        while True:
            with lock:
                i = next(next_episode, None)
            if i is None:
                return
            _episode(env, i)

    def _episode(env: Any, i: int) -> None:
        episode_id = f"{run_id}-{i}"
        obs, _ = env.reset(seed=seed + i)
        total, step, done = 0.0, 0, False
        posted: list[dict[str, Any]] = []
        latencies: list[float] = []
        versions: Counter[str] = Counter()
        skipped = 0
        while not done and (max_steps is None or step < max_steps):
            d = client.act(
                obs,
                decision_id=f"{episode_id}-{step}",
                episode_id=episode_id,
                step=step,
                deterministic=deterministic,
            )
            latencies.append(d.latency_s)
            next_obs, reward, terminated, truncated, _ = env.step(env_action(d.action))
            done = bool(terminated or truncated)
            total += float(reward)
            if d.fallback and not (d.reason or "").startswith("server:"):
                skipped += 1
            else:
                versions[str(d.version)] += 1
                posted.append(
                    {
                        "decision_id": d.decision_id,
                        "reward": float(reward),
                        "terminated": bool(terminated),
                        "truncated": bool(truncated),
                        "next_observation": np.asarray(next_obs, dtype=np.float64).tolist(),
                        "policy": client.model,
                        "version": d.version,
                    }
                )
            obs = next_obs
            step += 1
        error = rewards.send(posted) if rewards is not None and posted else None
        with lock:
            totals.returns.append(total)
            totals.latencies.extend(latencies)
            totals.steps += step
            totals.versions.update(versions)
            totals.rewards_skipped += skipped
            if rewards is not None:
                if error is None:
                    totals.rewards_posted += len(posted)
                else:
                    totals.rewards_failed += len(posted)
                    totals.first_error = totals.first_error or error
        if on_episode is not None:
            on_episode(total)

    start = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(env,), name=f"rlops-traffic-{k}") for k, env in enumerate(envs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for env in envs:
        env.close()

    stats = client.stats()
    fallbacks = dict(stats["fallbacks"])
    returns = np.asarray(totals.returns, dtype=np.float64)
    lat_ms = np.asarray(totals.latencies, dtype=np.float64) * 1e3
    p50, p99, pmax = (float(np.percentile(lat_ms, q)) if lat_ms.size else math.nan for q in (50, 99, 100))
    summary = TrafficSummary(
        env_id=env_id,
        model=client.model,
        episodes=len(returns),
        steps=totals.steps,
        mean_return=float(returns.mean()),
        std_return=float(returns.std()),
        min_return=float(returns.min()),
        max_return=float(returns.max()),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        latency_max_ms=pmax,
        wall_time_s=wall,
        decisions_per_s=totals.steps / wall if wall > 0 else 0.0,
        fallbacks=fallbacks,
        errors=sum(
            n for reason, n in fallbacks.items() if not reason.startswith("server:") and reason != "timeout"
        ),
        timeouts=fallbacks.get("timeout", 0),
        retries=int(stats["retries"]),
        rewards_posted=totals.rewards_posted,
        rewards_failed=totals.rewards_failed,
        rewards_skipped=totals.rewards_skipped,
        versions=dict(sorted(totals.versions.items())),
        run_id=run_id,
    )
    if totals.first_error:
        log.error("%d rewards were not accepted: %s", totals.rewards_failed, totals.first_error)
    return summary
