"""The canary's Job metric for Box policies as rendered: ``rlops rollout check`` runs on this machine with
the rendered command line (its registry and analysis paths moved here, the analysis file taken from the
rendered ConfigMap) against a Prometheus stand-in that answers the action-bin query, and its exit code is
the verdict Argo would record."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import localrun
import pytest
from rlops_infra import delivery
from rlops_infra.render import Render

POLICY = "pendulum"


@contextmanager
def bin_prometheus(bins: dict[str, list[list[float]]]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering ``/api/v1/query`` as Prometheus would for the action-bin query:
    ``bins[version][dimension][bin]`` counts. Yields its URL and the queries it was asked."""
    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            expr = parse_qs(url.query).get("query", [""])[0]
            asked.append(expr)
            result = [
                {"metric": {"version": v, "dimension": str(d), "bin": str(b)}, "value": [0, str(n)]}
                for v, dims in bins.items()
                for d, counts in enumerate(dims)
                for b, n in enumerate(counts)
            ]
            ok = url.path == "/api/v1/query" and "rlops_action_drift_bin_total" in expr
            body = (
                {"status": "success", "data": {"resultType": "vector", "result": result}}
                if ok
                else {"status": "error", "error": f"unexpected {url.path} {expr!r}"}
            )
            data = json.dumps(body).encode()
            self.send_response(200 if ok else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", localrun.free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def box_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pendulum: champion 1 (BC on uniform actions), candidate 2 stuck at the upper bound (the constant
    drill), candidate 3 a copy of the champion."""
    from rlops_delivery.drills import write_constant_policy_dir
    from rlops_trainer.algos.bc_continuous import train
    from rlops_trainer.collect import collect
    from rlops_trainer.export import write_policy_dir
    from rlops_trainer.hyperparams import ContinuousBCConfig
    from rlops_trainer.registry import Registry
    from rlops_trainer.training import RunOptions

    work = tmp_path_factory.mktemp("box")
    data = collect("Pendulum-v1", "uniform", 3, seed=0, progress=False)
    result = train(ContinuousBCConfig(steps=30, batch_size=64), data, RunOptions(progress=False))
    base = write_policy_dir(result, data, work / "base", POLICY)
    registry = work / "registry"
    reg = Registry(registry)
    gate = {"promote": False, "incumbent_version": None, "reason": "test"}
    reg.publish(base, POLICY, gate=gate)
    reg.promote(POLICY, 1, require_gate=False, force_reason="the first champion")
    reg.publish(write_constant_policy_dir(base, work / "high", bound="high"), POLICY, gate=gate)
    reg.publish(base, POLICY, gate=gate)
    return registry


def _reference(registry: Path, version: int, total: float) -> list[list[float]]:
    from rlops_trainer.registry import Registry

    bins = Registry(registry).card(POLICY, version)["reference"]["actions"]["bins"]
    return [[total * p for p in b["proportions"]] for b in bins]


def _at_the_upper_bound(registry: Path, version: int, total: float) -> list[list[float]]:
    from rlops_trainer.registry import Registry

    bins = Registry(registry).card(POLICY, version)["reference"]["actions"]["bins"]
    return [[0.0] * len(b["edges"]) + [total] for b in bins]


def _run_rendered(
    r: Render, registry: Path, tmp_path: Path, candidate: int, url: str
) -> subprocess.CompletedProcess[str]:
    canary = r.find("AnalysisTemplate", delivery.CANARY_TEMPLATE)
    (metric,) = [m for m in canary["spec"]["metrics"] if m["name"] == delivery.CHECK_METRIC]
    (container,) = metric["provider"]["job"]["spec"]["template"]["spec"]["containers"]
    args = {"{{args.policy}}": POLICY, "{{args.candidate}}": str(candidate), "{{args.champion}}": "1"}
    command = [args.get(word, word) for word in container["command"]]
    _, flags = localrun.split(command)
    shipped = r.find("ConfigMap", delivery.ANALYSIS_CONFIG_MAP)["data"][delivery.ANALYSIS_FILE]
    analysis = Path(localrun.local_path(tmp_path, str(flags["--analysis"])))
    analysis.parent.mkdir(parents=True, exist_ok=True)
    analysis.write_text(shipped, encoding="utf-8")
    moved = {"--prometheus-url": url, "--registry": str(registry), "--analysis": str(analysis)}
    return subprocess.run(localrun.here(command, moved), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_the_rendered_check_fails_a_collapsed_box_candidate_and_passes_a_faithful_one(
    renders: dict[str, Render], box_registry: Path, tmp_path: Path
) -> None:
    r = renders["dev"]
    champion = _reference(box_registry, 1, 1000)
    with bin_prometheus({"1": champion, "2": _at_the_upper_bound(box_registry, 2, 400)}) as (url, asked):
        done = _run_rendered(r, box_registry, tmp_path, 2, url)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "fail: action-divergence-per-dimension" in " ".join(done.stdout.split())
    assert asked
    assert all(f'policy="{POLICY}",version=~"2|1"' in q for q in asked)
    with bin_prometheus({"1": champion, "3": _reference(box_registry, 3, 400)}) as (url, _):
        done = _run_rendered(r, box_registry, tmp_path, 3, url)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("pass: action-divergence-per-dimension ")
    assert "<= 0.25 in action dimension 0 (400 samples)" in last
