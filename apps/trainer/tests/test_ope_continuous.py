"""Off-policy evaluation of Box (continuous-action) policies on a two-step problem with a known value,
importance weights against hand-computed densities, and rollouts of a Box policy in Pendulum-v1."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from continuous_testkit import box_meta, linear_policy
from rlops_trainer.datasets import Transitions
from rlops_trainer.ope import (
    ESTIMATORS,
    FQEConfig,
    OPEError,
    estimate_is_logp,
    evaluate,
    policy_target,
    possible_estimators,
)
from rlops_trainer.policy import Selection

GAMMA = 0.9
LOW, HIGH = np.array([-1.0]), np.array([1.0])
W = 1.5  # target pre-squash mean u = W * x


def two_step_data(n_episodes: int = 1000, seed: int = 0) -> Transitions:
    """Observation ``(x, t)``: x0 ~ U(-1, 1), x1 = x0 / 2 whatever the action; reward ``a * x``; the
    episode ends after step 1. Behaviour: actions uniform on [-1, 1] (log-density -log 2)."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1.0, 1.0, n_episodes)
    x = np.stack([x0, x0 / 2], axis=1).reshape(-1)
    t = np.tile([0.0, 1.0], n_episodes)
    obs = np.stack([x, t], axis=1).astype(np.float32)
    nxt = np.stack([x / 2, np.ones_like(x)], axis=1).astype(np.float32)  # step 1's successor is never used
    action = rng.uniform(-1.0, 1.0, (2 * n_episodes, 1)).astype(np.float32)
    n = 2 * n_episodes
    return Transitions(
        episode_id=np.repeat(np.arange(n_episodes), 2).astype(np.int64),
        step=np.tile([0, 1], n_episodes).astype(np.int64),
        observation=obs,
        action=action,
        reward=(action[:, 0] * obs[:, 0]).astype(np.float32),
        next_observation=nxt,
        terminated=np.tile([False, True], n_episodes),
        truncated=np.zeros(n, dtype=bool),
        behavior_logp=np.full(n, -np.log(2.0), dtype=np.float32),
        meta=box_meta(obs_dim=2, low=LOW, high=HIGH),
    )


