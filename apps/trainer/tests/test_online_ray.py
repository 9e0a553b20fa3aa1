"""Online training on a real local Ray instance: a short PPO run end to end (checkpoints, metrics endpoint,
export and parity with RLlib's module, registry), a killed EnvRunner, a killed driver resumed, and
short APPO and DQN runs through the same export. Budgets are tiny: these check the machinery, not learning."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rlops_contracts import metrics as m
from rlops_trainer.collect import collect
from rlops_trainer.datasets import load
from rlops_trainer.export import load_policy_dir
from rlops_trainer.online.config import OnlineConfig, parse_config
from rlops_trainer.online.export import RLlibScores, load_module
from rlops_trainer.online.run import (
    OnlineRun,
    OnlineTrainingError,
    baseline_return,
    checkpoints,
    read_state,
    train_online,
)
from rlops_trainer.policy import Selection
from rlops_trainer.registry import Registry
from trainer_testkit import policy_dir

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY_PPO: dict[str, Any] = {
    "algorithm": "PPO",
    "env": "CartPole-v1",
    "seed": 1,
    "resources": {"env_runners": 0, "envs_per_env_runner": 4},
    "model": {"hidden": [16, 16]},
    "training": {"train_batch_size": 256, "minibatch_size": 128, "num_epochs": 2},
    "stop": {"env_steps": None, "iterations": 3},
    "evaluation": {"every": 2, "episodes": 2},
    "checkpoint": {"every": 2, "keep": 2},
    "export": {"name": "tiny-ppo", "reference_episodes": 3},
    "metrics": {"port": 0, "episode_window": 5},
}


def tiny(overrides: dict[str, Any] | None = None, base: dict[str, Any] = TINY_PPO) -> OnlineConfig:
    data = json.loads(json.dumps(base))
    for key, value in (overrides or {}).items():
        section, _, field = key.partition(".")
        if field:
            data.setdefault(section, {})[field] = value
        else:
            data[section] = value
    return parse_config(data, "test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ppo_run_checkpoints_serves_metrics_and_exports(
    local_ray: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mlruns = f"file://{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlruns)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's file store, enough for a test
    out = tmp_path / "run"
    port = free_port()
    cfg = tiny({"metrics.port": port, "metrics.addr": "127.0.0.1"})
    scraped: list[str] = []

    def scrape(algo: Any, record: dict[str, float]) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        scraped.append(urllib.request.urlopen(url, timeout=10).read().decode())

    # The incumbent: a hand-made controller whose return is the run's baseline.
    data = collect("CartPole-v1", "random", episodes=5, seed=0, progress=False)
    incumbent = policy_dir(tmp_path, data, "tiny-ppo", [0.0, 0.5, 10.0, 2.0], Selection(temperature=1.0))
    online = OnlineRun(out_dir=out, progress=False, on_iteration=scrape, baseline=incumbent)
    result = train_online(cfg, online)

    assert result.iterations == 3
    assert result.baseline_return == baseline_return(incumbent, cfg)
    assert result.stopped_by == "iterations"
    assert result.env_steps >= 3 * 256
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[-1]["env_steps"] == result.env_steps
    for key in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm", "episode_return_mean", "step"):
        assert np.isfinite(records[-1][key]), key
    assert 0.0 <= records[-1]["exploration_rate"] <= 1.0
    # CartPole pays 1 per step: lengths counted across sample chunks must equal the returns.
    assert all(r["episode_length_mean"] == r["episode_return_mean"] for r in records)
    # Greedy evaluation every 2 iterations.
    assert "eval_return" not in records[0]
    assert records[1]["eval_return"] >= 8.0  # CartPole episodes last at least 8 steps

    # The endpoint served the training series while the run was going.
    assert len(scraped) == 3
    samples = {
        (sample.name, sample.labels.get("loss")): sample
        for family in text_string_to_metric_families(scraped[-1])
        for sample in family.samples
    }
    for name in (
        m.TRAIN_EPISODE_RETURN,
        m.TRAIN_POLICY_ENTROPY,
        m.TRAIN_GRAD_NORM,
        m.TRAIN_ENV_STEPS_PER_SECOND,
        m.TRAIN_EXPLORATION_RATE,
        m.TRAIN_LAST_PROGRESS,
    ):
        sample = samples[(name, None)]
        assert sample.labels == {"run": out.name, "algorithm": "ppo", "policy": "tiny-ppo"}, name
    assert samples[(m.TRAIN_LOSS, "value")].value == records[-1]["value_loss"]
    assert samples[(m.TRAIN_LOSS, "policy")].value == records[-1]["policy_loss"]
    assert samples[(m.TRAIN_ENV_STEPS, None)].value == result.env_steps
    assert samples[(m.TRAIN_STEPS, None)].value == records[-1]["step"]
    assert samples[(m.TRAIN_EPISODE_RETURN, None)].value == records[-1]["episode_return_mean"]
    assert samples[(m.TRAIN_EVAL_RETURN, None)].value == records[1]["eval_return"]
    # The baseline was there from the first scrape on.
    first = {x.name: x.value for f in text_string_to_metric_families(scraped[0]) for x in f.samples}
    assert first[m.TRAIN_BASELINE_RETURN] == result.baseline_return

    # Checkpoints every 2 iterations plus the last; the state says where each one is.
    assert [p.name for p in checkpoints(out)] == ["iter-000002", "iter-000003"]
    assert read_state(result.checkpoint)["iteration"] == 3

    # The policy directory is the offline trainer's artifact: a validated card and a TorchScript file.
    assert result.policy_dir == out / "policy"
    scripted, card = load_policy_dir(result.policy_dir)
    assert card["algorithm"] == "ppo"
    assert card["name"] == "tiny-ppo"
    assert card["policy"]["score_kind"] == "logits"
    assert card["dataset"]["source"] == "online:ppo"
    assert card["training"]["steps"] == result.env_steps
    assert card["hyperparameters"]["training"]["train_batch_size"] == 256
    reference = load(out / "reference.parquet")
    assert card["dataset"]["fingerprint"] == reference.fingerprint()
    assert card["reference"]["observation"]["n"] == len(reference)

    # Parity: the TorchScript file against RLlib's module from the final checkpoint, same observations.
    module = load_module(result.checkpoint)
    rng = np.random.default_rng(7)
    obs = torch.as_tensor(
        np.concatenate([reference.observation, rng.normal(size=(256, 4)) * [1.0, 2.0, 0.2, 2.0]]),
        dtype=torch.float32,
    )
    with torch.no_grad():
        theirs = RLlibScores(module, "PPO")(obs)
        ours = scripted(obs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.argmax(dim=-1), theirs.argmax(dim=-1))
    probs = scripted.action_probs(obs, 1.0, 0.0)
    torch.testing.assert_close(probs, torch.softmax(theirs, dim=-1), rtol=1e-5, atol=1e-6)

    # Published through the registry exactly as an offline policy is.
    registry = Registry(tmp_path / "registry")
    version = registry.publish(result.policy_dir, "tiny-ppo")
    loaded, published = registry.load("tiny-ppo", version)
    assert published["algorithm"] == "ppo"
    assert published["version"] == version
    torch.testing.assert_close(loaded(obs), ours)

    # Tracked in MLflow: every iteration's record, the final evaluation, the card and the config.
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=mlruns)
    (run,) = client.search_runs([client.get_experiment_by_name("rlops-online").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.train_batch_size"] == "256"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "policy_loss")] == [1, 2, 3]
    assert run.data.metrics["eval_return"] == card["training"]["final_metrics"]["reference_return_mean"]
    assert run.data.metrics["baseline_return"] == result.baseline_return
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "config.yaml",
        "model-card.json",
    ]

    # A finished run resumes to its end at once (nothing is trained again) and refuses a fresh start.
    again = train_online(cfg, OnlineRun(out_dir=out, resume=True, progress=False, export=False))
    assert again.iterations == 3
    assert again.start_iteration == 3
    with pytest.raises(OnlineTrainingError, match="already holds checkpoints"):
        train_online(cfg, OnlineRun(out_dir=out, progress=False))
    changed = tiny({"training": {**TINY_PPO["training"], "num_epochs": 3}})
    with pytest.raises(OnlineTrainingError, match=r"another config \(training"):
        train_online(changed, OnlineRun(out_dir=out, resume=True, progress=False))


def test_killed_env_runner_is_replaced_and_training_goes_on(local_ray: None, tmp_path: Path) -> None:
    budget = 8 * 256
    cfg = tiny(
        {
            "resources.env_runners": 1,
            "resources.sample_timeout_s": 30.0,
            # The env-step budget can only be spent if a new EnvRunner takes over; time_s bounds the test.
            "stop": {"env_steps": budget, "iterations": None, "time_s": 240.0},
            "checkpoint.every": 0,
        }
    )
    killed: list[int] = []
    replacements: list[int] = []

    def kill_env_runner(algo: Any, record: dict[str, float]) -> None:
        pids = algo.env_runner_group.foreach_env_runner(lambda runner: os.getpid(), local_env_runner=False)
        if record["iteration"] == 2:
            assert len(pids) == 1
            assert pids[0] != os.getpid()
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        elif killed:
            replacements[:] = pids

    result = train_online(
        cfg, OnlineRun(out_dir=tmp_path, progress=False, export=False, on_iteration=kill_env_runner)
    )
    assert killed
    assert result.stopped_by == "env_steps"
    assert result.env_steps >= budget
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["env_runner_restarts"] == 0
    assert records[-1]["env_runner_restarts"] == 1
    assert records[-1]["healthy_env_runners"] == 1
    # Iterations went on while the EnvRunner was down, then sampling resumed in a new process.
    assert any(r["healthy_env_runners"] == 0 for r in records)
    assert [r["iteration"] for r in records] == list(range(1, len(records) + 1))
    assert len(replacements) == 1
    assert replacements[0] != killed[0]
    assert not Path(f"/proc/{killed[0]}").exists()


def test_killed_driver_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    """The CLI as a process: SIGKILL mid-run, then --resume loses at most one checkpoint interval."""
    config = dict(TINY_PPO)
    config = {**config, "stop": {"env_steps": None, "iterations": 8}, "checkpoint": {"every": 2, "keep": 2}}
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "rlops_cli.main",
        "train",
        "online",
        "--config",
        str(path),
        "--out",
        str(out),
        "--no-progress",
        "--no-export",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            if len(lines) >= 5 and checkpoints(out):
                break
            if proc.poll() is not None:
                pytest.fail(f"the run ended before it was killed:\n{proc.stdout.read().decode()}")  # type: ignore[union-attr]
            time.sleep(0.2)
        else:
            pytest.fail("the run did not reach iteration 5 in time")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = len(metrics.read_text().splitlines())
    last = checkpoints(out)[-1]
    saved = read_state(last)["iteration"]
    assert killed_at - saved <= 2, "more than one checkpoint interval would be lost"
    assert killed_at < 8

    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed at {saved}" in resumed.stdout
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in records] == list(range(1, 9))
    steps = [r["env_steps"] for r in records]
    assert steps == sorted(steps)
    assert len(set(steps)) == len(steps)
    assert read_state(checkpoints(out)[-1])["iteration"] == 8


@pytest.mark.parametrize("algorithm", ["APPO", "DQN"])
def test_appo_and_dqn_export_through_the_same_path(local_ray: None, tmp_path: Path, algorithm: str) -> None:
    base: dict[str, Any] = {
        "algorithm": algorithm,
        "env": "CartPole-v1",
        "model": {"hidden": [16]},
        "stop": {"iterations": 2, "env_steps": None},
        "checkpoint": {"every": 0},
        "export": {"reference_episodes": 2},
        "metrics": {"port": 0, "episode_window": 5},
    }
    if algorithm == "APPO":
        base["resources"] = {"env_runners": 1, "envs_per_env_runner": 2, "learners": 1}
        base["training"] = {
            "train_batch_size": 100,
            "rollout_fragment_length": 25,
            "min_time_s_per_iteration": 0.5,
        }
    else:
        base["resources"] = {"env_runners": 0, "envs_per_env_runner": 2}
        base["training"] = {"learning_starts": 50, "train_batch_size": 16, "rollout_fragment_length": 8}
    cfg = parse_config(base, "test")
    result = train_online(cfg, OnlineRun(out_dir=tmp_path, progress=False))
    assert result.iterations == 2
    scripted, card = load_policy_dir(result.policy_dir)  # type: ignore[arg-type]
    assert card["algorithm"] == algorithm.lower()
    assert card["policy"]["score_kind"] == ("q_values" if algorithm == "DQN" else "logits")
    module = load_module(result.checkpoint)
    obs = torch.as_tensor(np.random.default_rng(1).normal(size=(128, 4)), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(obs), RLlibScores(module, algorithm)(obs), rtol=1e-5, atol=1e-5)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    if algorithm == "DQN":
        assert 0.0 < record["exploration_rate"] <= 1.0


def test_sac_trains_box_actions_and_exports_a_box_policy(local_ray: None, tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "algorithm": "SAC",
            "env": "Pendulum-v1",
            "seed": 2,
            "resources": {"env_runners": 0, "envs_per_env_runner": 1},
            "model": {"hidden": [16], "activation": "relu"},
            "training": {"learning_starts": 64, "train_batch_size": 32},
            "stop": {"iterations": 3, "env_steps": None},
            "evaluation": {"every": 3, "episodes": 1},
            "checkpoint": {"every": 0},
            "export": {"reference_episodes": 2, "serve_std": 0.2},
            "metrics": {"port": 0, "episode_window": 5},
        },
        "test",
    )
    result = train_online(cfg, OnlineRun(out_dir=tmp_path, progress=False))
    assert result.iterations == 3
    scripted, card = load_policy_dir(result.policy_dir)  # type: ignore[arg-type]
    assert card["algorithm"] == "sac"
    assert card["policy"]["score_kind"] == "action"
    assert card["policy"]["selection"]["std"] == 0.2
    assert card["action_space"]["type"] == "Box"
    assert (card["action_space"]["low"], card["action_space"]["high"]) == ([-2.0], [2.0])
    # The served action is RLlib's actor mean squashed into the bounds.
    module = load_module(result.checkpoint)
    obs = torch.as_tensor(np.random.default_rng(1).normal(size=(128, 3)), dtype=torch.float32)
    with torch.no_grad():
        mean = module.forward_inference({"obs": obs})["action_dist_inputs"][:, :1]
        torch.testing.assert_close(scripted(obs), 2.0 * torch.tanh(mean), rtol=1e-5, atol=1e-5)
    # Reference episodes were explored with the served std: their log-densities are exact.
    reference = load(tmp_path / "reference.parquet")
    assert reference.meta.is_continuous
    assert np.isfinite(reference.behavior_logp).all()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    learned = [r for r in records if "td_loss" in r]
    assert learned, records
    assert {"alpha", "entropy", "policy_loss", "q_mean"} <= set(learned[-1])
    assert "eval_return" in records[-1]
    assert "exploration_rate" not in records[-1]
