"""The loss functions of the Box-action learners, each against a value computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rlops_trainer.algos.bc_continuous import deterministic_bc_loss, gaussian_bc_loss
from rlops_trainer.algos.continuous import (
    LOG_STD_MAX,
    LOG_STD_MIN,
    GaussianActor,
    log_prob,
    sample,
    twin_td_loss,
    uniform_log_density,
)
from rlops_trainer.algos.cql_continuous import (
    conservative_penalty,
    lagrange_loss,
    sac_actor_loss,
    temperature_loss,
)
from rlops_trainer.algos.iql_continuous import awr_actor_loss
from rlops_trainer.algos.td3bc import smoothed_target_action, td3bc_actor_loss
from rlops_trainer.datasets import DatasetMeta, Transitions
from rlops_trainer.training import scale_actions

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def squashed_log_density(a: float, mean: float, std: float) -> float:
    """By hand: a = tanh(z), z ~ N(mean, std^2); p(a) = N(z) / (1 - a^2)."""
    z = math.atanh(a)
    return -0.5 * ((z - mean) / std) ** 2 - math.log(std) - HALF_LOG_2PI - math.log(1 - a * a)


def test_log_prob_of_a_squashed_gaussian() -> None:
    a = [math.tanh(0.3), math.tanh(1.0)]
    got = log_prob(t(*a)[None], t(0.0, 0.5)[None], t(0.0, math.log(0.5))[None])
    expected = squashed_log_density(a[0], 0.0, 1.0) + squashed_log_density(a[1], 0.5, 0.5)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sample_is_inside_the_box_differentiable_and_consistent_with_log_prob() -> None:
    torch.manual_seed(0)
    mean = torch.tensor([[0.0, 3.0], [-2.0, 0.5]], requires_grad=True)
    log_std = torch.full((2, 2), -0.5)
    action, logp = sample(mean, log_std)
    assert bool((action.abs() < 1).all())
    np.testing.assert_allclose(logp.detach(), log_prob(action.detach(), mean.detach(), log_std), rtol=1e-4)
    action.sum().backward()
    assert mean.grad is not None
    assert bool((mean.grad > 0).all())


def test_gaussian_actor_clamps_its_log_std_and_exports_the_mean_alone() -> None:
    actor = GaussianActor(3, 2, (8,), state_dependent_std=True)
    head = actor.net[-1]
    assert isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        head.bias[2:] = torch.tensor([-50.0, 50.0])
        head.weight[2:] = 0.0
    obs = torch.randn(4, 3)
    mean, log_std = actor(obs)
    assert torch.equal(log_std, torch.tensor([[LOG_STD_MIN, LOG_STD_MAX]] * 4))
    assert torch.equal(actor.mean_net()(obs), mean)
    shared = GaussianActor(3, 2, (8,), state_dependent_std=False)
    assert shared.log_std is not None
    assert shared(obs)[1].shape == (4, 2)


def test_uniform_log_density() -> None:
    assert uniform_log_density(3) == pytest.approx(math.log(0.125))


def test_twin_td_loss() -> None:
    # critic 1: errors 0 and 1 -> 0.5; critic 2: errors 1 and 1 -> 1.
    assert twin_td_loss(t(1.0, 2.0), t(0.0, 0.0), t(1.0, 1.0)).item() == pytest.approx(1.5)


def test_deterministic_bc_loss_is_the_squared_error_of_the_squashed_mean() -> None:
    mean = t(0.0, math.atanh(0.5))[None]
    assert deterministic_bc_loss(mean, t(0.5, 0.5)[None]).item() == pytest.approx(0.125)


def test_gaussian_bc_loss_is_the_negative_log_likelihood() -> None:
    action = t(math.tanh(1.0), math.tanh(-0.2))
    mean = torch.zeros(2, 1)
    log_std = torch.full((2, 1), math.log(0.5))
    expected = (
        -(squashed_log_density(math.tanh(1.0), 0, 0.5) + squashed_log_density(math.tanh(-0.2), 0, 0.5)) / 2
    )
    assert gaussian_bc_loss(mean, log_std, action[:, None]).item() == pytest.approx(expected, rel=1e-5)


def test_smoothed_target_action_clips_the_noise_then_the_action() -> None:
    got = smoothed_target_action(t(0.9, -0.2, 0.0), t(0.3, -0.8, 0.1), noise_clip=0.5)
    np.testing.assert_allclose(got, [1.0, -0.7, 0.1], rtol=1e-6)


def test_td3bc_actor_loss_normalises_q_without_differentiating_the_scale() -> None:
    q = t(-2.0, 4.0).requires_grad_(True)
    loss = td3bc_actor_loss(q, t(0.5, 0.0)[:, None], torch.zeros(2, 1), alpha=2.5)
    # lambda = 2.5 / mean|q| = 2.5 / 3; -lambda * mean q = -2.5 / 3; mse = 0.25 / 2.
    assert loss.item() == pytest.approx(-2.5 / 3 + 0.125, rel=1e-6)
    loss.backward()
    assert q.grad is not None
    np.testing.assert_allclose(q.grad, [-2.5 / 3 / 2] * 2, rtol=1e-6)


def test_awr_actor_loss() -> None:
    assert awr_actor_loss(t(-1.0, -2.0), t(2.0, 0.5)).item() == pytest.approx(1.5)


def test_conservative_penalty_with_importance_correction() -> None:
    # Row 1: logsumexp(0, log 3) = log 4, minus Q(s, a_data) = 1.
    # Row 2: both samples have density 1/2: logsumexp(1 + log 2, 1 + log 2) = 1 + log 4, minus 1.
    q_sampled = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    log_density = torch.tensor([[0.0, 0.0], [math.log(0.5), math.log(0.5)]])
    got = conservative_penalty(q_sampled, log_density, t(1.0, 1.0))
    assert got.item() == pytest.approx(((math.log(4) - 1) + math.log(4)) / 2, rel=1e-6)


def test_sac_actor_loss_holds_the_temperature_constant() -> None:
    temperature = torch.tensor(0.5, requires_grad=True)
    loss = sac_actor_loss(t(1.0, 2.0), t(-1.0, 0.0), temperature)
    assert loss.item() == pytest.approx(((0.5 * -1 - 1) + (0 - 2)) / 2)
    assert not loss.requires_grad


def test_temperature_falls_while_the_entropy_is_above_its_target() -> None:
    log_temperature = torch.tensor(math.log(2.0), requires_grad=True)
    # Entropy estimate -mean log pi = 2 against a target of 1.
    loss = temperature_loss(log_temperature, t(-1.0, -3.0), target_entropy=-1.0)
    assert loss.item() == pytest.approx(3 * math.log(2.0), rel=1e-6)
    loss.backward()
    assert log_temperature.grad is not None
    assert log_temperature.grad.item() == pytest.approx(3.0)


def test_lagrange_multiplier_rises_while_the_penalty_is_above_the_gap() -> None:
    log_multiplier = torch.tensor(0.0, requires_grad=True)
    loss = lagrange_loss(log_multiplier, torch.tensor(12.0), target_action_gap=10.0)
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    assert log_multiplier.grad is not None
    assert log_multiplier.grad.item() == pytest.approx(-2.0)


def test_box_actions_are_scaled_to_the_unit_box() -> None:
    meta = DatasetMeta(
        env_id="Scale-v0",
        observation_space={"type": "Box", "shape": [1], "low": [-1.0], "high": [1.0]},
        action_space={"type": "Box", "shape": [2], "low": [-2.0, 0.0], "high": [2.0, 1.0]},
        behavior_policy="test",
        source="test",
    )
    action = np.array([[2.0, 0.25], [-2.0, 1.0000001], [0.0, 0.5]], dtype=np.float32)
    n = len(action)
    data = Transitions(
        episode_id=np.arange(n),
        step=np.zeros(n, dtype=np.int64),
        observation=np.zeros((n, 1), dtype=np.float32),
        action=action,
        reward=np.zeros(n, dtype=np.float32),
        next_observation=np.zeros((n, 1), dtype=np.float32),
        terminated=np.ones(n, dtype=bool),
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, np.nan, dtype=np.float32),
        meta=meta,
    )
    np.testing.assert_allclose(scale_actions(data), [[1.0, -0.5], [-1.0, 1.0], [0.0, 0.0]], atol=1e-7)
