"""Serving metrics: names, labels, TorchServe's metrics.yaml, and a recorder that batches updates.

Names start with ``rlops_`` and carry their unit; every metric has the labels ``policy`` and
``version`` first. TorchServe 0.12 exports them on its metrics port in prometheus mode once they are
declared under ``model_metrics`` in the metrics config.

The latency histogram is exported as its three series (``_bucket`` with ``le``, ``_sum``, ``_count``),
each a TorchServe counter, rather than as a TorchServe histogram: a TorchServe histogram observes one
value per log line, so it would cost a line per request in the worker and in the frontend, and its
buckets are fixed (5 ms … 10 s). The recorder counts requests per bucket in memory and sends a few
lines a second; the buckets (:data:`rlops_contracts.metrics.LATENCY_BUCKETS`) resolve sub-millisecond
latencies. PromQL reads the series as any Prometheus histogram (``histogram_quantile`` over
``rate(rlops_inference_latency_seconds_bucket[5m])``); only the exposition's ``# TYPE`` says counter.

================================== ========= ==================== ============================================
name                               type      extra labels         meaning
================================== ========= ==================== ============================================
rlops_inference_latency_seconds    histogram le (bucket)          handler time of the server batch that
                                                                  answered the request, one per request
rlops_actions_total                counter   action               actions answered (Box policies: every
                                                                  decision under action="continuous")
rlops_rejected_requests_total      counter   reason               requests answered 4xx (reasons below)
rlops_nonfinite_outputs_total      counter                        observations with NaN/inf model outputs
rlops_fallback_total               counter   reason               actions answered by the fallback path
rlops_policy_entropy               gauge                          mean entropy (nats) of the served
                                                                  distributions since the last update
rlops_value_estimate               gauge                          mean max Q-value since the last update
                                                                  (q_values policies only)
rlops_observation_drift_bin_total  counter   feature, bin         observations per reference bin of the model
                                                                  card (PSI against its proportions in PromQL)
rlops_observation_reference_ratio  gauge     feature, bin         the card's share of training observations
                                                                  per bin (the PSI reference)
rlops_action_reference_ratio       gauge     action               the card's share of each action in the
                                                                  training data (Discrete policies)
rlops_action_drift_bin_total       counter   dimension, bin       Box policies: answered actions per reference
                                                                  bin of the card's reference.actions
rlops_action_bin_reference_ratio   gauge     dimension, bin       Box policies: the card's share of training
                                                                  actions per bin (the PSI reference)
rlops_action_value_sum             counter   dimension            Box policies: sum of the answered actions
rlops_action_value_count           counter   dimension            Box policies: actions answered (mean action
                                                                  = rate(_sum) / rate(_count))
rlops_decisions_logged_total       counter                        decision records written to the log
rlops_decision_log_dropped_total   counter                        decision records dropped (queue full)
================================== ========= ==================== ============================================

Updates are collected in memory and handed to the backend every ``flush_seconds`` by a background
thread (:class:`MetricsRecorder`): with TorchServe each update is a log line the frontend parses, so
per-decision updates on the request path would cost more than the policy itself.

Drift is counted per reference bin of the model card (:class:`ReferenceBins`): observation features
against ``reference.observation.bins`` and, for Box policies, action dimensions against
``reference.actions.bins``, with the same binning; PromQL turns the counts into a population stability
index per feature or dimension (``alerts/rules/policy.yaml``).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from rlops_contracts.metrics import (  # noqa: F401  (re-exported)
    ACTION_BIN_REFERENCE,
    ACTION_DRIFT_BIN,
    ACTION_REFERENCE,
    ACTION_VALUE_COUNT,
    ACTION_VALUE_SUM,
    ACTIONS,
    CONTINUOUS_ACTION,
    DECISION_LOG_DROPPED,
    DECISIONS_LOGGED,
    F_INFERENCE_ERROR,
    F_NONFINITE_OUTPUT,
    FALLBACK,
    FALLBACK_REASONS,
    INFERENCE_LATENCY,
    LATENCY_BUCKETS,
    NONFINITE_OUTPUTS,
    OBSERVATION_DRIFT_BIN,
    OBSERVATION_REFERENCE,
    POLICY_ENTROPY,
    POLICY_LABELS,
    R_BAD_FIELD,
    R_BAD_MASK,
    R_BAD_OBSERVATION,
    R_BAD_OPTION,
    R_BATCH_TOO_LARGE,
    R_EMPTY_BATCH,
    R_MALFORMED_JSON,
    R_MISSING_OBSERVATION,
    R_NONFINITE_OBSERVATION,
    R_NOT_AN_OBJECT,
    REJECT_REASONS,
    REJECTED_REQUESTS,
    VALUE_ESTIMATE,
)

log = logging.getLogger(__name__)


LATENCY_BUCKET = f"{INFERENCE_LATENCY}_bucket"
LATENCY_SUM = f"{INFERENCE_LATENCY}_sum"
LATENCY_COUNT = f"{INFERENCE_LATENCY}_count"
LATENCY_LE = [str(b) for b in LATENCY_BUCKETS] + ["+Inf"]
"""``le`` label values of :data:`LATENCY_BUCKET`, in bucket order."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str
    """counter or gauge (TorchServe's metric types; see the module docstring for the histogram)."""
    unit: str
    labels: tuple[str, ...]
    """Labels after ``policy`` and ``version``."""

    @property
    def dimensions(self) -> list[str]:
        return [*POLICY_LABELS, *self.labels]


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec(LATENCY_BUCKET, "counter", "count", ("le",)),
    MetricSpec(LATENCY_SUM, "counter", "s", ()),
    MetricSpec(LATENCY_COUNT, "counter", "count", ()),
    MetricSpec(ACTIONS, "counter", "count", ("action",)),
    MetricSpec(REJECTED_REQUESTS, "counter", "count", ("reason",)),
    MetricSpec(NONFINITE_OUTPUTS, "counter", "count", ()),
    MetricSpec(FALLBACK, "counter", "count", ("reason",)),
    MetricSpec(POLICY_ENTROPY, "gauge", "nats", ()),
    MetricSpec(VALUE_ESTIMATE, "gauge", "score", ()),
    MetricSpec(OBSERVATION_DRIFT_BIN, "counter", "count", ("feature", "bin")),
    MetricSpec(OBSERVATION_REFERENCE, "gauge", "ratio", ("feature", "bin")),
    MetricSpec(ACTION_REFERENCE, "gauge", "ratio", ("action",)),
    MetricSpec(ACTION_DRIFT_BIN, "counter", "count", ("dimension", "bin")),
    MetricSpec(ACTION_BIN_REFERENCE, "gauge", "ratio", ("dimension", "bin")),
    MetricSpec(ACTION_VALUE_SUM, "counter", "action", ("dimension",)),
    MetricSpec(ACTION_VALUE_COUNT, "counter", "count", ("dimension",)),
    MetricSpec(DECISIONS_LOGGED, "counter", "count", ()),
    MetricSpec(DECISION_LOG_DROPPED, "counter", "count", ()),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


