"""Export of RLlib modules without Ray: the copied network against RLlib's own forward, reference episodes,
and the translation of RLlib results into metrics records."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from rlops_trainer.export import ExportError, probe_observations, script_policy
from rlops_trainer.online.config import OnlineConfig, parse_config
from rlops_trainer.online.export import (
    RLlibScores,
    check_module_parity,
    policy_from_module,
    reference_episodes,
)
from rlops_trainer.online.rllib import (
    EPISODES_KEY,
    EpisodeWindow,
    SquashedGaussian,
    algorithm_config,
    record_from_result,
)
from rlops_trainer.policy import ContinuousPolicyModule, Selection

CASES = {
    "ppo-separate-value": ("PPO", {"vf_share_layers": False}, {}),
    "ppo-shared-relu": ("PPO", {"vf_share_layers": True, "activation": "relu"}, {}),
    "appo": ("APPO", {"hidden": [32]}, {}),
    "dqn-dueling": ("DQN", {"hidden": [32, 16]}, {"dueling": True}),
    "dqn-plain": ("DQN", {"hidden": [32]}, {"dueling": False}),
}


def config(
    algorithm: str, model: dict[str, Any] | None = None, training: dict[str, Any] | None = None
) -> OnlineConfig:
    env = "Pendulum-v1" if algorithm == "SAC" else "CartPole-v1"
    return parse_config(
        {"algorithm": algorithm, "env": env, "model": model or {}, "training": training or {}}, "test"
    )


def build_module(cfg: OnlineConfig) -> Any:
    torch.manual_seed(0)
    env = gym.make(cfg.env)
    try:
        return algorithm_config(cfg).get_rl_module_spec(env=env).build().eval()
    finally:
        env.close()


def observations(n: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 4)) * np.array([1.0, 2.0, 0.2, 2.0])).astype(np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_exported_network_reproduces_rllib(case: str) -> None:
    algorithm, model, training = CASES[case]
    cfg = config(algorithm, model, training)
    module = build_module(cfg)
    policy = policy_from_module(module, algorithm, obs_dim=4)
    assert policy.score_kind == ("q_values" if algorithm == "DQN" else "logits")
    x = torch.as_tensor(observations())
    with torch.no_grad():
        ours = policy(x)
        theirs = RLlibScores(module, algorithm)(x)
        scripted = script_policy(policy)(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scripted, theirs, rtol=1e-6, atol=1e-6)
    deviations = check_module_parity(module, policy, algorithm, observations(), Selection())
    assert max(deviations.values()) <= 1e-6
    # The copy is independent: training the module further does not change the exported policy.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5)
    torch.testing.assert_close(policy(x), ours)


def test_parity_check_catches_a_different_network() -> None:
    cfg = config("PPO")
    module = build_module(cfg)
    policy = policy_from_module(module, "PPO", obs_dim=4)
    with torch.no_grad():
        policy.net[-1].bias.add_(torch.tensor([5.0, -5.0]))  # shifts every logit: actions change
    with pytest.raises(ExportError, match="does not reproduce RLlib's module"):
        check_module_parity(module, policy, "PPO", observations(), Selection())


def test_reference_episodes_have_exact_propensities() -> None:
    cfg = config("PPO", {"hidden": [16]})
    module = build_module(cfg)
    policy = policy_from_module(module, "PPO", obs_dim=4)
    sampled = Selection(temperature=1.0, epsilon=0.1)
    data = reference_episodes(policy, sampled, cfg, episodes=5, seed=3)
    assert len(np.unique(data.episode_id)) == 5
    assert data.meta.source == "online:ppo"
    assert data.meta.env_id == "CartPole-v1"
    probs = policy.probs_numpy(data.observation, sampled)
    expected = np.log(probs[np.arange(len(data)), data.action])
    np.testing.assert_allclose(data.behavior_logp, expected, rtol=1e-5, atol=1e-6)
    again = reference_episodes(policy, sampled, cfg, episodes=5, seed=3)
    assert again.fingerprint() == data.fingerprint()
    probe = probe_observations(data)
    assert probe.shape[1] == 4
    assert np.isfinite(probe).all()
    greedy = reference_episodes(policy, Selection(), cfg, episodes=2, seed=3)
    assert np.all(greedy.behavior_logp == 0.0)


def result(iteration: int, steps: float, episodes: Any, **learner: float) -> dict[str, Any]:
    return {
        "training_iteration": iteration,
        "num_env_steps_sampled_lifetime": steps,
        "env_runners": {EPISODES_KEY: episodes},
        "learners": {
            "default_policy": {"weights_seq_no": float(iteration), **learner},
            "__all_modules__": {"num_env_steps_trained": 1000.0 if learner else math.nan},
        },
        "fault_tolerance": {"num_healthy_workers": 2, "num_remote_worker_restarts": 1},
    }


def test_records_from_results_keep_an_episode_window() -> None:
    cfg = parse_config({"algorithm": "PPO", "env": "CartPole-v1", "resources": {"env_runners": 2}}, "test")
    window = EpisodeWindow(3)
    first = record_from_result(
        result(
            1,
            1000.0,
            [(10.0, 10, 4, 10), (20.0, 20, 6, 20)],
            total_loss=1.5,
            vf_loss=2.0,
            policy_loss=-0.1,
            entropy=0.6,
            gradients_default_optimizer_global_norm=0.7,
        ),
        cfg,
        window,
        iteration_s=0.5,
        env_steps_before=0.0,
        time_s=0.5,
    )
    assert first["iteration"] == 1
    assert first["step"] == 1
    assert first["env_steps"] == 1000.0
    assert first["env_steps_per_s"] == 2000.0
    assert first["episode_return_mean"] == 15.0
    assert first["episodes"] == 2
    assert first["exploration_rate"] == pytest.approx(10 / 30)
    assert (first["loss"], first["value_loss"], first["policy_loss"]) == (1.5, 2.0, -0.1)
    assert first["grad_norm"] == 0.7
    assert first["entropy"] == 0.6
    assert first["env_runner_restarts"] == 1
    assert first["healthy_env_runners"] == 2
    # No episode ended (RLlib reports NaN), then a single one (RLlib unwraps a one-item series).
    second = record_from_result(
        result(2, 2000.0, math.nan), cfg, window, iteration_s=1.0, env_steps_before=1000.0, time_s=1.5
    )
    assert second["episode_return_mean"] == 15.0
    assert "exploration_rate" not in second
    # That iteration updated nothing (its samples were lost): no learner values, not a divergence.
    assert "loss" not in second
    assert "step" not in second
    diverged = record_from_result(
        result(9, 9000.0, math.nan, total_loss=math.nan),
        cfg,
        EpisodeWindow(3),
        iteration_s=1.0,
        env_steps_before=8000.0,
        time_s=9.0,
    )
    assert math.isnan(diverged["loss"])
    third = record_from_result(
        result(3, 3000.0, (60.0, 60, 0, 60)),
        cfg,
        window,
        iteration_s=1.0,
        env_steps_before=2000.0,
        time_s=2.5,
    )
    assert third["episodes"] == 3
    assert third["episode_return_mean"] == 30.0
    assert window.full
    fourth = record_from_result(
        result(4, 4000.0, [(90.0, 90, 0, 90)]),
        cfg,
        window,
        iteration_s=1.0,
        env_steps_before=3000.0,
        time_s=3.5,
    )
    assert fourth["episode_return_mean"] == pytest.approx((20 + 60 + 90) / 3)
    restored = EpisodeWindow(3)
    restored.restore(window.state())
    assert restored.state() == window.state()


def test_dqn_records_report_the_epsilon_schedule() -> None:
    cfg = config("DQN", training={"epsilon_start": 1.0, "epsilon_end": 0.0, "epsilon_steps": 1000})
    record = record_from_result(
        result(1, 250.0, math.nan, qf_loss=0.3, qf_mean=4.0),
        cfg,
        EpisodeWindow(5),
        iteration_s=1.0,
        env_steps_before=0.0,
        time_s=1.0,
    )
    assert record["exploration_rate"] == pytest.approx(0.75)
    assert record["td_loss"] == 0.3
    assert record["q_mean"] == 4.0
    assert math.isnan(record["episode_return_mean"])


# --------------------------------------------------------------------------------------------------
# SAC (Box actions)


def pendulum_observations(n: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    angle = rng.uniform(-np.pi, np.pi, size=n)
    speed = rng.uniform(-8.0, 8.0, size=n)
    return np.stack([np.cos(angle), np.sin(angle), speed], axis=1).astype(np.float32)


def rllib_action(module: Any, x: torch.Tensor) -> np.ndarray:
    """The action RLlib's own inference path takes: the distribution's deterministic sample in [-1, 1],
    rescaled into the bounds by the env connector's unsquash_action."""
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    with torch.no_grad():
        inputs = module.forward_inference({"obs": x})["action_dist_inputs"]
        dist = module.get_inference_action_dist_cls().from_logits(inputs)
        return np.asarray(unsquash_action(dist.to_deterministic().sample().numpy(), module.action_space))


