"""Faults to inject on purpose, to prove that the alert path works end to end (tests, drills, benchmarks).

:func:`write_slow_policy_dir` makes a policy version that answers exactly like an existing one (Discrete
or Box actions) but whose forward pass takes longer: the TorchScript module wraps the original and
multiplies a matrix before every pass. Nothing in serving is told about it (no handler setting, no sleep
in Python): TorchServe serves it like any version, and its latency histogram, the p99 recording rule and
``RlopsServingLatencyHigh`` see a genuinely slow model. :class:`Load` sends it (or any version) steady
traffic.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from rlops_contracts.artifact import seal
from rlops_contracts.card import read_card
from rlops_server.client import PolicyClient
from rlops_trainer.export import load_script

MATRIX = 256
"""Side of the square matrix multiplied per round: small enough for any CPU cache, one core each."""


class _SlowWork(torch.nn.Module):
    """``inner`` (a scripted rlops policy) and ``_work()``: ``rounds`` matrix products that add zero."""

    def __init__(self, inner: torch.jit.ScriptModule, rounds: int) -> None:
        super().__init__()
        self.inner = inner
        self.rounds = rounds
        self.size = MATRIX

    def _work(self) -> torch.Tensor:
        x = torch.full((self.size, self.size), 1.0 / self.size)
        for _ in range(self.rounds):
            x = x @ x  # stays at 1/size: the product of two such matrices is the same matrix
        return x[0, 0] * 0.0


class SlowPolicy(_SlowWork):
    """``inner`` (a scripted rlops Discrete policy) with ``rounds`` matrix products before each pass."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(obs) + self._work()

    @torch.jit.export
    def action_probs(self, obs: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        return self.inner.action_probs(obs + self._work(), temperature, epsilon)

    @torch.jit.export
    def scores_and_probs(
        self, obs: torch.Tensor, temperature: float, epsilon: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        delay = self._work()
        return self.inner.forward(obs) + delay, self.inner.action_probs(obs, temperature, epsilon)


class SlowBoxPolicy(_SlowWork):
    """``inner`` (a scripted rlops Box policy: ``forward``, ``pre_squash``, ``act``, ``log_prob``) with
    ``rounds`` matrix products before each pass."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(obs + self._work())

    @torch.jit.export
    def pre_squash(self, obs: torch.Tensor) -> torch.Tensor:
        return self.inner.pre_squash(obs + self._work())

    @torch.jit.export
    def act(self, obs: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.act(obs + self._work(), std)

    @torch.jit.export
    def log_prob(self, obs: torch.Tensor, action: torch.Tensor, std: float) -> torch.Tensor:
        return self.inner.log_prob(obs + self._work(), action, std)


def rounds_for(seconds: float) -> int:
    """Matrix products that take about ``seconds`` on this machine, in this process (one thread)."""
    x = torch.full((MATRIX, MATRIX), 1.0 / MATRIX)
    x @ x  # warm-up
    n, start = 20, time.perf_counter()
    for _ in range(n):
        x = x @ x
    per_round = max((time.perf_counter() - start) / n, 1e-6)
    return max(1, math.ceil(seconds / per_round))


def write_slow_policy_dir(source: Path, out: Path, seconds: float) -> Path:
    """A policy directory at ``out`` answering like ``source`` but ``seconds`` slower per pass.

    The card is ``source``'s (spaces, reference statistics) with ``hyperparameters.fault`` saying what was
    injected, so nobody mistakes the version for a trained one.
    """
    source, out = Path(source), Path(out)
    card = read_card(source)
    inner = load_script(source / card["policy"]["file"])
    rounds = rounds_for(seconds)
    slow: type[_SlowWork] = SlowBoxPolicy if card["action_space"]["type"] == "Box" else SlowPolicy
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        scripted = torch.jit.script(slow(inner, rounds).eval())
        out.mkdir(parents=True, exist_ok=False)
        policy_file = out / card["policy"]["file"]
        torch.jit.save(scripted, str(policy_file))
    card = json.loads(json.dumps(card))
    card.update(version=None, evaluation=None, gate=None)
    card["hyperparameters"] = {
        **card["hyperparameters"],
        "fault": {"kind": "slow_forward", "seconds": seconds, "matrix": MATRIX, "rounds": rounds},
    }
    card["lineage"] = [e for e in card["lineage"] if e.get("event") == "trained"][:1]
    card["files"] = {card["policy"]["file"]: ""}
    seal(out, card)
    return out


class Load:
    """Steady requests to one served version from ``clients`` threads, cycling through ``observations``.

    ``client()`` makes one :class:`rlops_server.client.PolicyClient` per thread. Counts what was answered
    (``answered``) and by the fallback (``fallbacks``) until :meth:`stop`.
    """

    def __init__(self, client: Callable[[], PolicyClient], observations: list[list[float]], clients: int = 2):
        if not observations or clients < 1:
            raise ValueError("Load needs observations and at least one client")
        self._client, self._observations = client, observations
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answered = self.fallbacks = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _run(self, offset: int) -> None:
        with self._client() as client:
            i = offset
            while not self._stop.is_set():
                decision = client.act(self._observations[i % len(self._observations)])
                i += len(self._threads)
                with self._lock:
                    self.answered += 1
                    self.fallbacks += int(decision.fallback)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
