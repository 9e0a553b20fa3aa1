"""The continuous (Box) learners in the shared loop: metrics, bounds, reproducibility, resume, staged
updates, learning a one-step problem with a known answer, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rlops_trainer import training
from rlops_trainer.algos import ALGORITHMS, CONTINUOUS_ALGORITHMS, implementation
from rlops_trainer.algos.td3bc import TD3BCLearner
from rlops_trainer.commands.train import app
from rlops_trainer.datasets import METADATA_KEY, DatasetError, DatasetMeta, Transitions
from rlops_trainer.hyperparams import TD3BCConfig, config_fields
from rlops_trainer.policy import ContinuousPolicyModule
from rlops_trainer.training import RunOptions, TensorData, TrainResult, observation_stats
from typer.testing import CliRunner

LOW, HIGH = np.array([-2.0, 0.0]), np.array([2.0, 1.0])
MID, HALF = (HIGH + LOW) / 2, (HIGH - LOW) / 2
BIAS, NOISE = 0.3, 0.3
METRICS = {
    "bc": ["loss", "grad_norm", "bc_loss", "mse"],
    "td3bc": ["loss", "grad_norm", "td_loss", "actor_loss", "q_mean", "mse"],
    "iql": [
        "loss",
        "grad_norm",
        "td_loss",
        "value_loss",
        "actor_loss",
        "q_mean",
        "v_mean",
        "awr_weight_mean",
        "mse",
    ],
    "cql": ["loss", "grad_norm", "td_loss", "cql_penalty", "q_mean", "actor_loss", "alpha", "entropy", "mse"],
}
SMALL: dict[str, Any] = {"hidden": (32, 32), "batch_size": 32}
SMALL_CQL = {"n_action_samples": 3}


def best_action(obs: np.ndarray) -> np.ndarray:
    """The reward's maximiser, in [-1, 1] units."""
    return np.stack([0.6 * obs[:, 0], 0.5 * obs[:, 1] - 0.2], axis=1)


