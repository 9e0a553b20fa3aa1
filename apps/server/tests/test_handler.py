"""The TorchServe handler with a stand-in for TorchServe: its real Context and metrics cache, no frontend.

TorchServe calls ``initialize(context)`` once per worker and ``handle(batch, context)`` per server batch;
the answers' statuses live in the context's request processors, as the frontend reads them.
"""

from __future__ import annotations

import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rlops_server import metrics as m
from rlops_server.decision_log import DECISION_FIELDS, complete_files
from rlops_server.runtime import PolicyLoadError
from rlops_server.torchserve import metrics_config as mc
from rlops_server.torchserve import worker
from rlops_server.torchserve.archive import VERSION_KEY
from rlops_server.torchserve.handler import PolicyHandler
from server_testkit import POISON, write_policy_dir
from ts.context import Context, RequestProcessor
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.protocol import otf_message_handler

OBS = [0.5, 2.0, -1.0, 0.3]
METRIC_LINE = re.compile(
    r"^\[METRICS\](?P<name>\w+)\.\w+:(?P<value>[^|]+)\|#(?P<dims>[^|]*)\|#type:(?P<type>\w+)"
)


class MetricLines(logging.Handler):
    """Collects the metric lines the worker prints for the frontend (TorchServe's metrics protocol)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def parsed(self, name: str) -> list[tuple[dict[str, str], float]]:
        out = []
        for line in self.lines:
            match = METRIC_LINE.match(line)
            if match and match["name"] == name:
                dims = dict(d.split(":", 1) for d in match["dims"].split(",") if d)
                out.append((dims, float(match["value"])))
        return out

    def total(self, name: str, **labels: str) -> float:
        return sum(v for dims, v in self.parsed(name) if all(dims.get(k) == x for k, x in labels.items()))


@pytest.fixture
def metric_lines() -> Iterator[MetricLines]:
    collector = MetricLines()
    logger = logging.getLogger("ts.metrics")
    logger.addHandler(collector)
    yield collector
    logger.removeHandler(collector)


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    # initialize() tunes the worker process (root log level, SIGTERM); the test process must not keep it.
    root_level = logging.getLogger().level
    sigterm = signal.getsignal(signal.SIGTERM)
    read, parse = otf_message_handler._retrieve_buffer, otf_message_handler._retrieve_inference_msg
    yield
    logging.getLogger().setLevel(root_level)
    signal.signal(signal.SIGTERM, sigterm)
    otf_message_handler._retrieve_buffer, otf_message_handler._retrieve_inference_msg = read, parse


@pytest.fixture(scope="module")
def metrics_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mc.write_metrics_config(tmp_path_factory.mktemp("metrics") / "metrics.yaml")


def make_context(model_dir: Path, metrics_yaml: Path, version: str = "1", **handler: Any) -> Context:
    cache = MetricsCacheYamlImpl(str(metrics_yaml))
    cache.initialize_cache()
    cache.model_name = "toy"
    manifest = {"model": {"modelName": "toy", "modelVersion": version, "handler": "handler.py"}}
    return Context(
        "toy",
        str(model_dir),
        manifest,
        8,
        None,
        "0.12.0",
        metrics=cache,
        model_yaml_config={"handler": handler},
    )


def handle(h: PolicyHandler, ctx: Context, bodies: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """Run one server batch as the worker does; (status, JSON body) per request."""
    ctx.request_ids = {i: f"req-{i}" for i in range(len(bodies))}
    ctx.request_processor = [RequestProcessor({}) for _ in bodies]
    ctx.metrics.set_request_ids(ctx.request_ids)
    rows = [{"body": b} if b is not None else {} for b in bodies]
    out = h.handle(rows, ctx)
    assert len(out) == len(bodies)
    results = []
    for i, raw in enumerate(out):
        assert ctx.get_response_content_type(i) == "application/json"
        results.append((ctx.get_response_status(i)[0], json.loads(raw)))
    return results


@pytest.fixture
def handler(policy_dir: Path, metrics_yaml: Path, tmp_path: Path) -> Iterator[tuple[PolicyHandler, Context]]:
    ctx = make_context(policy_dir, metrics_yaml, decision_log_dir=str(tmp_path / "log"), seed=0)
    h = PolicyHandler()
    h.initialize(ctx)
    yield h, ctx
    h.shutdown()


def test_initialize_tunes_the_worker(
    handler: tuple[PolicyHandler, Context], metric_lines: MetricLines
) -> None:
    _, ctx = handler
    reader = otf_message_handler._retrieve_buffer
    assert isinstance(reader, worker.FrameReader)
    assert otf_message_handler._retrieve_inference_msg == reader.inference_msg
    # What TorchServe's Service.predict does after every batch: no line for the frontend to parse.
    ctx.metrics.add_time("PredictionTime", 1.0)
    assert not [line for line in metric_lines.lines if "PredictionTime" in line]


def test_single_request(handler: tuple[PolicyHandler, Context]) -> None:
    h, ctx = handler
    [(status, body)] = handle(h, ctx, [{"observation": OBS, "decision_id": "d-1"}])
    assert status == 200
    assert body == {
        "action": 1,
        "propensity": 1.0,
        "policy": "toy",
        "version": 1,
        "decision_id": "d-1",
        "fallback": False,
    }


def test_batch_request(handler: tuple[PolicyHandler, Context]) -> None:
    h, ctx = handler
    [(status, body)] = handle(
        h, ctx, [{"observations": [OBS, [3.0, 0.0, 0.0, 0.0]], "return": ["probabilities"]}]
    )
    assert status == 200
    assert [d["action"] for d in body["decisions"]] == [1, 0]
    assert all(d["propensity"] == d["probabilities"][d["action"]] for d in body["decisions"])


def test_raw_bytes_and_missing_bodies(handler: tuple[PolicyHandler, Context]) -> None:
    h, ctx = handler
    results = handle(h, ctx, [json.dumps({"observation": OBS}).encode(), b"{oops", None])
    assert [s for s, _ in results] == [200, 400, 400]
    assert results[1][1]["reason"] == "malformed_json"
    assert "Content-Type: application/json" in results[2][1]["accepted"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ([1, 2, 3], 400, "not_an_object"),
        ({"observation": [1.0, 2.0]}, 422, "bad_observation"),
        ({"observation": ["a", "b", "c", "d"]}, 422, "bad_observation"),
        ({"observation": [float("nan"), 0, 0, 0]}, 422, "nonfinite_observation"),
        ({"observations": []}, 422, "empty_batch"),
        ({"observations": [OBS] * 1025}, 413, "batch_too_large"),
        ({"observation": OBS, "action_mask": [0, 0, 0]}, 422, "bad_mask"),
        ({"observation": OBS, "temperature": 50}, 422, "bad_option"),
        ({"observation": OBS, "colour": "red"}, 400, "bad_field"),
    ],
)
def test_bad_input_is_a_4xx_with_a_json_body(
    handler: tuple[PolicyHandler, Context], metric_lines: MetricLines, body: Any, status: int, reason: str
) -> None:
    h, ctx = handler
    [(got, out)] = handle(h, ctx, [body])
    assert got == status
    assert out["reason"] == reason
    assert out["error"]
    assert out["accepted"]
    h.recorder.flush()
    assert metric_lines.total(m.REJECTED_REQUESTS, reason=reason, policy="toy", version="1") == 1


def test_a_bad_request_does_not_fail_its_batch(
    handler: tuple[PolicyHandler, Context], tmp_path: Path
) -> None:
    h, ctx = handler
    bodies = [
        {"observation": OBS, "decision_id": "a"},
        {"observation": [1.0]},
        b"not json",
        {"observations": [OBS, OBS], "decision_ids": ["b", "c"]},
    ]
    results = handle(h, ctx, bodies)
    assert [s for s, _ in results] == [200, 422, 400, 200]
    assert results[0][1]["decision_id"] == "a"
    assert [d["decision_id"] for d in results[3][1]["decisions"]] == ["b", "c"]
    h.shutdown()
    records = [
        json.loads(line) for f in complete_files(tmp_path / "log") for line in f.read_text().splitlines()
    ]
    assert sorted(r["decision_id"] for r in records) == ["a", "b", "c"]
    assert all(list(r) == list(DECISION_FIELDS) for r in records)


def test_nonfinite_outputs_are_flagged_and_counted(
    handler: tuple[PolicyHandler, Context], metric_lines: MetricLines
) -> None:
    h, ctx = handler
    [(status, body)] = handle(h, ctx, [{"observations": [OBS, [0.0, 0.0, 0.0, POISON]]}])
    assert status == 200
    assert [d["fallback"] for d in body["decisions"]] == [False, True]
    assert body["decisions"][1]["action"] == 1
    h.recorder.flush()
    assert metric_lines.total(m.NONFINITE_OUTPUTS) == 1
    assert metric_lines.total(m.FALLBACK, reason="nonfinite_output") == 1


def test_metrics_carry_policy_and_version(
    handler: tuple[PolicyHandler, Context], metric_lines: MetricLines
) -> None:
    h, ctx = handler
    handle(h, ctx, [{"observation": OBS}, {"observations": [OBS, [3.0, 0.0, 0.0, 0.0]]}])
    h.recorder.flush()
    # Two server batches of one request each: two requests in the latency histogram.
    assert metric_lines.parsed(m.LATENCY_COUNT) == [({"policy": "toy", "version": "1"}, 2.0)]
    [(dims, seconds)] = metric_lines.parsed(m.LATENCY_SUM)
    assert dims == {"policy": "toy", "version": "1"}
    assert 0 < seconds < 2
    buckets = metric_lines.parsed(m.LATENCY_BUCKET)
    assert [d["le"] for d, _ in buckets] == m.LATENCY_LE
    for d, _ in buckets:
        assert {k: v for k, v in d.items() if k != "le"} == {"policy": "toy", "version": "1"}
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert counts[-1] == 2
    assert metric_lines.total(m.ACTIONS, action="1") == 2
    assert metric_lines.total(m.ACTIONS, action="0") == 1
    # OBS[0] = 0.5 lies in bin [0, 1) (bin 2) of feature 0; 3.0 lies beyond the last edge (bin 3).
    assert metric_lines.total(m.OBSERVATION_DRIFT_BIN, feature="0", bin="2") == 2
    assert metric_lines.total(m.OBSERVATION_DRIFT_BIN, feature="0", bin="3") == 1
    assert metric_lines.total(m.POLICY_ENTROPY) == 0.0  # greedy
    assert metric_lines.total(m.OBSERVATION_REFERENCE, feature="3", bin="1") == 0.25
    assert metric_lines.total(m.ACTION_REFERENCE, action="1") == 0.5
    assert metric_lines.total(m.VALUE_ESTIMATE) == pytest.approx((2.0 + 2.0 + 3.0) / 3)
    for line in metric_lines.lines:
        match = METRIC_LINE.match(line)
        assert match, line
        assert match["type"] in ("COUNTER", "GAUGE")


def test_decision_log_counters(handler: tuple[PolicyHandler, Context], metric_lines: MetricLines) -> None:
    h, ctx = handler
    handle(h, ctx, [{"observations": [OBS] * 5}])
    h.shutdown()  # writes the queue, then emits the last metrics
    assert metric_lines.total(m.DECISIONS_LOGGED) == 5
    assert metric_lines.total(m.DECISION_LOG_DROPPED) == 0


def test_sha256_mismatch_refuses_to_start(policy_dir: Path, metrics_yaml: Path) -> None:
    (policy_dir / "policy.pt").write_bytes((policy_dir / "policy.pt").read_bytes() + b"\0")
    with pytest.raises(PolicyLoadError, match=r"policy\.pt: sha256 does not match .*SHA256SUMS \(recorded "):
        PolicyHandler().initialize(make_context(policy_dir, metrics_yaml))


def test_archive_version_must_match_the_card(policy_dir: Path, metrics_yaml: Path) -> None:
    with pytest.raises(PolicyLoadError, match="the archive is version 2 but its model card says version 1"):
        PolicyHandler().initialize(make_context(policy_dir, metrics_yaml, version="2"))


def test_archive_built_by_another_server_version_refuses(policy_dir: Path, metrics_yaml: Path) -> None:
    with pytest.raises(PolicyLoadError, match=r"built by rlops-server 0\.0\.1"):
        PolicyHandler().initialize(make_context(policy_dir, metrics_yaml, **{VERSION_KEY: "0.0.1"}))


def test_unknown_handler_setting_refuses(policy_dir: Path, metrics_yaml: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown setting.*batch_observations"):
        PolicyHandler().initialize(make_context(policy_dir, metrics_yaml, batch_observations=4))


def test_undeclared_metrics_refuse(policy_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "default-metrics.yaml"
    plain.write_text(mc.torchserve_default_metrics_config().read_text())
    with pytest.raises(
        PolicyLoadError, match=r"rlops_inference_latency_seconds_bucket \(counter\) is not declared"
    ):
        PolicyHandler().initialize(make_context(policy_dir, plain))


def test_mask_and_deterministic_through_the_handler(tmp_path: Path, metrics_yaml: Path) -> None:
    d = write_policy_dir(
        tmp_path / "stochastic", sign=-1.0, score_kind="logits", temperature=1.0, epsilon=0.1
    )
    h = PolicyHandler()
    h.initialize(make_context(d, metrics_yaml, seed=1))
    try:
        results = handle(
            h,
            ctx := h.context,
            [
                {"observation": OBS, "deterministic": True},
                {"observation": OBS, "action_mask": [1, 1, 0], "return": ["probabilities"]},
            ],
        )
        assert ctx is h.context
        assert results[0][1]["action"] == 2
        assert results[0][1]["propensity"] == 1.0
        masked = results[1][1]
        assert masked["probabilities"][2] == 0.0
        assert masked["action"] in (0, 1)
        assert masked["propensity"] == masked["probabilities"][masked["action"]]
    finally:
        h.shutdown()
