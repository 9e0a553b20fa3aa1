"""The Ray Train path: two data-parallel workers on a local Ray instance, reading Parquet with Ray Data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rlops_trainer.algos.cql import CQLConfig
from rlops_trainer.collect import collect
from rlops_trainer.datasets import save
from rlops_trainer.distributed import train_distributed
from rlops_trainer.training import RunOptions

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.timeout(180)
def test_two_workers_train_cql_data_parallel(local_ray: None, tmp_path: Path) -> None:
    data = collect("CartPole-v1", "random", episodes=30, seed=0, progress=False)
    path = save(data, tmp_path / "cartpole.parquet")
    out = tmp_path / "run"
    cfg = CQLConfig(steps=120, batch_size=64, hidden=(32, 32))
    result = train_distributed(
        "cql", cfg, data, path, RunOptions(out_dir=out, log_every=40, checkpoint_every=60, progress=False), 2
    )

    # Two workers ran, each on its own shard, and together they saw the whole dataset
    # (an equal split may drop fewer rows than there are workers).
    assert result.final_metrics["world_size"] == 2
    assert len(data) - 2 < result.final_metrics["rows_total"] <= len(data)
    # DDP all-reduced the gradients: both replicas hold the same weights at the end.
    assert result.final_metrics["replica_divergence"] == 0.0
    assert result.steps == 120
    assert result.algorithm == "cql"
    assert result.dataset_fingerprint == data.fingerprint()
    assert np.isfinite(result.final_metrics["loss"])

    # Rank 0 wrote the metrics and the same checkpoints as the single-process loop.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [40, 80, 120]
    assert {"td_loss", "cql_penalty", "q_mean", "grad_norm"} <= set(records[-1])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000000060.pt",
        "step-000000120.pt",
    ]
    state = torch.load(out / "checkpoints" / "step-000000120.pt", weights_only=True)
    policy_weights = result.policy.state_dict()
    assert torch.equal(state["learner"]["q.0.weight"], policy_weights["net.0.weight"])
    assert any((out / "ray").rglob("state.pt"))

    # The policy is usable: on CPU, eval mode, valid action distributions for real observations.
    assert not result.policy.training
    probs = result.policy.probs_numpy(data.observation[:16], result.selection)
    assert probs.shape == (16, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert (probs >= cfg.serve_epsilon / 2 - 1e-7).all()