def box_meta() -> DatasetMeta:
    return DatasetMeta(
        env_id="Bandit-v0",
        observation_space={"type": "Box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]},
        action_space={"type": "Box", "shape": [2], "low": LOW.tolist(), "high": HIGH.tolist()},
        behavior_policy=f"best action + {BIAS} + N(0, {NOISE}^2) in [-1, 1] units",
        source="test",
    )


def bandit(n: int = 2000, seed: int = 0) -> Transitions:
    """A one-step contextual bandit: reward -10 * |a - f(s)|^2 (actions in [-1, 1] units), logged by a
    behaviour biased away from f by BIAS with noise NOISE. Offline RL should recover f, BC f + BIAS."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, size=(n, 2)).astype(np.float32)
    scaled = np.clip(best_action(obs) + BIAS + NOISE * rng.normal(size=(n, 2)), -0.99, 0.99)
    return Transitions(
        episode_id=np.arange(n, dtype=np.int64),
        step=np.zeros(n, dtype=np.int64),
        observation=obs,
        action=(MID + HALF * scaled).astype(np.float32),
        reward=(-10.0 * ((scaled - best_action(obs)) ** 2).sum(axis=1)).astype(np.float32),
        next_observation=obs.copy(),
        terminated=np.ones(n, dtype=bool),
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, np.nan, dtype=np.float32),
        meta=box_meta(),
    )


@pytest.fixture(scope="module")
def data() -> Transitions:
    return bandit(n=300)


def config(name: str, **overrides: Any) -> Any:
    extra = SMALL_CQL if name == "cql" else {}
    return CONTINUOUS_ALGORITHMS[name][0](**{**SMALL, **extra, "steps": 40, **overrides})


def run_algo(name: str, data: Transitions, out: Path | None, **overrides: Any) -> TrainResult:
    return CONTINUOUS_ALGORITHMS[name][1](
        config(name, **overrides),
        data,
        RunOptions(out_dir=out, log_every=10, checkpoint_every=20, progress=False),
    )


def scaled_policy_action(result: TrainResult, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        action = result.policy(torch.as_tensor(obs)).numpy()
    return (action - MID) / HALF


@pytest.mark.parametrize("name", sorted(CONTINUOUS_ALGORITHMS))
def test_smoke_run_writes_documented_metrics_and_a_bounded_policy(
    name: str, data: Transitions, tmp_path: Path
) -> None:
    result = run_algo(name, data, tmp_path, serve_std=0.3)
    assert result.algorithm == name
    assert result.steps == 40
    assert isinstance(result.policy, ContinuousPolicyModule)
    assert not result.policy.training
    assert result.selection.std == 0.3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    for record in records:
        assert list(record) == ["step", "time_s", "steps_per_s", *METRICS[name]]
        assert all(math.isfinite(v) for v in record.values())
    for metric in METRICS[name]:
        assert f"``{metric}``" in (training.__doc__ or "")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000020.pt",
        "step-000000040.pt",
    ]
    # Far outside the training data the policy still acts inside the bounds, deterministic or explored.
    obs = np.concatenate([data.observation[:5], 1e4 * data.observation[:5]]).astype(np.float32)
    with torch.no_grad():
        action = result.policy(torch.as_tensor(obs)).numpy()
    explored, logp = result.policy.act_numpy(obs, result.selection)
    for a in (action, explored):
        assert a.shape == (10, 2)
        assert bool(((a >= LOW) & (a <= HIGH)).all())
    assert np.isfinite(logp[:5]).all()
    # The exported network is the pre-squash mean: the policy's action is its tanh in the bounds.
    torch.jit.script(result.policy)


@pytest.mark.parametrize("name", sorted(CONTINUOUS_ALGORITHMS))
def test_seeded_runs_are_identical(name: str, data: Transitions) -> None:
    first = run_algo(name, data, None, steps=20, seed=3).policy.state_dict()
    second = run_algo(name, data, None, steps=20, seed=3).policy.state_dict()
    other = run_algo(name, data, None, steps=20, seed=4).policy.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", ["cql", "td3bc"])
def test_resume_ends_with_the_state_of_an_uninterrupted_run(
    name: str, data: Transitions, tmp_path: Path
) -> None:
    # Settings whose state must survive the checkpoint too: delayed actor updates, the tuned multiplier.
    extra: dict[str, Any] = {"policy_freq": 3} if name == "td3bc" else {"lagrange": True}
    run_algo(name, data, tmp_path / "straight", steps=40, **extra)
    run_algo(name, data, tmp_path / "interrupted", steps=20, **extra)
    resumed = CONTINUOUS_ALGORITHMS[name][1](
        config(name, steps=40, **extra),
        data,
        RunOptions(
            out_dir=tmp_path / "interrupted", resume=True, log_every=10, checkpoint_every=20, progress=False
        ),
    )
    assert resumed.steps == 40
    final = [
        torch.load(tmp_path / run / "checkpoints" / "step-000000040.pt", weights_only=True)
        for run in ("straight", "interrupted")
    ]
    a, b = final[0]["learner"], final[1]["learner"]
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("critic_target.") for k in a)
    assert final[0]["optimizer"]["state"].keys() == final[1]["optimizer"]["state"].keys()
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30, 40]


def test_td3bc_updates_the_actor_and_the_targets_every_policy_freq_steps(data: Transitions) -> None:
    torch.manual_seed(0)
    learner = TD3BCLearner(TD3BCConfig(hidden=(16,), batch_size=32, policy_freq=2), obs_dim=2, action_dim=2)
    optimizer = learner.make_optimizer()
    mean, std = observation_stats(data)
    tensors = TensorData(data, mean, std, torch.device("cpu"))
    generator = training.sampling_generator(0, torch.device("cpu"))

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in learner.state_dict().items()}

    def moved(before: dict[str, torch.Tensor], prefix: str) -> bool:
        after = learner.state_dict()
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    before = snapshot()
    training.gradient_step(learner, learner, optimizer, tensors.sample(32, generator), 0, 0.0)
    assert moved(before, "critic.")
    assert not moved(before, "actor.")
    assert not moved(before, "critic_target.")
    assert not moved(before, "actor_target.")
    before = snapshot()
    training.gradient_step(learner, learner, optimizer, tensors.sample(32, generator), 1, 0.0)
    assert moved(before, "critic.")
    assert moved(before, "actor.")
    assert moved(before, "critic_target.")
    assert moved(before, "actor_target.")


def test_each_stage_differentiates_only_its_own_networks(data: Transitions) -> None:
    learner = TD3BCLearner(TD3BCConfig(hidden=(16,), policy_freq=1), obs_dim=2, action_dim=2)
    mean, std = observation_stats(data)
    batch = TensorData(data, mean, std, torch.device("cpu")).probe()
    stages: list[list[torch.nn.Parameter]] = []
    learner.update(batch, 0, lambda loss, params: stages.append(params))
    assert [len(s) for s in stages] == [len(learner.critic_params), len(learner.actor_params)]
    assert stages[0] == learner.critic_params
    assert stages[1] == learner.actor_params


# --------------------------------------------------------------------------------------------------
# Learning a problem with a known answer


def errors(result: TrainResult) -> tuple[float, float]:
    """RMS distance of the policy's action to the reward's maximiser and to the behaviour's mean."""
    obs = np.random.default_rng(9).uniform(-1, 1, size=(500, 2)).astype(np.float32)
    action = scaled_policy_action(result, obs)
    to_best = float(np.sqrt(((action - best_action(obs)) ** 2).mean()))
    to_behaviour = float(np.sqrt(((action - best_action(obs) - BIAS) ** 2).mean()))
    return to_best, to_behaviour


@pytest.mark.parametrize("gaussian", [False, True])
def test_bc_recovers_the_behaviours_mean(gaussian: bool) -> None:
    result = run_algo("bc", bandit(), None, steps=600, batch_size=64, lr=3e-3, gaussian=gaussian)
    to_best, to_behaviour = errors(result)
    assert to_behaviour < 0.15
    assert to_best > 0.2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("td3bc", {"actor_lr": 3e-3, "critic_lr": 3e-3}),
        ("iql", {"lr": 3e-3}),
        (
            "cql",
            {
                "actor_lr": 3e-3,
                "critic_lr": 3e-3,
                "temperature_lr": 3e-3,
                "alpha": 1.0,
                "n_action_samples": 4,
            },
        ),
    ],
)
def test_offline_rl_recovers_the_best_action_from_biased_data(name: str, overrides: dict[str, Any]) -> None:
    result = run_algo(name, bandit(), None, steps=600, batch_size=64, **overrides)
    to_best, to_behaviour = errors(result)
    # The behaviour is BIAS = 0.3 away from the best action per dimension (0.42 with its noise).
    assert to_best < 0.2
    assert to_best < to_behaviour