# --- drift bins ------------------------------------------------------------------------------------

DRIFT_CHUNK_CELLS = 1 << 22
"""Comparisons per chunk when binning values (bounds the temporary boolean array to 4 MiB)."""


class ReferenceBins:
    """The reference bins of a model card, one list of ascending edges per column (observation feature or
    Box action dimension): ``card.reference.observation.bins`` or ``card.reference.actions.bins``.

    A value ``x`` of column ``j`` falls in bin ``searchsorted(edges[j], x, side='right')``, so column
    ``j`` has ``len(edges[j]) + 1`` bins, the first and last open-ended.
    """

    def __init__(self, bins: list[dict[str, list[float]]]) -> None:
        self.columns = len(bins)
        width = max(len(b["edges"]) for b in bins) if bins else 0
        edges = np.full((self.columns, width), np.inf)
        for j, b in enumerate(bins):
            edges[j, : len(b["edges"])] = b["edges"]
        self.edges = edges
        """float64 [columns, max_edges]: edges per column, padded with +inf (nothing reaches a pad)."""
        self.bins = np.array([len(b["edges"]) + 1 for b in bins], dtype=np.int64)
        """Bins per column."""
        self.proportions: list[list[float]] = [list(b["proportions"]) for b in bins]
        """The card's share of the training data per (column, bin)."""
        self.valid = np.arange(width + 1)[None, :] < self.bins[:, None]
        """bool [columns, max_edges + 1]: the (column, bin) cells of :meth:`counts` that exist."""

    def counts(self, values: np.ndarray) -> np.ndarray:
        """int64 [columns, max_edges + 1]: rows of ``values`` ([n, columns]) per (column, bin)."""
        width = self.edges.shape[1]
        counts = np.zeros((self.columns, width + 1), dtype=np.int64)
        if width == 0:
            counts[:, 0] = len(values)
            return counts
        flat_offsets = np.arange(self.columns, dtype=np.int64) * (width + 1)
        chunk = max(1, DRIFT_CHUNK_CELLS // max(1, self.columns * width))
        for start in range(0, len(values), chunk):
            x = values[start : start + chunk].astype(np.float64)
            bins = (x[:, :, None] >= self.edges[None, :, :]).sum(axis=2)
            counts += np.bincount((bins + flat_offsets).ravel(), minlength=counts.size).reshape(counts.shape)
        return counts


# --- recording -------------------------------------------------------------------------------------


Emit = Callable[[str, float, list[str]], None]
"""``emit(name, value, label_values)``: hand one update to the metrics backend; label values follow
:attr:`MetricSpec.dimensions`. Counters add ``value``, gauges are set to it."""


class BatchOutcome(Protocol):
    """What the recorder reads from a batch's decisions (rlops_server.runtime.Decisions)."""

    observations: np.ndarray
    actions: np.ndarray
    probabilities: np.ndarray
    scores: np.ndarray | None
    fallback: np.ndarray
    nonfinite: int
    errors: int


class LogCounters(Protocol):
    """The counters of a decision log (rlops_server.decision_log.DecisionLog)."""

    @property
    def written(self) -> int: ...

    @property
    def dropped(self) -> int: ...


class MetricsRecorder:
    """Accumulates serving metrics in memory and hands them to ``emit`` every ``flush_seconds``.

    The request path only appends references to the batch's arrays (:meth:`record_batch`) or bumps a
    counter. Everything else happens in :meth:`flush`, on a background thread and over all batches
    since the last flush at once: action counts, entropy of the served distributions, drift bins
    (``binner(observations) -> counts[feature, bin]``) and, for q_values policies (``values=True``),
    the mean of the best score per decision.

    With ``action_bins`` (the card's ``reference.actions.bins``) the policy is a Box policy: its actions
    are float vectors, counted per reference bin of each dimension and summed per dimension, every
    decision counted under ``action="continuous"``; it has no entropy (a density's differential entropy
    says nothing comparable) and no action shares (``reference`` holds no action proportions then).
    """

    MAX_PENDING_ROWS = 65_536
    """Observations held between flushes before the flusher is woken early."""

    def __init__(
        self,
        emit: Emit,
        policy: str,
        version: int | str | None,
        n_actions: int,
        binner: Callable[[np.ndarray], np.ndarray],
        bins_per_feature: np.ndarray,
        values: bool = False,
        flush_seconds: float = 1.0,
        decision_log: LogCounters | None = None,
        reference: tuple[list[list[float]], list[float]] | None = None,
        action_bins: ReferenceBins | None = None,
    ) -> None:
        self._emit = emit
        self.labels = [policy, "none" if version is None else str(version)]
        self.flush_seconds = flush_seconds
        self._binner = binner
        self._values = values
        bins = np.asarray(bins_per_feature, dtype=np.int64)
        # Label values of every (feature, bin) that exists, in the layout binner returns.
        self._drift_valid = np.arange(int(bins.max(initial=1)))[None, :] < bins[:, None]
        self._n_actions = n_actions
        self._action_labels = [str(a) for a in range(n_actions)]
        self._action_bins = action_bins
        self._action_reference = action_bins.proportions if action_bins is not None else None
        self._lock = threading.Lock()
        self._batches: list[BatchOutcome] = []
        self._pending_rows = 0
        # Requests per latency bucket (not cumulative; the last one is +Inf), their total seconds.
        self._latency_counts = [0] * len(LATENCY_LE)
        self._latency_sum = 0.0
        self._rejected: dict[str, int] = {}
        self._fallback: dict[str, int] = {}
        self._nonfinite = 0
        self._log = decision_log
        self._log_seen = (0, 0)
        # (per-feature bin proportions, action proportions) of the model card: emitted with the first
        # flush; gauges keep their value in the frontend, so once per worker is enough.
        self._reference = reference
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._emit_failures = 0

    # --- the request path ----------------------------------------------------------------------------

    def record_batch(self, outcome: BatchOutcome) -> None:
        """Keep one server batch's decisions for the next flush (its arrays must not change afterwards)."""
        with self._lock:
            self._batches.append(outcome)
            self._pending_rows += len(outcome.actions)
            if outcome.nonfinite:
                self._nonfinite += outcome.nonfinite
                self._fallback[F_NONFINITE_OUTPUT] = (
                    self._fallback.get(F_NONFINITE_OUTPUT, 0) + outcome.nonfinite
                )
            if outcome.errors:
                self._fallback[F_INFERENCE_ERROR] = self._fallback.get(F_INFERENCE_ERROR, 0) + outcome.errors
            full = self._pending_rows >= self.MAX_PENDING_ROWS
        if full:
            self._wake.set()

    def record_rejected(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def record_latency(self, seconds: float, requests: int) -> None:
        """``requests`` requests were answered ``seconds`` after their server batch started."""
        bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)  # the first bound >= seconds (le)
        with self._lock:
            self._latency_counts[bucket] += requests
            self._latency_sum += seconds * requests

    # --- flushing ------------------------------------------------------------------------------------

    def _send(self, name: str, value: float, extra: list[str] | None = None) -> None:
        try:
            self._emit(name, value, self.labels + extra if extra else list(self.labels))
        except Exception:  # a metrics backend problem must never take the worker down
            self._emit_failures += 1
            if self._emit_failures == 1:
                log.exception("metric %s could not be emitted; further failures are counted silently", name)

    def flush(self) -> None:
        """Hand everything accumulated since the last flush to the backend."""
        with self._flush_lock:
            with self._lock:
                batches, self._batches = self._batches, []
                self._pending_rows = 0
                latency_counts, self._latency_counts = self._latency_counts, [0] * len(LATENCY_LE)
                latency_sum, self._latency_sum = self._latency_sum, 0.0
                rejected, self._rejected = self._rejected, {}
                fallback, self._fallback = self._fallback, {}
                nonfinite, self._nonfinite = self._nonfinite, 0
            answered = sum(latency_counts)
            if answered:
                for le, cumulative in zip(LATENCY_LE, itertools.accumulate(latency_counts), strict=True):
                    self._send(LATENCY_BUCKET, cumulative, [le])
                self._send(LATENCY_SUM, latency_sum)
                self._send(LATENCY_COUNT, answered)
            for reason, count in rejected.items():
                self._send(REJECTED_REQUESTS, count, [reason])
            if nonfinite:
                self._send(NONFINITE_OUTPUTS, nonfinite)
            for reason, count in fallback.items():
                self._send(FALLBACK, count, [reason])
            if self._reference is not None:
                bins, actions = self._reference
                for j, proportions in enumerate(bins):
                    for b, share in enumerate(proportions):
                        self._send(OBSERVATION_REFERENCE, share, [str(j), str(b)])
                if self._action_bins is None:
                    for a, share in enumerate(actions):
                        self._send(ACTION_REFERENCE, share, [self._action_labels[a]])
                self._reference = None
            if self._action_reference is not None:
                for j, proportions in enumerate(self._action_reference):
                    for b, share in enumerate(proportions):
                        self._send(ACTION_BIN_REFERENCE, share, [str(j), str(b)])
                self._action_reference = None
            if batches:
                self._flush_decisions(batches)
            if self._log is not None:
                written, dropped = self._log.written, self._log.dropped
                if written > self._log_seen[0]:
                    self._send(DECISIONS_LOGGED, written - self._log_seen[0])
                if dropped > self._log_seen[1]:
                    self._send(DECISION_LOG_DROPPED, dropped - self._log_seen[1])
                self._log_seen = (written, dropped)

    def _flush_decisions(self, batches: list[BatchOutcome]) -> None:
        obs = np.concatenate([b.observations for b in batches])
        actions = np.concatenate([b.actions for b in batches])
        self._send_bins(OBSERVATION_DRIFT_BIN, self._binner(obs), self._drift_valid)
        if self._action_bins is not None:
            self._flush_box_actions(actions, self._action_bins)
            return
        probs = np.concatenate([b.probabilities for b in batches])
        good = ~np.concatenate([b.fallback for b in batches])
        counts = np.bincount(actions, minlength=self._n_actions)
        for a in np.flatnonzero(counts).tolist():
            self._send(ACTIONS, int(counts[a]), [self._action_labels[a]])
        if good.any():
            p = probs[good]
            entropy = -(p * np.log(np.where(p > 0.0, p, 1.0))).sum(axis=1)
            self._send(POLICY_ENTROPY, float(entropy.mean()))
            if self._values:
                scores = [b.scores[~b.fallback] for b in batches if b.scores is not None]
                if scores:
                    best = np.concatenate(scores).max(axis=1, initial=-np.inf)
                    best = best[np.isfinite(best)]
                    if len(best):
                        self._send(VALUE_ESTIMATE, float(best.mean()))

    def _flush_box_actions(self, actions: np.ndarray, bins: ReferenceBins) -> None:
        """Box actions ([n, k], every answered one, fallbacks included: drift is about what was served)."""
        self._send(ACTIONS, len(actions), [CONTINUOUS_ACTION])
        self._send_bins(ACTION_DRIFT_BIN, bins.counts(actions), bins.valid)
        sums = actions.astype(np.float64).sum(axis=0)
        for j, total in enumerate(sums.tolist()):
            self._send(ACTION_VALUE_SUM, total, [str(j)])
            self._send(ACTION_VALUE_COUNT, len(actions), [str(j)])

    def _send_bins(self, name: str, counts: np.ndarray, valid: np.ndarray) -> None:
        """The non-zero cells of ``counts[column, bin]`` that exist (``valid``), labelled column, bin."""
        columns, bins = np.nonzero((counts > 0) & valid)
        for j, b, count in zip(columns.tolist(), bins.tolist(), counts[columns, bins].tolist(), strict=True):
            self._send(name, count, [str(j), str(b)])

    def start(self) -> MetricsRecorder:
        """Flush every ``flush_seconds`` (or when many observations are pending) until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rlops-metrics", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # keep flushing: one bad batch must not end the metrics for good
                log.exception("flushing metrics failed")

    def close(self) -> None:
        """Stop the flusher and flush what is left. Idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        try:
            self.flush()
        except Exception:
            log.exception("the last metrics flush failed")
