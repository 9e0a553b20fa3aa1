"""The online run's baseline: the incumbent champion's return in the run's environment, exported as
``rlops_train_baseline_return`` so that ``RlopsTrainingEvalRegression`` has a level to compare with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rlops_trainer.collect import collect
from rlops_trainer.commands.train import _champion_dir
from rlops_trainer.export import load_policy_dir
from rlops_trainer.online.config import parse_config
from rlops_trainer.online.run import OnlineTrainingError, baseline_return
from rlops_trainer.policy import Selection
from rlops_trainer.registry import Registry
from rlops_trainer.rollout import rollout
from trainer_testkit import policy_dir

CONFIG: dict[str, Any] = {
    "algorithm": "PPO",
    "env": "CartPole-v1",
    "seed": 3,
    "export": {"name": "cartpole", "reference_episodes": 6},
}


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("baseline")
    data = collect("CartPole-v1", "random", episodes=5, seed=0, progress=False)
    return policy_dir(root, data, "cartpole", [0.0, 0.5, 10.0, 2.0], Selection(temperature=1.0, epsilon=0.1))


def test_baseline_is_the_champions_return_in_the_runs_environment(champion: Path) -> None:
    cfg = parse_config(CONFIG, "test")
    got = baseline_return(champion, cfg)
    module, card = load_policy_dir(champion)
    # The card's selection, as the champion is served, over as many episodes as the final evaluation.
    want = rollout(module, Selection.from_card(card), "CartPole-v1", 6, seed=3).returns.mean()
    assert got == want
    assert got > 100  # a real controller, far above a random policy's ~22
    other_seed = parse_config({**CONFIG, "seed": 4}, "test")
    assert baseline_return(champion, other_seed) != got


def test_a_baseline_for_another_environment_is_refused(champion: Path) -> None:
    cfg = parse_config({**CONFIG, "env": "Acrobot-v1"}, "test")
    with pytest.raises(OnlineTrainingError, match=r"for CartPole-v1, but this run trains in Acrobot-v1"):
        baseline_return(champion, cfg)
    with pytest.raises(OnlineTrainingError, match=r"baseline policy .*missing.*"):
        baseline_return(champion.parent / "missing", parse_config(CONFIG, "test"))


def test_the_registry_champion_is_the_baseline_when_there_is_one(champion: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    reg = Registry(registry)
    assert _champion_dir(registry, "cartpole") is None  # an empty registry: no baseline
    reg.publish(champion, "cartpole")
    assert _champion_dir(registry, "cartpole") is None  # a candidate is not an incumbent
    reg.promote("cartpole", 1, require_gate=False, force_reason="first champion")
    assert _champion_dir(registry, "cartpole") == reg.resolve("cartpole", "champion")
    assert _champion_dir(registry, "other") is None
