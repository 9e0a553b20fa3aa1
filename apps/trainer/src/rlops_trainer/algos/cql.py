"""Discrete conservative Q-learning (CQL, Kumar et al. 2020) on a double-DQN base.

The critic is trained on the temporal-difference target of double DQN (the online network picks the
next action, the target network values it) plus the conservative penalty

    alpha * (logsumexp_a Q(s, a) - Q(s, a_data))

which pushes down the Q-values of actions the data do not support. The served policy is greedy in Q
with a small epsilon.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import CQLConfig
from rlops_trainer.policy import mlp
from rlops_trainer.training import (
    Batch,
    Learner,
    RunOptions,
    TargetSync,
    TrainResult,
    adam,
    fit,
)

# ----------------------------------------------------------------------------------------------------
# Losses


def double_dqn_target(
    reward: torch.Tensor,
    terminated: torch.Tensor,
    next_q_online: torch.Tensor,
    next_q_target: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """r + gamma * (1 - terminated) * Q_target(s', argmax_a Q_online(s', a)).

    Only termination stops bootstrapping: a truncated episode still has a future.
    """
    best = next_q_online.argmax(dim=1, keepdim=True)
    return reward + gamma * (1.0 - terminated) * next_q_target.gather(1, best).squeeze(1)


def td_loss(q_data: torch.Tensor, target: torch.Tensor, huber: bool) -> torch.Tensor:
    if huber:
        return F.smooth_l1_loss(q_data, target)
    return F.mse_loss(q_data, target)


def cql_penalty(q: torch.Tensor, q_data: torch.Tensor) -> torch.Tensor:
    """Batch mean of logsumexp_a Q(s, a) - Q(s, a_data), with ``q_data`` = Q at the data actions."""
    return (torch.logsumexp(q, dim=1) - q_data).mean()


# ----------------------------------------------------------------------------------------------------
# Networks and one update


class CQLLearner(Learner):
    score_kind = "q_values"

    def __init__(self, cfg: CQLConfig, obs_dim: int, n_actions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.q = mlp(obs_dim, n_actions, cfg.hidden)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.target_sync = TargetSync(self.q_target, self.q)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = self.q(batch.obs)
        q_data = q.gather(1, batch.action[:, None]).squeeze(1)
        with torch.no_grad():
            target = double_dqn_target(
                batch.reward,
                batch.terminated,
                self.q(batch.next_obs),
                self.q_target(batch.next_obs),
                self.cfg.gamma,
            )
        td = td_loss(q_data, target, self.cfg.huber)
        penalty = cql_penalty(q, q_data)
        loss = td + self.cfg.alpha * penalty
        with torch.no_grad():
            q_mean = q_data.mean()
            metrics = {
                "td_loss": td.detach(),
                "cql_penalty": penalty.detach(),
                "q_mean": q_mean,
                "q_data_minus_pi": q_mean - q.max(dim=1).values.mean(),
            }
        return loss, metrics

    def make_optimizer(self) -> torch.optim.Optimizer:
        return adam(self.trainable(), self.cfg.lr)

    def after_step(self, step: int) -> None:
        if step % self.cfg.target_update_every == 0:
            self.target_sync.update(self.cfg.tau)

    def policy_net(self) -> nn.Module:
        return self.q


def train(cfg: CQLConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("cql", cfg, data, run, CQLLearner)
