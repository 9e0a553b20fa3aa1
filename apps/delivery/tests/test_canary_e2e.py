"""End to end, on this machine: real TorchServe, real Prometheus, real CartPole traffic with rewards.

The test bed is the canary benchmark's (``benchmarks/canary.py``) with its quick profile: the champion and
three candidates served as four versions of one model, traffic that follows the canary split, Prometheus
scraping TorchServe and the feedback service every second. A candidate that always picks the same action
and one that is slow are each rolled back automatically; a copy of the champion is promoted: TorchServe's
default version and the registry's champion move to it. How much traffic each bad candidate received is
recorded with its rollout.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from delivery_testkit import REPO
from rlops_delivery import records
from rlops_server import serving
from rlops_trainer.registry import Registry

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (shutil.which("prometheus") and shutil.which("java")), reason="needs Prometheus and Java 17"
    ),
]


def _benchmark() -> Any:
    spec = importlib.util.spec_from_file_location("canary_benchmark", REPO / "benchmarks" / "canary.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _benchmark()


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with bench.canary_bed(tmp_path_factory.mktemp("canary"), bench.QUICK) as bed:
        yield bed


def test_bad_candidates_roll_back_and_a_good_one_is_promoted(bed: Any) -> None:
    reg = Registry(bed.registry)
    policy = bench.POLICY

    constant = bench.run_canary(bed, "constant", bench.QUICK)
    assert constant.state == records.ROLLED_BACK
    assert constant.failed_checks == ["action-divergence"]
    # It answered part of the 10 % step and nothing more; the record has Prometheus' count too.
    assert 0 < constant.share_sent < 0.1
    # Every request it was sent came back answered by it (none fell back), counted after those in flight.
    assert constant.answered == constant.sent, bed.traffic.client.stats()["fallbacks"]
    assert constant.prometheus["candidate_requests"] > 0
    assert reg.aliases(policy)["champion"] == 1

    slow = bench.run_canary(bed, "slow", bench.QUICK)
    assert slow.state == records.ROLLED_BACK
    assert "latency-p99" in slow.failed_checks
    # Batched, the slow version keeps up with its share (one 0.25 s pass answers a whole batch), so it
    # is sent about 10 % of the requests, give or take the episode hashing; the stored record below
    # shows that it never got past the 10 % step.
    assert 0 < slow.share_sent < 0.2
    assert reg.aliases(policy)["champion"] == 1

    good = bench.run_canary(bed, "good", bench.QUICK)
    assert good.state == records.PROMOTED, good.reason
    assert reg.aliases(policy)["champion"] == good.version
    # The server's default version (what the model's URL answers with) is the promoted one.
    assert serving.connect(Path(bed.run_dir)).describe().default_version(policy) == str(good.version)
    # Every decision is on disk with its evidence and traffic counts.
    stored = records.read_all(bed.registry, policy)
    assert [r.state for r in stored] == [records.ROLLED_BACK, records.ROLLED_BACK, records.PROMOTED]
    assert [r.id for r in stored] == [constant.rollout, slow.rollout, good.rollout]
    assert [[s["share"] for s in r.steps] for r in stored[:2]] == [[0.1], [0.1]]
    for record in stored:
        assert record.decision is not None
        assert {m["check"] for m in record.decision["evidence"]} >= {"action-divergence", "latency-p99"}
        assert record.traffic is not None
        assert record.traffic["candidate_requests"] > 0
