"""Collection in Box action spaces: exact log-densities, uniform rows, policy directories, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rlops_trainer import datasets
from rlops_trainer.collect import CollectError, collect, controller_module, parse_behavior, train_controller
from rlops_trainer.export import script_policy
from rlops_trainer.policy import Selection

ENV = "Pendulum-v1"
LOW, HIGH = np.array([-2.0]), np.array([2.0])
SMALL = "mixture:gaussian:0.5@2000=0.5,uniform=0.5"


def test_box_components_parse_to_a_canonical_form() -> None:
    b = parse_behavior(" mixture:uniform=1, gaussian:0.50@300=3 ")
    assert b.spec == "mixture:uniform=1,gaussian:0.5@300=3"
    assert b.weights == (0.25, 0.75)
    assert b.components[1].std == 0.5
    assert b.components[1].budget_steps == 300
    assert b.components[0].for_box


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gaussian:0", "must be positive"),
        ("gaussian:-1", "must be positive"),
        ("gaussian:x", "bad std 'x'"),
        ("gaussian:0.3@0", "bad training budget '0'"),
    ],
)
def test_bad_box_specs(spec: str, expected: str) -> None:
    with pytest.raises(CollectError, match=expected):
        parse_behavior(spec)


def test_components_must_fit_the_action_space() -> None:
    with pytest.raises(CollectError, match=r"random are for Discrete action spaces, but Pendulum-v1 has Box"):
        collect(ENV, "random", episodes=1, seed=0, progress=False)
    with pytest.raises(CollectError, match=r"uniform are for Box action spaces, but CartPole-v1"):
        collect("CartPole-v1", "uniform", episodes=1, seed=0, progress=False)


def test_uniform_rows_log_minus_the_log_volume_of_the_box() -> None:
    t = collect(ENV, "uniform", episodes=2, seed=0, progress=False)
    assert t.meta.is_continuous
    assert t.meta.action_bounds()[0].tolist() == [-2.0]
    assert t.action.shape == (400, 1)
    np.testing.assert_allclose(t.behavior_logp, -np.log(4.0), rtol=1e-6)
    assert (t.action >= -2.0).all()
    assert (t.action <= 2.0).all()


def test_gaussian_log_densities_equal_the_controllers_log_prob(tmp_path: Path) -> None:
    t = collect(ENV, SMALL, episodes=6, seed=1, progress=False)
    controller = train_controller(ENV, 1, 2000)
    components = t.meta.extra["episodes_per_component"]
    assert sum(components.values()) == 6
    uniform = np.isclose(t.behavior_logp, -np.log(4.0), atol=1e-6)
    gauss = ~uniform
    assert gauss.any()
    assert uniform.any()
    recomputed = controller.policy.log_prob_numpy(t.observation[gauss], t.action[gauss], Selection(std=0.5))
    np.testing.assert_allclose(t.behavior_logp[gauss], recomputed, rtol=1e-4, atol=1e-4)
    # The same arguments give the same dataset; it survives the Parquet round trip unchanged.
    again = collect(ENV, SMALL, episodes=6, seed=1, progress=False)
    assert again.fingerprint() == t.fingerprint()
    back = datasets.load(datasets.save(t, tmp_path / "p.parquet"))
    assert back.fingerprint() == t.fingerprint()


def test_collection_leaves_the_callers_torch_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    collect(ENV, "gaussian:0.3@1000", episodes=1, seed=0, progress=False)
    torch.testing.assert_close(torch.rand(3), expected)


def test_controller_module_matches_the_numpy_controller_and_clips_its_mean() -> None:
    rng = np.random.default_rng(0)
    theta = rng.normal(size=8 * 3 + 8 + 8 + 1) * 5
    module = controller_module(theta, 3, LOW, HIGH)
    obs = rng.normal(size=(50, 3)).astype(np.float32) * 3
    with torch.no_grad():
        u = module.pre_squash(torch.as_tensor(obs)).numpy()
    w1, b1 = theta[:24].reshape(8, 3), theta[24:32]
    w2, b2 = theta[32:40].reshape(1, 8), theta[40:]
    expected = np.clip(np.tanh(obs @ w1.T + b1) @ w2.T + b2, -3, 3)
    np.testing.assert_allclose(u, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(u).max() <= 3.0


def test_exploring_around_an_exported_policy_directory(tmp_path: Path) -> None:
    controller = train_controller(ENV, 0, 1000)
    policy_dir = tmp_path / "pol"
    policy_dir.mkdir()
    script_policy(controller.policy).save(str(policy_dir / "policy.pt"))
    t = collect(ENV, "gaussian:0.4", episodes=2, seed=0, progress=False, policy_dir=policy_dir)
    assert t.meta.behavior_policy == f"gaussian:0.4 around {policy_dir}"
    recomputed = controller.policy.log_prob_numpy(t.observation, t.action, Selection(std=0.4))
    np.testing.assert_allclose(t.behavior_logp, recomputed, rtol=1e-4, atol=1e-4)
    with pytest.raises(CollectError, match="names a training budget"):
        collect(ENV, "gaussian:0.4@100", episodes=1, seed=0, progress=False, policy_dir=policy_dir)
    with pytest.raises(CollectError, match=r"no policy\.pt"):
        collect(ENV, "gaussian:0.4", episodes=1, seed=0, progress=False, policy_dir=tmp_path)


def test_a_policy_with_other_bounds_is_refused(tmp_path: Path) -> None:
    module = controller_module(np.zeros(41), 3, np.array([-1.0]), np.array([1.0]))
    script_policy(module).save(str(tmp_path / "policy.pt"))
    with pytest.raises(
        CollectError, match=r"squashes actions into \[\[-1.0\], \[1.0\]\].*acts in \[\[-2.0\]"
    ):
        collect(ENV, "gaussian:0.4", episodes=1, seed=0, progress=False, policy_dir=tmp_path)
