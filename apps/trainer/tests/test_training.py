"""The shared training loop: smoke runs, metrics, reproducibility, checkpoints and resume, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from rlops_trainer import training
from rlops_trainer.algos import ALGORITHMS
from rlops_trainer.commands.train import app
from rlops_trainer.datasets import DatasetError, DatasetMeta, Transitions, box_space, discrete_space
from rlops_trainer.hyperparams import apply_overrides, config_fields
from rlops_trainer.policy import PolicyModule
from rlops_trainer.training import RunOptions, TrainResult
from typer.testing import CliRunner

METRICS = {
    "bc": ["loss", "grad_norm", "bc_loss", "accuracy"],
    "cql": ["loss", "grad_norm", "td_loss", "cql_penalty", "q_mean", "q_data_minus_pi"],
    "iql": [
        "loss",
        "grad_norm",
        "td_loss",
        "value_loss",
        "actor_loss",
        "q_mean",
        "v_mean",
        "awr_weight_mean",
        "accuracy",
    ],
}
SMALL = {"hidden": (32, 32), "batch_size": 32}


def synthetic(episodes: int = 40, seed: int = 0) -> Transitions:
    """Episodes of 3-d observations where the logged action is ``obs[0] > 0``; some end by termination,
    the others by truncation."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[Any]] = {k: [] for k in ("ep", "step", "obs", "act", "next", "term", "trunc")}
    for ep in range(episodes):
        length = int(rng.integers(5, 15))
        obs = rng.normal(size=3).astype(np.float32)
        for step in range(length):
            nxt = (obs + rng.normal(scale=0.5, size=3)).astype(np.float32)
            last = step == length - 1
            cols["ep"].append(ep)
            cols["step"].append(step)
            cols["obs"].append(obs)
            cols["act"].append(int(obs[0] > 0))
            cols["next"].append(nxt)
            cols["term"].append(last and ep % 2 == 0)
            cols["trunc"].append(last and ep % 2 == 1)
            obs = nxt
    n = len(cols["ep"])
    return Transitions(
        episode_id=np.array(cols["ep"], dtype=np.int64),
        step=np.array(cols["step"], dtype=np.int64),
        observation=np.stack(cols["obs"]),
        action=np.array(cols["act"], dtype=np.int64),
        reward=np.ones(n, dtype=np.float32),
        next_observation=np.stack(cols["next"]),
        terminated=np.array(cols["term"]),
        truncated=np.array(cols["trunc"]),
        behavior_logp=np.zeros(n, dtype=np.float32),
        meta=DatasetMeta(
            env_id="Synthetic-v0",
            observation_space=box_space(np.full(3, -np.inf), np.full(3, np.inf)),
            action_space=discrete_space(2),
            behavior_policy="deterministic: obs[0] > 0",
            source="test",
        ),
    )


@pytest.fixture(scope="module")
def data() -> Transitions:
    return synthetic()


def run_algo(name: str, data: Transitions, out: Path | None, **overrides: Any) -> TrainResult:
    config_cls, train = ALGORITHMS[name]
    cfg = config_cls(**{**SMALL, "steps": 200, **overrides})
    return train(cfg, data, RunOptions(out_dir=out, log_every=50, checkpoint_every=100, progress=False))


def weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return result.policy.state_dict()


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_smoke_run_writes_documented_metrics(name: str, data: Transitions, tmp_path: Path) -> None:
    result = run_algo(name, data, tmp_path)
    assert result.algorithm == name
    assert result.steps == 200
    assert result.device == "cpu"
    assert isinstance(result.policy, PolicyModule)
    assert not result.policy.training
    assert all(p.device.type == "cpu" for p in result.policy.parameters())
    assert result.config == dataclasses.asdict(ALGORITHMS[name][0](**SMALL, steps=200))
    assert result.dataset_fingerprint == data.fingerprint()

    assert result.metrics_path == tmp_path / "metrics.jsonl"
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150, 200]
    for record in records:
        assert list(record) == ["step", "time_s", "steps_per_s", *METRICS[name]]
        assert all(math.isfinite(v) for v in record.values())
    assert list(result.final_metrics) == ["steps_per_s", *METRICS[name]]
    assert result.final_metrics["loss"] == records[-1]["loss"]
    # Every metric name is documented in the loop's module docstring.
    for metric in METRICS[name]:
        assert f"``{metric}``" in (training.__doc__ or "")

    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000100.pt",
        "step-000000200.pt",
    ]
    probs = result.policy.probs_numpy(data.observation[:5], result.selection)
    assert probs.shape == (5, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_seeded_runs_are_identical(name: str, data: Transitions) -> None:
    first = weights(run_algo(name, data, None, steps=60, seed=3))
    second = weights(run_algo(name, data, None, steps=60, seed=3))
    other = weights(run_algo(name, data, None, steps=60, seed=4))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(
    name: str, data: Transitions, tmp_path: Path
) -> None:
    straight = run_algo(name, data, tmp_path / "straight", steps=200)
    # The interrupted run stops after its checkpoint at step 100, then resumes to 200.
    run_algo(name, data, tmp_path / "interrupted", steps=100)
    config_cls, train = ALGORITHMS[name]
    resumed = train(
        config_cls(**SMALL, steps=200),
        data,
        RunOptions(
            out_dir=tmp_path / "interrupted", resume=True, log_every=50, checkpoint_every=100, progress=False
        ),
    )
    assert resumed.steps == 200
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The metrics file continues where the checkpoint was, with no duplicate records.
    lines = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [50, 100, 150, 200]
    # The full learner state (target networks, optimiser) matches too, not only the policy.
    final_a = torch.load(tmp_path / "straight" / "checkpoints" / "step-000000200.pt", weights_only=True)
    final_b = torch.load(tmp_path / "interrupted" / "checkpoints" / "step-000000200.pt", weights_only=True)
    assert all(torch.equal(final_a["learner"][k], final_b["learner"][k]) for k in final_a["learner"])


def test_resume_drops_metric_records_written_after_the_checkpoint(data: Transitions, tmp_path: Path) -> None:
    run_algo("bc", data, tmp_path, steps=100)
    # A crash after step 100's checkpoint could have logged step 150 before dying.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 150, "loss": 1.0}) + "\n")
    (tmp_path / "checkpoints" / ".step-000000150.pt.tmp-123").write_bytes(b"half a file")
    config_cls, train = ALGORITHMS["bc"]
    train(
        config_cls(**SMALL, steps=150),
        data,
        RunOptions(out_dir=tmp_path, resume=True, log_every=50, checkpoint_every=100, progress=False),
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [50, 100, 150]
    assert "grad_norm" in records[-1]


def test_resume_refuses_a_checkpoint_of_other_hyperparameters(data: Transitions, tmp_path: Path) -> None:
    run_algo("cql", data, tmp_path, steps=100)
    config_cls, train = ALGORITHMS["cql"]
    with pytest.raises(ValueError, match=r"other hyperparameters \(alpha: 1.0 -> 2.0\)"):
        train(
            config_cls(**SMALL, steps=200, alpha=2.0),
            data,
            RunOptions(out_dir=tmp_path, resume=True, progress=False),
        )
    with pytest.raises(ValueError, match="written by 'cql', not 'bc'"):
        ALGORITHMS["bc"][1](
            ALGORITHMS["bc"][0](**SMALL, steps=200),
            data,
            RunOptions(out_dir=tmp_path, resume=True, progress=False),
        )


def test_a_fresh_run_does_not_overwrite_an_earlier_runs_checkpoints(
    data: Transitions, tmp_path: Path
) -> None:
    run_algo("bc", data, tmp_path, steps=100)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run_algo("bc", data, tmp_path, steps=100)


def test_checkpoints_load_without_pickled_code(data: Transitions, tmp_path: Path) -> None:
    run_algo("iql", data, tmp_path, steps=100)
    state = torch.load(tmp_path / "checkpoints" / "step-000000100.pt", weights_only=True)
    assert state["step"] == 100
    assert state["algorithm"] == "iql"
    assert {"learner", "optimizer", "rng", "config", "dataset_fingerprint"} <= set(state)
    assert any(k.startswith("q1_target.") for k in state["learner"])


def test_bc_learns_a_deterministic_behaviour(tmp_path: Path) -> None:
    data = synthetic(episodes=100, seed=1)
    result = run_algo("bc", data, None, steps=400, lr=3e-3)
    assert result.final_metrics["accuracy"] > 0.95
    test = synthetic(episodes=30, seed=2)
    chosen = result.policy.probs_numpy(test.observation, result.selection).argmax(axis=1)
    assert (chosen == test.action).mean() > 0.95


def test_a_diverging_run_stops_with_a_clear_error(data: Transitions) -> None:
    # Squared TD errors of rewards near float32's largest value overflow to inf at once.
    huge = dataclasses.replace(data, reward=np.full(len(data), 1e38, dtype=np.float32))
    with pytest.raises(FloatingPointError, match=r"cql: non-finite metrics \[.*'loss'.*\] at step 50"):
        run_algo("cql", huge, None, huber=False)


def test_device_choice() -> None:
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="accepted: auto, cpu, cuda, cuda:N"):
        training.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            training.resolve_device("cuda")


def test_configs_reject_values_out_of_range() -> None:
    with pytest.raises(ValueError, match="cql: alpha must be >= 0"):
        ALGORITHMS["cql"][0](alpha=-1.0)
    with pytest.raises(ValueError, match="iql: expectile must be in"):
        ALGORITHMS["iql"][0](expectile=1.0)
    with pytest.raises(ValueError, match="bc: hidden must be one or more positive layer widths"):
        ALGORITHMS["bc"][0](hidden=())
    with pytest.raises(ValueError, match="serve_epsilon must be in"):
        ALGORITHMS["bc"][0](serve_epsilon=1.5)


def test_data_the_algorithms_cannot_use_is_refused(data: Transitions) -> None:
    other = dataclasses.replace(
        data, meta=dataclasses.replace(data.meta, action_space={"type": "MultiBinary"})
    )
    with pytest.raises(DatasetError, match="'MultiBinary' is not supported"):
        run_algo("bc", other, None)
    with pytest.raises(DatasetError, match="no transitions"):
        run_algo("bc", data.select(np.zeros(len(data), dtype=bool)), None)


def test_every_config_field_is_documented() -> None:
    for config_cls, _train in ALGORITHMS.values():
        for field in config_fields(config_cls):
            assert field.doc, f"{config_cls.__name__}.{field.name} has no docstring"
        names = {f.name for f in config_fields(config_cls)}
        assert {"steps", "batch_size", "seed", "max_grad_norm", "serve_temperature", "serve_epsilon"} <= names


# --------------------------------------------------------------------------------------------------
# CLI


def test_set_overrides_are_type_checked() -> None:
    cfg = apply_overrides(ALGORITHMS["cql"][0](), ["alpha=0.5", "hidden=64,32", "huber=false", "steps=10"])
    assert (cfg.alpha, cfg.hidden, cfg.huber, cfg.steps) == (0.5, (64, 32), False, 10)
    with pytest.raises(ValueError, match="unknown field 'alhpa'; valid fields: steps, batch_size"):
        apply_overrides(ALGORITHMS["cql"][0](), ["alhpa=1"])
    with pytest.raises(ValueError, match=r"'1\.5' is not a valid int for 'steps'"):
        apply_overrides(ALGORITHMS["cql"][0](), ["steps=1.5"])
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(ALGORITHMS["cql"][0](), ["alpha"])
    with pytest.raises(ValueError, match="not a valid bool for 'huber'"):
        apply_overrides(ALGORITHMS["cql"][0](), ["huber=maybe"])


def test_cli_reports_bad_flags_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["cql", "--data", str(tmp_path / "none.parquet"), "--out", str(tmp_path)])
    assert missing.exit_code == 2
    assert "no such file" in missing.output
    bad = runner.invoke(
        app, ["iql", "--data", str(tmp_path / "none.parquet"), "--out", str(tmp_path), "--set", "betta=2"]
    )
    assert bad.exit_code == 2
    assert "unknown field 'betta'" in bad.output
    assert "expectile" in bad.output
    assert "Traceback" not in bad.output


