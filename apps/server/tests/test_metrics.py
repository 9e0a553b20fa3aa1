"""MetricsRecorder's latency histogram: requests per bucket, cumulative ``le`` counts, sum and count."""

from __future__ import annotations

import numpy as np
import pytest
from rlops_server import metrics as m


def recorder() -> tuple[m.MetricsRecorder, list[tuple[str, float, list[str]]]]:
    sent: list[tuple[str, float, list[str]]] = []
    rec = m.MetricsRecorder(
        lambda name, value, labels: sent.append((name, value, labels)),
        "toy",
        3,
        n_actions=2,
        binner=lambda obs: np.zeros((1, 1), dtype=np.int64),
        bins_per_feature=np.array([1]),
    )
    return rec, sent


def buckets(sent: list[tuple[str, float, list[str]]]) -> dict[str, float]:
    return {labels[2]: value for name, value, labels in sent if name == m.LATENCY_BUCKET}


def test_latency_buckets_are_cumulative_and_le_inclusive() -> None:
    rec, sent = recorder()
    rec.record_latency(0.0007, 3)  # a server batch of three requests
    rec.record_latency(0.001, 1)  # exactly on a bound: counted in that bucket (le)
    rec.record_latency(0.02, 2)
    rec.record_latency(60.0, 1)  # beyond the last bound: only +Inf
    rec.flush()
    got = buckets(sent)
    assert list(got) == m.LATENCY_LE
    assert got["0.0005"] == 0
    assert got["0.001"] == 4
    assert got["0.0025"] == got["0.01"] == 4
    assert got["0.025"] == got["10.0"] == 6
    assert got["+Inf"] == 7
    [(_, total, labels)] = [s for s in sent if s[0] == m.LATENCY_SUM]
    assert labels == ["toy", "3"]
    assert total == pytest.approx(3 * 0.0007 + 0.001 + 2 * 0.02 + 60.0)
    assert [v for name, v, _ in sent if name == m.LATENCY_COUNT] == [7]


def test_latency_counts_restart_after_a_flush_and_idle_flushes_send_nothing() -> None:
    rec, sent = recorder()
    rec.record_latency(0.003, 2)
    rec.flush()
    sent.clear()
    rec.flush()  # nothing answered since: no latency lines (a counter update of 0 adds nothing)
    assert not [s for s in sent if s[0].startswith(m.INFERENCE_LATENCY)]
    rec.record_latency(0.2, 1)
    rec.flush()
    got = buckets(sent)
    assert got["0.005"] == 0
    assert got["0.25"] == 1
    assert got["+Inf"] == 1
    assert [v for name, v, _ in sent if name == m.LATENCY_COUNT] == [1]


def test_le_labels_match_the_bucket_bounds_promql_queries_use() -> None:
    # The SLO rules and dashboards select le="0.1"; the Prometheus clients' own bounds are all kept.
    assert "0.1" in m.LATENCY_LE
    assert m.LATENCY_LE[-1] == "+Inf"
    for bound in (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0):
        assert str(bound) in m.LATENCY_LE
    assert list(m.LATENCY_BUCKETS) == sorted(set(m.LATENCY_BUCKETS))
