"""Training metrics for Prometheus, the same names for the offline and the online trainer.

A trainer hands every metrics record it writes (one line of ``metrics.jsonl``: a flat mapping of
documented names to numbers) to :meth:`TrainingTelemetry.record`; the exporter turns the names it knows
into the ``rlops_train_*`` series of :mod:`rlops_contracts.metrics` and serves them on an HTTP
endpoint (``/metrics``, port :data:`~rlops_contracts.metrics.PORT_TRAINER_METRICS` by default) that
Prometheus scrapes. Every series carries the labels ``run``, ``algorithm`` and ``policy``; the loss
gauge also ``loss``, which names the term.

Record keys and the series they feed (a trainer reports only the ones that apply to it):

=========================  =====================================================================
``episode_return_mean``    ``rlops_train_episode_return`` (mean over the recent training episodes)
``episode_length_mean``    ``rlops_train_episode_length``
``loss`` and ``*_loss``    ``rlops_train_loss{loss=...}``: ``total``, ``policy``, ``value``, ``td``…
``cql_penalty``            ``rlops_train_loss{loss="cql_penalty"}``
``grad_norm``              ``rlops_train_grad_norm``
``entropy``                ``rlops_train_policy_entropy``
``q_mean``                 ``rlops_train_q_estimate``
``exploration_rate``       ``rlops_train_exploration_rate``
``step``                   ``rlops_train_steps_total`` (gradient steps, or learner updates online)
``env_steps``              ``rlops_train_env_steps_total``
``env_steps_per_s``        ``rlops_train_env_steps_per_second``
``eval_return``            ``rlops_train_eval_return``
``baseline_return``        ``rlops_train_baseline_return`` (the incumbent's return, set once at start)
=========================  =====================================================================

Every record also sets ``rlops_train_last_progress_timestamp_seconds`` (a stalled run stops moving
it), and a record holding a non-finite value counts one ``rlops_train_nonfinite_total``. The counters
follow the run's own totals, so a resumed run starts them where its checkpoint was; Prometheus'
``rate()`` treats the process restart as a counter reset.
"""

from __future__ import annotations

import errno
import math
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from rlops_contracts import metrics as m

LOSS_TERMS: dict[str, str] = {
    "loss": "total",
    "policy_loss": "policy",
    "value_loss": "value",
    "td_loss": "td",
    "actor_loss": "actor",
    "bc_loss": "bc",
    "kl_loss": "kl",
    "cql_penalty": "cql_penalty",
}
"""Record keys that are loss terms, and the value of the ``loss`` label each one gets."""

GAUGES: dict[str, str] = {
    "episode_return_mean": m.TRAIN_EPISODE_RETURN,
    "episode_length_mean": m.TRAIN_EPISODE_LENGTH,
    "grad_norm": m.TRAIN_GRAD_NORM,
    "entropy": m.TRAIN_POLICY_ENTROPY,
    "q_mean": m.TRAIN_Q_ESTIMATE,
    "exploration_rate": m.TRAIN_EXPLORATION_RATE,
    "env_steps_per_s": m.TRAIN_ENV_STEPS_PER_SECOND,
    "eval_return": m.TRAIN_EVAL_RETURN,
    "baseline_return": m.TRAIN_BASELINE_RETURN,
}
"""Record keys exported as gauges, by series name."""

COUNTERS: dict[str, str] = {"step": m.TRAIN_STEPS, "env_steps": m.TRAIN_ENV_STEPS}
"""Record keys that are running totals, exported as counters."""