# --------------------------------------------------------------------------------------------------
# Boundaries


def test_implementations_follow_the_action_space(data: Transitions) -> None:
    assert implementation("bc", continuous=True) == CONTINUOUS_ALGORITHMS["bc"]
    assert implementation("bc", continuous=False) == ALGORITHMS["bc"]
    with pytest.raises(
        ValueError,
        match="td3bc trains on Box actions only; for Discrete actions the algorithms are bc, cql, iql",
    ):
        implementation("td3bc", continuous=False)
    with pytest.raises(ValueError, match="unknown algorithm 'sac'; accepted: bc, cql, iql, td3bc"):
        implementation("sac", continuous=True)
    # A discrete learner on Box data, and the other way round, names the mismatch.
    with pytest.raises(DatasetError, match="takes Discrete actions, the dataset's action space is Box"):
        ALGORITHMS["cql"][1](ALGORITHMS["cql"][0](**SMALL, steps=5), data, RunOptions(progress=False))
    wrong = dataclasses.replace(data, action=data.action[:, :1])
    with pytest.raises(DatasetError, match=r"Box actions must be float vectors of 2 values"):
        run_algo("td3bc", wrong, None)


def test_the_ray_train_path_refuses_box_data(data: Transitions, tmp_path: Path) -> None:
    from rlops_trainer.distributed import train_distributed

    with pytest.raises(ValueError, match="the Ray Train path takes Discrete datasets"):
        train_distributed(
            "td3bc", config("td3bc"), data, tmp_path / "d.parquet", RunOptions(progress=False), 2
        )