def true_value(data: Transitions, std: float) -> float:
    """``mean_i [f(x0_i) + gamma f(x0_i / 2)]`` with ``f(x) = x E[tanh(W x + std eps)]``, eps ~ N(0, 1) by
    Gauss-Hermite quadrature: the exact value on the dataset's own initial states."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    weights = weights / weights.sum()

    def f(x: np.ndarray) -> np.ndarray:
        return x * (np.tanh(W * x[:, None] + std * nodes[None]) @ weights)

    x0 = data.observation[data.step == 0, 0].astype(np.float64)
    return float((f(x0) + GAMMA * f(x0 / 2)).mean())


def target(std: float) -> Any:
    return policy_target(linear_policy(np.array([[W, 0.0]]), np.zeros(1), LOW, HIGH), Selection(std=std))


FAST = FQEConfig(hidden=(64, 64), steps=2500, target_update=10, ensemble=2, batch_size=256)


@pytest.fixture(scope="module")
def data() -> Transitions:
    return two_step_data()


@pytest.mark.parametrize("std", [0.0, 0.5])
def test_fqe_finds_the_closed_form_value(data: Transitions, std: float) -> None:
    est = evaluate(data, target(std), gamma=GAMMA, estimators=("fqe",), fqe_config=FAST, n_bootstrap=200)[
        "fqe"
    ]
    truth = true_value(data, std)
    assert est.value == pytest.approx(truth, abs=0.015)
    assert est.lower <= est.value <= est.upper
    assert est.interval == "initial states and 2 Q models"


def test_doubly_robust_and_importance_sampling_find_the_value(data: Transitions) -> None:
    est = evaluate(data, target(0.5), gamma=GAMMA, fqe_config=FAST, n_bootstrap=200)
    truth = true_value(data, 0.5)
    assert set(est) == set(ESTIMATORS)
    for name in ("dr", "wdr"):
        assert est[name].value == pytest.approx(truth, abs=0.015), name
    for name in ("pdis", "wpdis"):  # unbiased but noisier: the interval must hold the truth
        assert est[name].lower - 0.02 <= truth <= est[name].upper + 0.02, name
        ess = est[name].ess
        assert ess is not None
        assert ess < len(data.episode_starts())


def squashed_density(a: float, u: float, std: float) -> float:
    """The density of ``tanh(z)``, ``z ~ N(u, std^2)``, at ``a`` in (-1, 1): N(atanh a) / (1 - a^2)."""
    z = np.arctanh(a)
    return float(np.exp(-0.5 * ((z - u) / std) ** 2) / (std * np.sqrt(2 * np.pi)) / (1 - a**2))


def test_importance_weights_are_the_hand_computed_density_ratio() -> None:
    """One episode of two steps, behaviour densities 0.5 and 0.8, rewards 1 and 2, gamma 0.5: PDIS is
    rho0 * 1 + 0.5 * rho0 * rho1 * 2 with rho_t = pi(a_t|s_t) / mu(a_t|s_t)."""
    data = two_step_data(n_episodes=1)
    data.action[:] = [[0.3], [-0.6]]
    data.reward[:] = [1.0, 2.0]
    data.behavior_logp[:] = np.log([0.5, 0.8])
    std = 0.7
    x = data.observation[:, 0].astype(np.float64)
    rho = [
        squashed_density(a, W * xi, std) / mu for a, xi, mu in zip([0.3, -0.6], x, [0.5, 0.8], strict=True)
    ]
    tgt = target(std)
    assert tgt.log_prob is not None
    np.testing.assert_allclose(
        np.exp(tgt.log_prob(data.observation, data.action)),
        [r * m for r, m in zip(rho, [0.5, 0.8], strict=True)],
        rtol=1e-4,
    )
    pdis = evaluate(data, tgt, gamma=0.5, estimators=("pdis",), n_bootstrap=10)["pdis"]
    assert pdis.value == pytest.approx(rho[0] * 1.0 + 0.5 * rho[0] * rho[1] * 2.0, rel=1e-4)


def test_doubly_robust_combines_weights_and_model_values_by_hand() -> None:
    """DR with given Q(s_t, a_t) and V(s_t): sum_t g^t [w_t (r_t - Q_t) + w_{t-1} V_t]."""
    data = two_step_data(n_episodes=1)
    data.reward[:] = [1.0, 2.0]
    data.behavior_logp[:] = np.log([0.5, 0.5])
    logp = np.log([1.0, 0.25])  # rho = (2, 0.5): cumulative (2, 1)
    q, v = np.array([0.5, 1.0]), np.array([0.8, 1.5])
    dr = estimate_is_logp("dr", data, logp, q_taken=q, v=v, gamma=0.5, n_bootstrap=10)
    assert dr.value == pytest.approx(2 * (1 - 0.5) + 0.8 + 0.5 * (1 * (2 - 1.0) + 2 * 1.5))


def test_a_deterministic_target_has_no_importance_weights(data: Transitions) -> None:
    with pytest.raises(
        OPEError, match=r"dr, pdis: the target policy is deterministic .* no density.*use fqe"
    ):
        evaluate(data, target(0.0), estimators=("pdis", "fqe", "dr"), gamma=GAMMA)
    assert possible_estimators(data, stochastic=False) == ("fqe",)
    assert possible_estimators(data, stochastic=True) == ESTIMATORS
    unknown = two_step_data(n_episodes=3)
    unknown.behavior_logp[:] = np.nan
    assert possible_estimators(unknown, stochastic=True) == ("fqe",)


def test_a_box_dataset_needs_a_continuous_target(data: Transitions) -> None:
    with pytest.raises(OPEError, match="Box action space: the target policy must be a ContinuousTarget"):
        evaluate(data, lambda o: np.full((len(o), 2), 0.5), estimators=("fqe",))


def test_target_draws_are_seeded_and_inside_the_bounds(data: Transitions) -> None:
    tgt = target(2.0)
    a, b, c = (tgt.sample(data.observation, s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert ((a >= -1) & (a <= 1)).all()


def pendulum_policy() -> Any:
    """A tiny hand-made controller for Pendulum-v1 (observation cos, sin, angular velocity; torque in
    [-2, 2]): push against the angle and the velocity."""
    return linear_policy(np.array([[0.0, -2.0, -0.5]]), np.zeros(1), np.array([-2.0]), np.array([2.0]))


@pytest.mark.parametrize("std", [0.0, 0.4])
def test_box_rollouts_run_and_are_seeded(std: float) -> None:
    from rlops_trainer.rollout import rollout

    kw: dict[str, Any] = {"env_id": "Pendulum-v1", "episodes": 3, "gamma": 0.99}
    policy = pendulum_policy()
    a = rollout(policy, Selection(std=std), seed=5, batch_size=3, **kw)
    b = rollout(policy, Selection(std=std), seed=5, batch_size=2, **kw)  # the batch size does not matter
    c = rollout(policy, Selection(std=std), seed=6, batch_size=3, **kw)
    np.testing.assert_array_equal(a.lengths, [200, 200, 200])
    np.testing.assert_allclose(a.returns, b.returns, rtol=1e-6)
    assert not np.allclose(a.returns, c.returns)
    assert (a.returns < 0).all()  # Pendulum's reward is a cost: every step is <= 0
    assert a.selection == {"temperature": 0.0, "epsilon": 0.0, "std": std}
    assert a.to_dict()["discounted_return"]["value"] == pytest.approx(a.discounted_returns.mean())


def test_exploration_noise_changes_a_box_rollout() -> None:
    from rlops_trainer.rollout import RolloutError, rollout

    policy = pendulum_policy()
    plain = rollout(policy, Selection(), "Pendulum-v1", 2, seed=1)
    noisy = rollout(policy, Selection(std=1.0), "Pendulum-v1", 2, seed=1)
    assert not np.allclose(plain.returns, noisy.returns)
    with pytest.raises(RolloutError, match=r"Box action space .* must be a continuous policy module"):
        rollout(lambda o: np.full((len(o), 2), 0.5), Selection(), "Pendulum-v1", 1)
