"""Discrete implicit Q-learning (IQL, Kostrikov et al. 2021).

IQL never queries Q at actions outside the data:

* V(s) is an upper expectile of the target Q(s, a_data): ``|tau - 1(u < 0)| * u^2`` with
  ``u = Q_target(s, a_data) - V(s)``;
* Q(s, a_data) regresses on ``r + gamma * (1 - terminated) * V(s')``;
* the policy head is behaviour cloning weighted by ``min(exp(beta * (Q_target - V)), max_weight)``.

The critics are twin Q-networks (the target is their minimum) with Polyak-averaged targets. Served
greedy in the policy logits.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import IQLConfig
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


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """mean of |expectile - 1(diff < 0)| * diff^2, with diff = target Q - V."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return (weight * diff.square()).mean()


def value_target(
    reward: torch.Tensor, terminated: torch.Tensor, next_v: torch.Tensor, gamma: float
) -> torch.Tensor:
    """r + gamma * (1 - terminated) * V(s'); truncation does not stop bootstrapping."""
    return reward + gamma * (1.0 - terminated) * next_v


def awr_weights(advantage: torch.Tensor, beta: float, max_weight: float) -> torch.Tensor:
    """exp(beta * advantage), clipped above at max_weight."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


def weighted_bc_loss(logits: torch.Tensor, action: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean of weight * -log softmax(logits)[a_data]."""
    return (weights * F.cross_entropy(logits, action, reduction="none")).mean()


# ----------------------------------------------------------------------------------------------------
# Networks and one update


class IQLLearner(Learner):
    score_kind = "logits"

    def __init__(self, cfg: IQLConfig, obs_dim: int, n_actions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.q1 = mlp(obs_dim, n_actions, cfg.hidden)
        self.q2 = mlp(obs_dim, n_actions, cfg.hidden)
        self.q1_target = copy.deepcopy(self.q1).requires_grad_(False)
        self.q2_target = copy.deepcopy(self.q2).requires_grad_(False)
        self.target_sync = [TargetSync(self.q1_target, self.q1), TargetSync(self.q2_target, self.q2)]
        self.v = mlp(obs_dim, 1, cfg.hidden)
        self.pi = mlp(obs_dim, n_actions, cfg.hidden)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a = batch.action[:, None]
        with torch.no_grad():
            q_target = (
                torch.minimum(self.q1_target(batch.obs), self.q2_target(batch.obs)).gather(1, a).squeeze(1)
            )
            target = value_target(
                batch.reward, batch.terminated, self.v(batch.next_obs).squeeze(1), self.cfg.gamma
            )

        v = self.v(batch.obs).squeeze(1)
        value_loss = expectile_loss(q_target - v, self.cfg.expectile)

        q1 = self.q1(batch.obs).gather(1, a).squeeze(1)
        q2 = self.q2(batch.obs).gather(1, a).squeeze(1)
        td = F.mse_loss(q1, target) + F.mse_loss(q2, target)

        weights = awr_weights(q_target - v.detach(), self.cfg.beta, self.cfg.max_weight)
        logits = self.pi(batch.obs)
        actor_loss = weighted_bc_loss(logits, batch.action, weights)

        loss = value_loss + td + actor_loss
        with torch.no_grad():
            metrics = {
                "td_loss": td.detach(),
                "value_loss": value_loss.detach(),
                "actor_loss": actor_loss.detach(),
                "q_mean": q1.detach().mean(),
                "v_mean": v.detach().mean(),
                "awr_weight_mean": weights.mean(),
                "accuracy": (logits.argmax(dim=1) == batch.action).float().mean(),
            }
        return loss, metrics

    def make_optimizer(self) -> torch.optim.Optimizer:
        # One Adam over disjoint networks equals one Adam per network: each loss reaches only its own.
        return adam(self.trainable(), self.cfg.lr)

    def after_step(self, step: int) -> None:
        for sync in self.target_sync:
            sync.update(self.cfg.tau)

    def policy_net(self) -> nn.Module:
        return self.pi


def train(cfg: IQLConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("iql", cfg, data, run, IQLLearner)