def test_cli_config_lists_fields_with_docs() -> None:
    result = CliRunner().invoke(app, ["config", "iql"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "expectile" in result.output
    assert "Expectile of Q that V estimates" in result.output
    unknown = CliRunner().invoke(app, ["config", "a3c"])
    assert unknown.exit_code == 2
    assert "accepted: bc, cql, iql, td3bc, ppo, appo, dqn" in unknown.output


def test_cli_trains_and_writes_a_policy_directory(data: Transitions, tmp_path: Path) -> None:
    from rlops_trainer.datasets import save

    path = save(data, tmp_path / "data.parquet")
    out = tmp_path / "run"
    args = ["bc", "--data", str(path), "--out", str(out), "--steps", "50", "--no-progress"]
    result = CliRunner().invoke(
        app, [*args, "--set", "hidden=16", "--log-every", "25"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert (out / "policy" / "policy.pt").is_file()
    assert (out / "policy" / "model-card.json").is_file()
    assert (out / "metrics.jsonl").is_file()
    assert "steps/s" in result.output
    card = json.loads((out / "policy" / "model-card.json").read_text())
    assert card["algorithm"] == "bc"
    assert card["hyperparameters"]["hidden"] == [16]

    base = ["bc", "--data", str(path), "--out", str(tmp_path / "other"), "--steps", "5"]
    bad_name = CliRunner().invoke(app, [*base, "--name", "no spaces"])
    assert bad_name.exit_code == 2
    assert "--name 'no spaces'" in bad_name.output
    bad_device = CliRunner().invoke(app, [*base, "--device", "tpu"])
    assert bad_device.exit_code == 2
    assert "accepted: auto, cpu, cuda, cuda:N" in bad_device.output
    # Starting afresh over a finished run would mix two runs' checkpoints.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2
    assert "--resume" in again.output
    assert not (tmp_path / "other").exists()
