"""``rlops evaluate`` on a Box (continuous-action) dataset: estimates, rollouts in Pendulum-v1, the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import typer
from continuous_testkit import box_policy_dir, linear_policy
from rlops_trainer import datasets
from rlops_trainer.commands.evaluate import evaluate
from rlops_trainer.datasets import DatasetMeta, Transitions
from rlops_trainer.ope import ESTIMATORS
from typer.testing import CliRunner

app = typer.Typer()
app.command()(evaluate)
runner = CliRunner()
LOW, HIGH = np.array([-2.0]), np.array([2.0])


def pendulum_data(episodes: int = 6, seed: int = 0) -> Transitions:
    """Pendulum-v1 under uniformly random torques (log-density -log 4), episodes of 200 steps."""
    env = gym.make("Pendulum-v1")
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {k: [] for k in ("ep", "step", "obs", "act", "rew", "next", "trunc")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        for t in range(200):
            action = rng.uniform(LOW, HIGH).astype(np.float32)
            nxt, reward, _, truncated, _ = env.step(action)
            for key, value in zip(rows, (ep, t, obs, action, reward, nxt, truncated), strict=True):
                rows[key].append(value)
            obs = nxt
    env.close()
    n = len(rows["ep"])
    meta = DatasetMeta(
        env_id="Pendulum-v1",
        observation_space={"type": "Box", "shape": [3], "low": [-1.0, -1.0, -8.0], "high": [1.0, 1.0, 8.0]},
        action_space={"type": "Box", "shape": [1], "low": [-2.0], "high": [2.0]},
        behavior_policy="uniform",
        source="test",
    )
    return Transitions(
        episode_id=np.asarray(rows["ep"], dtype=np.int64),
        step=np.asarray(rows["step"], dtype=np.int64),
        observation=np.asarray(rows["obs"], dtype=np.float32),
        action=np.asarray(rows["act"], dtype=np.float32),
        reward=np.asarray(rows["rew"], dtype=np.float32),
        next_observation=np.asarray(rows["next"], dtype=np.float32),
        terminated=np.zeros(n, dtype=bool),
        truncated=np.asarray(rows["trunc"], dtype=bool),
        behavior_logp=np.full(n, -np.log(4.0), dtype=np.float32),
        meta=meta,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("evaluate-box")
    data = pendulum_data()
    policy = linear_policy(np.array([[0.0, -2.0, -0.5]]), np.zeros(1), LOW, HIGH)
    return {
        "root": root,
        "data": data,
        "path": datasets.save(data, root / "pendulum.parquet"),
        "explores": box_policy_dir(root, data, "pendulum", policy, std=0.5),
        "deterministic": box_policy_dir(root / "det", data, "pendulum", policy, std=0.0),
    }


def run(setup: dict[str, Any], *args: str | Path) -> Any:
    fast = ("--fqe-steps", "300", "--fqe-models", "2", "--bootstrap", "100", "--data", setup["path"])
    return runner.invoke(app, [str(a) for a in (*fast, *args)])


def test_box_policies_get_estimates_rollouts_and_a_gate(setup: dict[str, Any]) -> None:
    out = setup["root"] / "out"
    res = run(setup, "--policy", setup["explores"], "--env-episodes", "2", "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["estimators"] == list(ESTIMATORS)
    assert report["settings"]["gate"]["estimator"] == "dr"
    assert report["settings"]["action_samples"] >= 1
    (p,) = report["policies"]
    assert p["selection"]["std"] == 0.5
    assert set(p["estimates"]) == set(ESTIMATORS)
    fqe = p["estimates"]["fqe"]
    assert fqe["lower"] <= fqe["value"] <= fqe["upper"]
    assert p["rollout"]["episodes"] == 2
    assert p["rollout"]["selection"]["std"] == 0.5
    assert p["rollout"]["discounted_return"]["value"] < 0  # Pendulum rewards are costs
    assert p["gate"]["estimator"] == "dr"
    assert "FQE" in res.output
    assert (out / "report.png").is_file()


def test_a_deterministic_box_policy_is_valued_with_fqe(setup: dict[str, Any]) -> None:
    out = setup["root"] / "out-det"
    res = run(setup, "--policy", setup["deterministic"], "--out", out)
    assert res.exit_code == 0, res.output
    assert "deterministic continuous policy" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["estimators"] == ["fqe"]
    assert report["policies"][0]["gate"]["estimator"] == "fqe"

    res = run(setup, "--policy", setup["deterministic"], "--estimators", "fqe,dr", "--out", out)
    assert res.exit_code != 0
    assert "point mass has no density" in res.output
