"""Environment traffic that takes part in canaries, for as long as it is needed.

:func:`rlops_server.traffic.run_traffic` drives a fixed number of episodes through a client; a canary
needs traffic for as long as the rollout runs, and the count of requests each version answered at any
moment. :class:`BackgroundTraffic` runs it in rounds on a thread through a :class:`SplitClient` until
stopped, and :meth:`BackgroundTraffic.routed` reads the client's counts without waiting for a round.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from rlops_server.traffic import RewardSender, TrafficSummary, run_traffic

from rlops_delivery.split import SplitClient

log = logging.getLogger(__name__)


@dataclass
class TrafficTotals:
    episodes: int = 0
    steps: int = 0
    rewards_posted: int = 0
    rewards_failed: int = 0
    rounds: int = 0
    returns: list[float] = field(default_factory=list)
    error: str | None = None


class BackgroundTraffic:
    """Episodes of ``env_id`` through ``client`` on a thread, ``episodes_per_round`` at a time, until
    :meth:`stop`. Episode seeds keep counting across rounds, so no episode id repeats."""

    def __init__(
        self,
        client: SplitClient,
        rewards: RewardSender | None,
        env_id: str = "CartPole-v1",
        *,
        concurrency: int = 4,
        episodes_per_round: int = 40,
        max_steps: int | None = None,
        seed: int = 0,
    ) -> None:
        self.client = client
        self.rewards = rewards
        self.env_id = env_id
        self.concurrency = concurrency
        self.episodes_per_round = episodes_per_round
        self.max_steps = max_steps
        self.seed = seed
        self.totals = TrafficTotals()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> BackgroundTraffic:
        self._thread = threading.Thread(target=self._run, name="rlops-canary-traffic", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                summary: TrafficSummary = run_traffic(
                    self.client,
                    self.rewards,
                    self.env_id,
                    self.episodes_per_round,
                    concurrency=self.concurrency,
                    seed=self.seed + self.totals.rounds * self.episodes_per_round,
                    max_steps=self.max_steps,
                )
            except Exception as e:  # reported by stop(); the caller decides what it means
                log.exception("traffic round failed")
                self.totals.error = str(e)
                return
            t = self.totals
            t.rounds += 1
            t.episodes += summary.episodes
            t.steps += summary.steps
            t.rewards_posted += summary.rewards_posted
            t.rewards_failed += summary.rewards_failed
            t.returns.append(summary.mean_return)

    def counts(self, settle_s: float = 0.0) -> dict[str, dict[str, int]]:
        """So far: ``routed``, requests by where they were sent (``default`` or the candidate's version),
        and ``answered``, decisions by the version that answered them in time. With ``settle_s``, first
        wait (that long at most) for the requests in flight to come back, so the two compare."""
        if settle_s > 0:
            self.client.settle(settle_s)
        stats = self.client.stats()
        return {"routed": dict(stats["routed"]), "answered": dict(stats["answered"])}

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 120.0) -> TrafficTotals:
        """Finish the current round and stop; raises RuntimeError if a round failed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.totals.error:
            raise RuntimeError(f"the traffic stopped early: {self.totals.error}")
        return self.totals

    def __enter__(self) -> BackgroundTraffic:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120.0)
