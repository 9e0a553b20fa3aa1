"""rlops' adaptive batcher in a real TorchServe: loaded in place of TorchServe's, it sends a request that
finds the worker idle at once, and requests that queue while the worker is busy go to it together.

The server runs with a three-second ``--max-batch-delay-ms``: TorchServe's own batcher would hold a lone
request that long before answering it, so a lone request answered within the client's 1.5 s timeout shows
that nothing waited. Requests of one server batch share one decision time in the decision log.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from rlops_server.client import PolicyClient
from rlops_server.commands.serve import app
from rlops_server.decision_log import complete_files
from rlops_server.torchserve import process
from rlops_server.torchserve.config import BATCHER_CLASS
from server_testkit import free_ports, write_registry
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

OBS = [0.5, 2.0, -1.0, 0.3]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("batcher")
    registry = write_registry(root / "registry")
    run_dir, log_dir = root / "run", root / "logs"
    port, mgmt, metrics_port, grpc, _ = free_ports(5)
    args = [
        "start",
        "--registry", str(registry),
        "--run-dir", str(run_dir),
        "--port", str(port),
        "--management-port", str(mgmt),
        "--metrics-port", str(metrics_port),
        "--grpc-port", str(grpc),
        "--batch-size", "16",
        "--max-batch-delay-ms", "3000",
        "--decision-log-dir", str(log_dir),
        "--timeout", "240",
    ]  # fmt: skip
    try:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{result.output}\n{process.log_tail(run_dir)}"
        yield run_dir, log_dir / "decisions", f"http://127.0.0.1:{port}"
    finally:
        process.stop(run_dir, timeout_s=30)


def test_the_frontend_loads_rlops_batcher(served: tuple[Path, Path, str]) -> None:
    run_dir, _, _ = served
    assert (run_dir / BATCHER_CLASS).is_file()
    log = "\n".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log"))
    started = "rlops adaptive batcher for model toy version 1, batch size up to 16, filled for up to 3000 ms"
    assert started in log
    result = CliRunner().invoke(app, ["status", "--run-dir", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert {v["batcher"] for v in json.loads(result.output)["versions"]} == {"adaptive"}


def test_a_lone_request_does_not_wait_and_queued_requests_share_batches(
    served: tuple[Path, Path, str],
) -> None:
    run_dir, decisions, url = served
    token = process.inference_token(run_dir)
    alone = PolicyClient(url, "toy", token=token, timeout=1.5, retries=0)
    for _ in range(3):
        decision = alone.act(OBS)
        assert not decision.fallback, alone.fallbacks
    # Many clients at once: requests queue while the worker is busy and leave together (a batch that
    # cannot fill waits up to the 3 s delay, well within the clients' timeout).
    ids: list[str] = []
    failed: list[object] = []

    def client() -> None:
        c = PolicyClient(url, "toy", token=token, timeout=30.0, retries=0)
        for _ in range(10):
            d = c.act(OBS)
            if d.fallback:
                failed.append(c.fallbacks)
            else:
                ids.append(d.decision_id)

    threads = [threading.Thread(target=client) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failed
    assert len(ids) == 240
    result = CliRunner().invoke(app, ["stop", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for f in complete_files(decisions) for line in f.read_text().splitlines()]
    times = Counter(r["time"] for r in records if r["decision_id"] in set(ids))
    assert sum(times.values()) == 240
    assert max(times.values()) > 1, "no two queued requests went to the worker together"
    assert max(times.values()) <= 16
