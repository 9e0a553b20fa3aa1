"""The trainer's Prometheus exporter: record keys to rlops_train_* series, the endpoint, the offline hook."""

from __future__ import annotations

import math
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from rlops_contracts import metrics as m
from rlops_trainer import telemetry
from rlops_trainer.algos import bc
from rlops_trainer.datasets import DatasetMeta, Transitions, box_space, discrete_space
from rlops_trainer.telemetry import TelemetryError, TrainingTelemetry
from rlops_trainer.training import RunOptions

LABELS = {"run": "r1", "algorithm": "ppo", "policy": "cartpole"}


def value(tel: TrainingTelemetry, name: str, **extra: str) -> float | None:
    return tel.registry.get_sample_value(name, {**LABELS, **extra})


def test_record_sets_gauges_losses_and_counters() -> None:
    tel = TrainingTelemetry(**LABELS)
    before = time.time()
    tel.record(
        {
            "iteration": 3.0,
            "step": 12.0,
            "env_steps": 6000.0,
            "env_steps_per_s": 3100.0,
            "episode_return_mean": 180.5,
            "episode_length_mean": 180.5,
            "loss": 1.5,
            "policy_loss": -0.02,
            "value_loss": 3.1,
            "entropy": 0.61,
            "grad_norm": 0.9,
            "exploration_rate": 0.2,
            "baseline_return": 450.0,
            "unknown_key": 7.0,
        }
    )
    assert value(tel, m.TRAIN_EPISODE_RETURN) == 180.5
    assert value(tel, m.TRAIN_EPISODE_LENGTH) == 180.5
    assert value(tel, m.TRAIN_LOSS, loss="total") == 1.5
    assert value(tel, m.TRAIN_LOSS, loss="policy") == -0.02
    assert value(tel, m.TRAIN_LOSS, loss="value") == 3.1
    assert value(tel, m.TRAIN_POLICY_ENTROPY) == 0.61
    assert value(tel, m.TRAIN_GRAD_NORM) == 0.9
    assert value(tel, m.TRAIN_EXPLORATION_RATE) == 0.2
    assert value(tel, m.TRAIN_BASELINE_RETURN) == 450.0
    assert value(tel, m.TRAIN_ENV_STEPS_PER_SECOND) == 3100.0
    assert value(tel, m.TRAIN_STEPS) == 12.0
    assert value(tel, m.TRAIN_ENV_STEPS) == 6000.0
    assert value(tel, m.TRAIN_NONFINITE) == 0.0
    progress = value(tel, m.TRAIN_LAST_PROGRESS)
    assert progress is not None
    assert before <= progress <= time.time()

    # Records carry running totals; the counters advance by the difference and never go back.
    tel.record({"step": 20.0, "env_steps": 8000.0})
    assert value(tel, m.TRAIN_STEPS) == 20.0
    assert value(tel, m.TRAIN_ENV_STEPS) == 8000.0
    tel.record({"step": 5.0})
    assert value(tel, m.TRAIN_STEPS) == 20.0


def test_nonfinite_records_are_counted() -> None:
    tel = TrainingTelemetry(**LABELS)
    tel.record({"loss": math.nan, "grad_norm": 1.0})
    tel.record({"loss": 1.0, "grad_norm": math.inf})
    tel.record({"loss": 1.0})
    assert value(tel, m.TRAIN_NONFINITE) == 2.0
    assert value(tel, m.TRAIN_LOSS, loss="total") == 1.0
    assert value(tel, m.TRAIN_GRAD_NORM) == math.inf


def test_offline_loss_terms_get_their_labels() -> None:
    tel = TrainingTelemetry(**LABELS)
    tel.record({"td_loss": 0.5, "cql_penalty": 0.25, "actor_loss": 0.125, "bc_loss": 2.0, "q_mean": 12.0})
    assert value(tel, m.TRAIN_LOSS, loss="td") == 0.5
    assert value(tel, m.TRAIN_LOSS, loss="cql_penalty") == 0.25
    assert value(tel, m.TRAIN_LOSS, loss="actor") == 0.125
    assert value(tel, m.TRAIN_LOSS, loss="bc") == 2.0
    assert value(tel, m.TRAIN_Q_ESTIMATE) == 12.0


def test_endpoint_serves_the_series_and_closes() -> None:
    tel = TrainingTelemetry(**LABELS)
    port = tel.serve(0, "127.0.0.1")
    try:
        tel.record({"episode_return_mean": 42.0, "env_steps": 100.0})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert f'{m.TRAIN_EPISODE_RETURN}{{algorithm="ppo",policy="cartpole",run="r1"}} 42.0' in body
        assert f"{m.TRAIN_ENV_STEPS}" in body
        assert m.TRAIN_LAST_PROGRESS in body
    finally:
        tel.close()
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_taken_port_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TelemetryError, match=rf"127\.0\.0\.1:{port} is in use"):
            TrainingTelemetry(**LABELS).serve(port, "127.0.0.1")
    with pytest.raises(TelemetryError, match=r"0\.\.65535"):
        TrainingTelemetry(**LABELS).serve(70000)


def test_port_zero_turns_the_endpoint_off() -> None:
    assert telemetry.start(run="r", algorithm="bc", policy="p", port=0) is None


def test_offline_training_loop_feeds_the_exporter() -> None:
    rng = np.random.default_rng(0)
    n = 400
    obs = rng.normal(size=(n, 4)).astype(np.float32)
    data = Transitions(
        episode_id=np.repeat(np.arange(20), 20),
        step=np.tile(np.arange(20), 20),
        observation=obs,
        action=(obs[:, 0] > 0).astype(np.int64),
        reward=np.ones(n, np.float32),
        next_observation=obs,
        terminated=np.tile(np.arange(20) == 19, 20),
        truncated=np.zeros(n, bool),
        behavior_logp=np.full(n, np.log(0.5), np.float32),
        meta=DatasetMeta("CartPole-v1", box_space([-5.0] * 4, [5.0] * 4), discrete_space(2), "test", "test"),
    )
    tel = TrainingTelemetry(run="offline", algorithm="bc", policy="p")
    records: list[dict[str, float]] = []

    def hook(record: dict[str, float]) -> None:
        records.append(record)
        tel.record(record)

    cfg = bc.BCConfig(steps=60, batch_size=32, hidden=(16,), seed=0)
    bc.train(cfg, data, RunOptions(log_every=20, progress=False, on_record=hook))
    assert [r["step"] for r in records] == [20, 40, 60]
    labels = {"run": "offline", "algorithm": "bc", "policy": "p"}
    assert tel.registry.get_sample_value(m.TRAIN_STEPS, labels) == 60.0
    assert tel.registry.get_sample_value(m.TRAIN_LOSS, {**labels, "loss": "bc"}) == records[-1]["bc_loss"]
    assert tel.registry.get_sample_value(m.TRAIN_GRAD_NORM, labels) == records[-1]["grad_norm"]