@pytest.mark.parametrize("model", [{"hidden": [32, 16], "activation": "relu"}, {"hidden": [8]}])
def test_sac_exports_the_squashed_mean_of_rllibs_actor(model: dict[str, Any]) -> None:
    cfg = config("SAC", model)
    module = build_module(cfg)
    policy = policy_from_module(module, "SAC", obs_dim=3)
    assert isinstance(policy, ContinuousPolicyModule)
    assert policy.score_kind == "action"
    x = torch.as_tensor(pendulum_observations())
    with torch.no_grad():
        mean = module.forward_inference({"obs": x})["action_dist_inputs"][:, :1]
        torch.testing.assert_close(policy.pre_squash(x), mean, rtol=1e-6, atol=1e-6)
        expected = 2.0 * torch.tanh(mean)  # Pendulum's bounds are [-2, 2]
        torch.testing.assert_close(policy(x), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(script_policy(policy)(x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rllib_action(module, x), expected.numpy(), rtol=1e-5, atol=1e-6)
    deviations = check_module_parity(module, policy, "SAC", pendulum_observations(), Selection(std=0.3))
    assert set(deviations) == {"pre_squash", "action"}
    assert max(deviations.values()) <= 1e-6


def test_sac_greedy_action_is_squashed_not_clipped() -> None:
    """RLlib 2.60's own squashed Gaussian returns the raw mean as its deterministic action, which the env
    connector then clips into the bounds; rlops' catalog squashes it, as serving does."""
    from ray.rllib.core.distribution.torch.torch_distribution import TorchSquashedGaussian

    module = build_module(config("SAC", {"hidden": [8]}))
    assert module.get_inference_action_dist_cls() is SquashedGaussian
    assert module.get_train_action_dist_cls() is SquashedGaussian
    inputs = torch.tensor([[1.5, 0.0], [-0.3, -1.0]])
    ours = SquashedGaussian.from_logits(inputs).to_deterministic().sample()
    torch.testing.assert_close(ours, torch.tanh(inputs[:, :1]))
    theirs = TorchSquashedGaussian.from_logits(inputs).to_deterministic().sample()
    if torch.allclose(theirs, torch.tanh(inputs[:, :1])):
        pytest.fail("RLlib squashes its deterministic action now: SquashedGaussian can go")
    # Sampling and log-densities stay RLlib's.
    torch.manual_seed(0)
    a, logp = SquashedGaussian.from_logits(inputs).sample_and_logp()
    torch.manual_seed(0)
    b, logp_b = TorchSquashedGaussian.from_logits(inputs).sample_and_logp()
    torch.testing.assert_close((a, logp), (b, logp_b))


def test_sac_parity_check_catches_a_different_network() -> None:
    module = build_module(config("SAC", {"hidden": [16]}))
    policy = policy_from_module(module, "SAC", obs_dim=3)
    assert isinstance(policy, ContinuousPolicyModule)
    with torch.no_grad():
        policy.net[-2].bias.add_(0.5)  # the head's last layer: every mean moves
    with pytest.raises(ExportError, match=r"does not reproduce RLlib's module: .* in (pre_squash|action)"):
        check_module_parity(module, policy, "SAC", pendulum_observations(), Selection())


def test_sac_reference_episodes_log_exact_densities() -> None:
    cfg = config("SAC", {"hidden": [16]})
    policy = policy_from_module(build_module(cfg), "SAC", obs_dim=3)
    assert isinstance(policy, ContinuousPolicyModule)
    explored = Selection(std=0.3)
    data = reference_episodes(policy, explored, cfg, episodes=2, seed=3)
    assert data.meta.is_continuous
    assert (data.meta.action_space["low"], data.meta.action_space["high"]) == ([-2.0], [2.0])
    assert data.meta.source == "online:sac"
    assert "std 0.3" in data.meta.behavior_policy
    assert len(data) == 400  # Pendulum's episodes last 200 steps
    assert data.action.shape == (400, 1)
    assert np.all(np.abs(data.action) <= 2.0)
    with torch.no_grad():
        expected = policy.log_prob(torch.as_tensor(data.observation), torch.as_tensor(data.action), 0.3)
    np.testing.assert_allclose(data.behavior_logp, expected.numpy(), rtol=1e-4, atol=1e-4)
    again = reference_episodes(policy, explored, cfg, episodes=2, seed=3)
    assert again.fingerprint() == data.fingerprint()
    greedy = reference_episodes(policy, Selection(), cfg, episodes=1, seed=3)
    assert np.isnan(greedy.behavior_logp).all()  # a point mass has no density
    with torch.no_grad():
        np.testing.assert_allclose(
            greedy.action, policy(torch.as_tensor(greedy.observation)).numpy(), atol=1e-6
        )


def test_sac_records_report_temperature_and_entropy() -> None:
    record = record_from_result(
        result(1, 500.0, [(-1200.0, 200, 0, 0)], qf_loss=3.0, policy_loss=-5.0, alpha_value=0.4, logps=-0.8),
        config("SAC"),
        EpisodeWindow(5),
        iteration_s=1.0,
        env_steps_before=0.0,
        time_s=1.0,
    )
    assert (record["td_loss"], record["policy_loss"], record["alpha"]) == (3.0, -5.0, 0.4)
    assert record["entropy"] == pytest.approx(0.8)
    assert record["episode_return_mean"] == -1200.0
    assert "exploration_rate" not in record
