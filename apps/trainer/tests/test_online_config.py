"""The online training config: shipped examples load, mistakes name the file and the key, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rlops_trainer.commands.train import app
from rlops_trainer.online.config import (
    APPOTraining,
    ConfigError,
    DQNTraining,
    OnlineConfig,
    PPOTraining,
    SACTraining,
    load_config,
    parse_config,
)
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((ROOT / "configs" / "online").glob("*.yaml"))


def minimal(**extra: object) -> dict[str, object]:
    return {"algorithm": "PPO", "env": "CartPole-v1", **extra}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_configs_are_valid(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.env == ("Pendulum-v1" if cfg.box_actions else "CartPole-v1")
    classes = {"PPO": PPOTraining, "APPO": APPOTraining, "DQN": DQNTraining, "SAC": SACTraining}
    assert isinstance(cfg.training, classes[cfg.algorithm])


def test_examples_cover_every_algorithm() -> None:
    assert {load_config(p).algorithm for p in EXAMPLES} == {"PPO", "APPO", "DQN", "SAC"}


def test_defaults_and_policy_name() -> None:
    cfg = parse_config(minimal(algorithm="ppo"))
    assert cfg.algorithm == "PPO"
    assert cfg.policy_name == "ppo-cartpole-v1"
    assert cfg.resources.env_runners == 0
    assert cfg.metrics.port == 9108
    assert cfg.stop.env_steps == 200_000
    named = parse_config(minimal(export={"name": "balance"}))
    assert named.policy_name == "balance"


def test_to_dict_round_trips() -> None:
    cfg = parse_config(minimal(training={"lr": 3e-4}, stop={"iterations": 5}))
    assert parse_config(cfg.to_dict()) == cfg


def test_unknown_key_lists_the_accepted_ones() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(resources={"env_runnerz": 2}), "run.yaml")
    assert "run.yaml: resources.env_runnerz: unknown key; accepted keys: env_runners," in str(e.value)


def test_training_keys_belong_to_the_algorithm() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(minimal(training={"epsilon_steps": 100}), "run.yaml")
    message = str(e.value)
    assert "run.yaml: training.epsilon_steps: unknown key" in message
    assert "minibatch_size" in message  # PPO's keys are listed
    dqn = parse_config({"algorithm": "DQN", "env": "CartPole-v1", "training": {"epsilon_steps": 100}})
    assert isinstance(dqn.training, DQNTraining)
    assert dqn.training.epsilon_steps == 100


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"env": "CartPole-v1"}, "algorithm: must be one of PPO, APPO, DQN, SAC (missing)"),
        (minimal(algorithm="A3C"), "algorithm: must be one of PPO, APPO, DQN, SAC (got 'A3C')"),
        (minimal(export={"serve_std": 0.3}), "export: serve_std is for Box actions (SAC); PPO serves"),
        (
            {"algorithm": "SAC", "env": "Pendulum-v1", "export": {"serve_temperature": 1.0}},
            "export: serve_temperature and serve_epsilon are for Discrete actions; SAC serves Box",
        ),
        (
            {"algorithm": "SAC", "env": "Pendulum-v1", "training": {"target_entropy": "high"}},
            "training.target_entropy: expected a number, or auto for minus the number of action dimensions",
        ),
        ({"algorithm": "PPO"}, "env: required key is missing"),
        (minimal(training={"lr": -1}), "training.lr: Input should be greater than 0 (got -1)"),
        (minimal(training={"gamma": 1.5}), "training.gamma: Input should be less than or equal to 1"),
        (
            minimal(training={"minibatch_size": 4096, "train_batch_size": 1024}),
            "minibatch_size (4096) must be <= train_batch_size (1024)",
        ),
        (
            minimal(resources={"env_runners": -1}),
            "resources.env_runners: Input should be greater than or equal to 0",
        ),
        (
            minimal(resources={"envs_per_env_runner": "many"}),
            "resources.envs_per_env_runner: Input should be",
        ),
        (minimal(model={"hidden": [64, 0]}), "model.hidden.1: Input should be greater than or equal to 1"),
        (minimal(model={"activation": "gelu"}), "model.activation: Input should be 'tanh' or 'relu'"),
        (minimal(metrics={"port": 70000}), "metrics.port: Input should be less than or equal to 65535"),
        (minimal(export={"name": "no spaces"}), "export.name: use 1-100 letters"),
        (minimal(stop={"env_steps": None}), "stop: set at least one budget"),
        (minimal(training=[1, 2]), "training: expected a mapping of hyperparameters"),
    ],
)
def test_mistakes_name_the_key(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "run.yaml")
    assert str(e.value).startswith("run.yaml: ")
    assert expected in str(e.value)


def test_overrides_are_applied_before_validation() -> None:
    cfg = parse_config(
        minimal(),
        overrides=[
            "training.lr=3e-4",
            "resources.env_runners=4",
            "stop.target_return=475",
            "model.hidden=[32, 32]",
        ],
    )
    assert isinstance(cfg, OnlineConfig)
    assert isinstance(cfg.training, PPOTraining)
    assert cfg.training.lr == 3e-4
    assert cfg.resources.env_runners == 4
    assert cfg.stop.target_return == 475
    assert cfg.model.hidden == [32, 32]
    with pytest.raises(ConfigError, match=r"--set 'training\.lr': expected key=value"):
        parse_config(minimal(), overrides=["training.lr"])
    with pytest.raises(ConfigError, match=r"--set 'env\.x=1': env is not a section"):
        parse_config(minimal(), overrides=["env.x=1"])
    with pytest.raises(ConfigError, match=r"training\.num_epochs: Input should be a valid integer"):
        parse_config(minimal(), overrides=["training.num_epochs=many"])


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [PPO\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("PPO\n")
    with pytest.raises(ConfigError, match=r"scalar\.yaml: expected a mapping of keys"):
        load_config(scalar)


def test_dqn_epsilon_schedule() -> None:
    t = DQNTraining(epsilon_start=1.0, epsilon_end=0.1, epsilon_steps=1000)
    assert t.epsilon_at(0) == 1.0
    assert t.epsilon_at(500) == pytest.approx(0.55)
    assert t.epsilon_at(5000) == pytest.approx(0.1)


def write(tmp_path: Path, data: dict[str, object]) -> Path:
    path = tmp_path / "online.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_reports_config_mistakes_before_ray_starts(tmp_path: Path) -> None:
    runner = CliRunner()
    path = write(tmp_path, minimal(training={"lr": 0}))
    result = runner.invoke(app, ["online", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "training.lr: Input should be greater than 0" in result.output
    assert not (tmp_path / "run").exists()


def test_cli_rejects_an_unknown_environment(tmp_path: Path) -> None:
    path = write(tmp_path, minimal(env="CartPoel-v1"))
    result = CliRunner().invoke(app, ["online", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "env: unknown or unavailable Gymnasium environment 'CartPoel-v1'" in result.output
    assert "CartPole-v1" in result.output  # the suggestion
    path = write(tmp_path, minimal(env_kwargs={"colour": "red"}))
    result = CliRunner().invoke(app, ["online", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "env_kwargs: Gymnasium environment 'CartPole-v1' does not accept the arguments" in result.output


def test_cli_lists_the_online_keys() -> None:
    result = CliRunner().invoke(app, ["config", "dqn"])
    assert result.exit_code == 0
    for key in ("epsilon_steps", "env_runners", "target_return", "episode_window"):
        assert key in result.output


def test_cli_matches_the_algorithm_to_the_action_space(tmp_path: Path) -> None:
    runner = CliRunner()
    path = write(tmp_path, {"algorithm": "SAC", "env": "CartPole-v1"})
    result = runner.invoke(app, ["online", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "env: CartPole-v1 has action space Discrete(2): SAC needs a Box action space" in result.output
    assert "PPO, APPO, DQN take Discrete actions" in " ".join(result.output.split())
    path = write(tmp_path, minimal(env="Pendulum-v1"))
    result = runner.invoke(app, ["online", "--config", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert "env: Pendulum-v1 has action space Box(" in output
    assert "only Discrete action spaces are supported; SAC takes Box actions" in output
    assert not (tmp_path / "run").exists()


def test_sac_keys_and_defaults() -> None:
    cfg = parse_config({"algorithm": "sac", "env": "Pendulum-v1", "training": {"target_entropy": -2}})
    assert isinstance(cfg.training, SACTraining)
    assert cfg.box_actions
    assert cfg.training.target_entropy == -2.0
    assert cfg.policy_name == "sac-pendulum-v1"
    result = CliRunner().invoke(app, ["config", "sac"])
    assert result.exit_code == 0, result.output
    for key in ("actor_lr", "critic_lr", "alpha_lr", "target_entropy", "twin_q", "serve_std"):
        assert key in result.output