_HELP: dict[str, str] = {
    m.TRAIN_EPISODE_RETURN: "Mean undiscounted return of the recent training episodes.",
    m.TRAIN_EPISODE_LENGTH: "Mean length of the recent training episodes, in environment steps.",
    m.TRAIN_LOSS: "Training loss of the last metrics window, by term (label loss).",
    m.TRAIN_GRAD_NORM: "L2 norm of the gradients before clipping.",
    m.TRAIN_POLICY_ENTROPY: "Mean entropy of the policy's action distribution on training data.",
    m.TRAIN_Q_ESTIMATE: "Mean Q-value estimate on training data.",
    m.TRAIN_EXPLORATION_RATE: "Share of actions taken for exploration (epsilon, or non-greedy samples).",
    m.TRAIN_STEPS: "Gradient steps (offline) or learner updates (online).",
    m.TRAIN_ENV_STEPS: "Environment steps sampled.",
    m.TRAIN_ENV_STEPS_PER_SECOND: "Environment steps sampled per second over the last iteration.",
    m.TRAIN_LAST_PROGRESS: "Unix time of the last metrics record.",
    m.TRAIN_EVAL_RETURN: "Mean return of the latest evaluation episodes.",
    m.TRAIN_BASELINE_RETURN: "Mean return of the incumbent policy (the registry's champion) in the run's "
    "environment: the level the evaluation return is compared with.",
    m.TRAIN_NONFINITE: "Metrics records that held a NaN or infinite value.",
}


class TelemetryError(RuntimeError):
    """The metrics endpoint cannot be served as asked (the port is taken, the address is wrong)."""


class TrainingTelemetry:
    """The training series of one run, in a registry of their own; optionally served over HTTP."""

    def __init__(self, *, run: str, algorithm: str, policy: str) -> None:
        self.registry = CollectorRegistry()
        self.labels = {"run": run, "algorithm": algorithm, "policy": policy}
        names = m.TRAINING_LABELS

        def gauge(name: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, _HELP[name], [*names, *extra], registry=self.registry)

        self._gauges = {key: gauge(name) for key, name in GAUGES.items()}
        self._loss = gauge(m.TRAIN_LOSS, ("loss",))
        self._last_progress = gauge(m.TRAIN_LAST_PROGRESS)
        self._counters = {
            key: Counter(name, _HELP[name], names, registry=self.registry) for key, name in COUNTERS.items()
        }
        self._nonfinite = Counter(m.TRAIN_NONFINITE, _HELP[m.TRAIN_NONFINITE], names, registry=self.registry)
        # Totals already added to each counter: records carry running totals, counters take increments.
        self._totals = dict.fromkeys(COUNTERS, 0.0)
        self._nonfinite.labels(**self.labels)
        self._server: Any = None
        self.port: int | None = None

    def record(self, record: Mapping[str, Any]) -> None:
        """Update the series from one metrics record; keys this module does not know are ignored."""
        nonfinite = False
        for key, value in record.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            value = float(value)
            nonfinite |= not math.isfinite(value)
            if key in GAUGES:
                self._gauges[key].labels(**self.labels).set(value)
            elif key in LOSS_TERMS:
                self._loss.labels(**self.labels, loss=LOSS_TERMS[key]).set(value)
            elif key in COUNTERS and math.isfinite(value) and value > self._totals[key]:
                self._counters[key].labels(**self.labels).inc(value - self._totals[key])
                self._totals[key] = value
        if nonfinite:
            self._nonfinite.labels(**self.labels).inc()
        self._last_progress.labels(**self.labels).set(time.time())

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread; port 0 picks a free port.

        Returns the port. Raises :class:`TelemetryError` when the port cannot be bound.
        """
        if self._server is not None:
            raise TelemetryError(f"the metrics endpoint is already served on port {self.port}")
        if not 0 <= port <= 65535:
            raise TelemetryError(f"metrics port must be in 0..65535, got {port}")
        try:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror or e})"
            raise TelemetryError(
                f"metrics endpoint {addr}:{port} {why}; choose another port (0 turns the endpoint off)"
            ) from e
        self._server = server
        self.port = int(server.server_address[1])
        return self.port

    def close(self) -> None:
        """Stop serving (the series stay readable through ``registry``)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def start(
    *, run: str, algorithm: str, policy: str, port: int, addr: str = "0.0.0.0"
) -> TrainingTelemetry | None:
    """A telemetry object serving on ``port``, or None when ``port`` is 0 (metrics off)."""
    if port == 0:
        return None
    telemetry = TrainingTelemetry(run=run, algorithm=algorithm, policy=policy)
    telemetry.serve(port, addr)
    return telemetry
