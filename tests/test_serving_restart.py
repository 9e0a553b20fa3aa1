"""A canary's restart keeps every setting of the server: the plan is stored and started again as it was.

Real TorchServe: started with every setting away from its default, restarted by the canary's
``restart_with_candidate`` to load a new candidate, then checked setting by setting (the stored plan) and
by behaviour (batching, the request limit, the access log, the decision log's folder).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from rlops_delivery.serving import restart_with_candidate
from rlops_server import serving
from rlops_server.plan import DELAY, ServePlan
from server_testkit import OBS_DIM, free_ports, write_policy_dir, write_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _predict(status: serving.ServerStatus, run_dir: Path, body: dict[str, object]) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{status.inference_url}/predictions/toy",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {serving.inference_token(run_dir)()}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_setting_survives_a_canary_restart(tmp_path: Path) -> None:
    registry = write_registry(tmp_path / "registry")
    port, management, metrics, grpc = free_ports(4)
    plan = ServePlan(
        policy="toy",
        registry=registry,
        run_dir=tmp_path / "serve",
        port=port,
        management_port=management,
        metrics_port=metrics,
        grpc_port=grpc,
        batch_size=4,
        max_batch_delay_ms=7,
        batcher=DELAY,
        max_batch_observations=5,
        decision_log_dir=tmp_path / "decisions",
        access_log=True,
        timeout_s=300,
    )
    run_dir = plan.run_dir.resolve()
    serving.start(plan)
    try:
        before = serving.status(run_dir)
        assert sorted(before.of("toy")) == ["1", "2"]
        write_policy_dir(registry / "toy" / "3", "toy", 3)

        said = restart_with_candidate(registry, "toy", 3, run_dir)

        assert "restarted" in said
        after = serving.status(run_dir)
        assert after.plan == before.plan
        assert after.plan is not None
        for setting in ("port", "management_port", "metrics_port", "grpc_port", "batch_size", "batcher"):
            assert getattr(after.plan, setting) == getattr(plan, setting), setting
        assert (after.plan.max_batch_delay_ms, after.plan.max_batch_observations) == (7, 5)
        assert (after.plan.access_log, after.plan.decision_log_dir) == (
            True,
            (tmp_path / "decisions").resolve(),
        )
        served = after.of("toy")
        assert sorted(served) == ["1", "3"]
        assert after.default_version("toy") == "1"
        for version in served.values():
            assert (version.batch_size, version.max_batch_delay_ms, version.batcher) == (4, 7, DELAY)
        assert after.inference_url == before.inference_url

        code, body = _predict(after, run_dir, {"observations": [[0.1] * OBS_DIM] * 6})
        assert code == 413, body
        code, body = _predict(after, run_dir, {"observations": [[0.1] * OBS_DIM] * 5})
        assert code == 200, body
        assert [d["version"] for d in body["decisions"]] == [1] * 5
    finally:
        serving.stop(run_dir)
    access = (run_dir / "logs" / "access_log.log").read_text()
    assert "/predictions/toy" in access
    logged = list((tmp_path / "decisions" / "decisions").rglob("*.jsonl"))
    assert sum(len(p.read_text().splitlines()) for p in logged) == 5
