"""rlops' adaptive batcher in a real TorchServe: loaded in place of TorchServe's, it sends a request that
finds the worker idle at once, and requests that queue while the worker is busy go to it together.

The server runs with a three-second ``--max-batch-delay-ms``: TorchServe's own batcher would hold a lone
request that long before answering it, so a lone request answered within the client's 1.5 s timeout shows
that nothing waited. Requests of one server batch share one decision time in the decision log.
A request that queues alone while the worker is busy is not held either: a lone client's next request
often arrives before the worker is back for more.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from rlops_server.client import PolicyClient
from rlops_server.commands.serve import app
from rlops_server.decision_log import complete_files
from rlops_server.torchserve import process
from rlops_server.torchserve.config import BATCHER_CLASS
from server_testkit import free_ports, write_policy_dir
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

OBS = [0.5, 2.0, -1.0, 0.3]
BUSY_WORK = 300
"""The served policy's work per call: about a second and a half for a request of 1024 observations
(:class:`server_testkit.BusyTinyPolicy`), nothing worth measuring for one observation."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    root = tmp_path_factory.mktemp("batcher")
    registry = root / "registry"
    write_policy_dir(registry / "toy" / "1", "toy", 1, work=BUSY_WORK)
    (registry / "toy" / "aliases.json").write_text(json.dumps({"champion": 1}), encoding="utf-8")
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


def test_a_request_queued_alone_behind_a_busy_worker_is_not_held(served: tuple[Path, Path, str]) -> None:
    run_dir, _, url = served
    token = process.inference_token(run_dir)
    finished: dict[str, float] = {}

    def heavy() -> None:
        with PolicyClient(url, "toy", token=token, timeout=120.0, retries=0) as c:
            answers = c.act_batch([OBS] * 1024)
        finished["heavy"] = time.monotonic()
        finished["heavy_fallbacks"] = sum(d.fallback for d in answers)

    worker_busy = threading.Thread(target=heavy)
    started = time.monotonic()
    worker_busy.start()
    time.sleep(0.3)  # the 1024 observations are in the worker by now; they keep it busy well over a second
    with PolicyClient(url, "toy", token=token, timeout=60.0, retries=0) as lone:
        decision = lone.act(OBS)
    answered = time.monotonic()
    worker_busy.join(120)
    assert not decision.fallback, lone.fallbacks
    assert finished["heavy_fallbacks"] == 0
    assert answered > finished["heavy"], (
        f"the lone request was answered before the batch of 1024 ({answered - started:.2f} s vs "
        f"{finished['heavy'] - started:.2f} s after it was sent), so it never queued behind a busy worker"
    )
    # It was the only request waiting when the worker came back: it goes at once, not after the 3 s
    # that the worker may wait to fill a batch when several requests wait.
    assert answered - finished["heavy"] < 1.5, (
        f"held {answered - finished['heavy']:.2f} s after the worker was free"
    )


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