def test_continuous_configs_are_documented_and_checked() -> None:
    for config_cls, _train in CONTINUOUS_ALGORITHMS.values():
        fields = config_fields(config_cls)
        assert all(f.doc for f in fields), config_cls.__name__
        names = {f.name for f in fields}
        assert {"steps", "batch_size", "seed", "max_grad_norm", "serve_std", "hidden"} <= names
        assert not names & {"serve_temperature", "serve_epsilon"}
        assert config_cls().serve_std == 0.0
        with pytest.raises(ValueError, match="serve_std must be a finite number >= 0"):
            config_cls(serve_std=-0.1)
    with pytest.raises(ValueError, match="td3bc: policy_freq must be >= 1"):
        TD3BCConfig(policy_freq=0)
    with pytest.raises(ValueError, match="cql: n_action_samples must be >= 1"):
        CONTINUOUS_ALGORITHMS["cql"][0](n_action_samples=0)


# --------------------------------------------------------------------------------------------------
# CLI


def write_metadata_only(meta: DatasetMeta, path: Path) -> Path:
    """A Parquet file holding the dataset metadata (what the CLI reads to pick an implementation)."""
    table = pa.table({"episode_id": pa.array([], pa.int64())})
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: meta.to_json().encode()}), path)
    return path


def test_cli_config_shows_both_implementations() -> None:
    runner = CliRunner()
    both = runner.invoke(app, ["config", "cql"], env={"COLUMNS": "200"})
    assert both.exit_code == 0, both.output
    assert "cql config (Discrete actions)" in both.output
    assert "cql config (Box actions)" in both.output
    assert "n_action_samples" in both.output
    box = runner.invoke(app, ["config", "td3bc", "--actions", "box"], env={"COLUMNS": "200"})
    assert box.exit_code == 0
    assert "policy_noise" in box.output
    none = runner.invoke(app, ["config", "td3bc", "--actions", "discrete"])
    assert none.exit_code == 2
    assert "td3bc trains on Box actions only" in none.output


def test_cli_refuses_td3bc_on_discrete_data(tmp_path: Path) -> None:
    from rlops_trainer.datasets import discrete_space

    meta = dataclasses.replace(box_meta(), action_space=discrete_space(3))
    path = write_metadata_only(meta, tmp_path / "discrete.parquet")
    result = CliRunner().invoke(app, ["td3bc", "--data", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert (
        "td3bc trains on Box actions only; for Discrete actions the algorithms are bc, cql, iql"
        in result.output
    )
    assert "Traceback" not in result.output


def test_cli_trains_the_box_implementation_on_box_data(data: Transitions, tmp_path: Path) -> None:
    import rlops_trainer.datasets

    path = rlops_trainer.datasets.save(data, tmp_path / "box.parquet")
    out = tmp_path / "run"
    args = [
        "bc",
        "--data",
        str(path),
        "--out",
        str(out),
        "--steps",
        "20",
        "--no-progress",
        "--metrics-port",
        "0",
    ]
    result = CliRunner().invoke(
        app, [*args, "--set", "hidden=16", "--set", "serve_std=0.2"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "policy" / "model-card.json").read_text())
    assert card["algorithm"] == "bc"
    assert card["policy"]["score_kind"] == "action"
    assert card["policy"]["selection"]["std"] == 0.2
    assert card["hyperparameters"]["gaussian"] is False
    assert "std 0.2" in result.output
    # A Discrete config field is unknown to the Box implementation.
    bad = CliRunner().invoke(
        app, ["bc", "--data", str(path), "--out", str(tmp_path / "x"), "--set", "serve_epsilon=0.1"]
    )
    assert bad.exit_code == 2
    assert "unknown field 'serve_epsilon'" in bad.output
