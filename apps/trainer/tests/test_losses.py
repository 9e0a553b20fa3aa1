"""Loss functions on tiny tensors; every expected value is worked out by hand in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from rlops_trainer.algos.bc import bc_loss
from rlops_trainer.algos.cql import cql_penalty, double_dqn_target, td_loss
from rlops_trainer.algos.iql import awr_weights, expectile_loss, value_target, weighted_bc_loss
from rlops_trainer.datasets import DatasetMeta, Transitions
from rlops_trainer.training import TensorData


def t(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_bc_cross_entropy() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4].
    # action 1: -ln(3/4) = ln 4 - ln 3 = 1.3862944 - 1.0986123 = 0.2876821
    # action 0: -ln(1/4) = ln 4 = 1.3862944
    # mean = (0.2876821 + 1.3862944) / 2 = 0.8369882
    logits = t([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    loss = bc_loss(logits, torch.tensor([1, 0]))
    assert loss.item() == pytest.approx(0.8369882, abs=1e-6)


def test_cql_penalty() -> None:
    # Q = [[1, 2], [0, 0]], data actions [0, 1].
    # row 0: logsumexp(1, 2) = 2 + ln(1 + e^-1) = 2 + ln(1.3678794) = 2 + 0.3132617 = 2.3132617
    #        minus Q(s, a=0) = 1 -> 1.3132617
    # row 1: logsumexp(0, 0) = ln 2 = 0.6931472, minus Q(s, a=1) = 0 -> 0.6931472
    # mean = (1.3132617 + 0.6931472) / 2 = 1.0032044
    q = t([[1.0, 2.0], [0.0, 0.0]])
    q_data = q.gather(1, torch.tensor([[0], [1]])).squeeze(1)
    assert q_data.tolist() == [1.0, 0.0]
    assert cql_penalty(q, q_data).item() == pytest.approx(1.0032044, abs=1e-6)


def test_cql_penalty_is_zero_when_one_data_action_dominates() -> None:
    # logsumexp(50, 0) = 50 + ln(1 + e^-50) = 50 (to float precision); minus Q(s, 0) = 50 -> 0.
    assert cql_penalty(t([[50.0, 0.0]]), t([50.0])).item() == pytest.approx(0.0, abs=1e-6)


def test_double_dqn_target_uses_online_argmax_and_target_value() -> None:
    # gamma = 0.9.
    # row 0: online Q(s') = [1, 3] -> argmax 1; target Q(s') = [10, 2] -> value 2 (not the target's max 10).
    #        y = 1 + 0.9 * 2 = 2.8
    # row 1: online [5, 4] -> argmax 0; target [7, 9] -> 7; y = 0 + 0.9 * 7 = 6.3
    # row 2: terminated: y = r = -1, whatever the next values.
    y = double_dqn_target(
        reward=t([1.0, 0.0, -1.0]),
        terminated=t([0.0, 0.0, 1.0]),
        next_q_online=t([[1.0, 3.0], [5.0, 4.0], [8.0, 0.0]]),
        next_q_target=t([[10.0, 2.0], [7.0, 9.0], [6.0, 6.0]]),
        gamma=0.9,
    )
    assert y.tolist() == pytest.approx([2.8, 6.3, -1.0], abs=1e-6)


def test_td_loss_huber_and_squared() -> None:
    # errors q - y = [0.5, 3.0]
    # Huber (delta 1): 0.5 * 0.5^2 = 0.125; |3| - 0.5 = 2.5; mean 1.3125
    # squared: 0.25 and 9; mean 4.625
    q, y = t([1.5, 4.0]), t([1.0, 1.0])
    assert td_loss(q, y, huber=True).item() == pytest.approx(1.3125)
    assert td_loss(q, y, huber=False).item() == pytest.approx(4.625)


def test_expectile_loss_weights_positive_residuals_by_tau() -> None:
    # expectile 0.7, residuals u = Q - V = [2, -1]
    # u = 2 > 0: weight 0.7 -> 0.7 * 4 = 2.8
    # u = -1 < 0: weight 1 - 0.7 = 0.3 -> 0.3 * 1 = 0.3
    # mean = (2.8 + 0.3) / 2 = 1.55
    assert expectile_loss(t([2.0, -1.0]), 0.7).item() == pytest.approx(1.55, abs=1e-6)
    # expectile 0.5 is half the squared error: (0.5 * 4 + 0.5 * 1) / 2 = 1.25
    assert expectile_loss(t([2.0, -1.0]), 0.5).item() == pytest.approx(1.25, abs=1e-6)


def test_awr_weights_are_clipped() -> None:
    # beta = 0.5, advantages [-2, 0, 2, 20]:
    # exp(-1) = 0.3678794, exp(0) = 1, exp(1) = 2.7182818, exp(10) = 22026.47 -> clipped to 100
    w = awr_weights(t([-2.0, 0.0, 2.0, 20.0]), beta=0.5, max_weight=100.0)
    assert w.tolist() == pytest.approx([0.3678794, 1.0, 2.7182818, 100.0], rel=1e-6)


def test_weighted_bc_loss() -> None:
    # logits [0, ln 3]: -log p(1) = 0.2876821, -log p(0) = 1.3862944
    # weights [2, 0.5]: (2 * 0.2876821 + 0.5 * 1.3862944) / 2 = (0.5753642 + 0.6931472) / 2 = 0.6342557
    logits = t([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    loss = weighted_bc_loss(logits, torch.tensor([1, 0]), t([2.0, 0.5]))
    assert loss.item() == pytest.approx(0.6342557, abs=1e-6)


def _two_episode_data() -> Transitions:
    # Episode 0 ends by termination (pole fell), episode 1 by truncation (time limit).
    obs = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
    return Transitions(
        episode_id=np.array([0, 0, 1, 1]),
        step=np.array([0, 1, 0, 1]),
        observation=obs,
        action=np.array([0, 1, 1, 0]),
        reward=np.array([1.0, 1.0, 1.0, 1.0], dtype=np.float32),
        next_observation=obs + 1,
        terminated=np.array([False, True, False, False]),
        truncated=np.array([False, False, False, True]),
        behavior_logp=np.full(4, math.log(0.5), dtype=np.float32),
        meta=DatasetMeta(
            env_id="Test-v0",
            observation_space={"type": "Box", "shape": [1]},
            action_space={"type": "Discrete", "n": 2},
            behavior_policy="uniform",
            source="test",
        ),
    )


def test_termination_stops_bootstrapping_but_truncation_does_not() -> None:
    data = _two_episode_data()
    batch = TensorData(data, np.zeros(1, np.float32), np.ones(1, np.float32), torch.device("cpu")).batch(
        torch.arange(4)
    )
    assert batch.terminated.tolist() == [0.0, 1.0, 0.0, 0.0]
    # Next-state values all 10, gamma 0.5: bootstrapped rows get 1 + 0.5 * 10 = 6, the terminated row 1.
    # The truncated last row (index 3) still bootstraps: the episode was cut, the task was not over.
    next_q = torch.full((4, 2), 10.0)
    y = double_dqn_target(batch.reward, batch.terminated, next_q, next_q, gamma=0.5)
    assert y.tolist() == [6.0, 1.0, 6.0, 6.0]
    v = value_target(batch.reward, batch.terminated, torch.full((4,), 10.0), gamma=0.5)
    assert v.tolist() == [6.0, 1.0, 6.0, 6.0]


def test_tensor_data_normalises_with_the_policy_rule() -> None:
    data = _two_episode_data()
    # mean 1.5, std 2: (0 - 1.5) / 2 = -0.75 ... (3 - 1.5) / 2 = 0.75; next obs are shifted by +1 / 2 = 0.5.
    tensors = TensorData(data, np.array([1.5], np.float32), np.array([2.0], np.float32), torch.device("cpu"))
    batch = tensors.batch(torch.arange(4))
    assert batch.obs[:, 0].tolist() == [-0.75, -0.25, 0.25, 0.75]
    assert batch.next_obs[:, 0].tolist() == [-0.25, 0.25, 0.75, 1.25]
    assert batch.action.tolist() == [0, 1, 1, 0]
    assert batch.action.dtype == torch.int64
