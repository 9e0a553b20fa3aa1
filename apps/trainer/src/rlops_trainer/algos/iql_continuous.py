"""Implicit Q-learning on Box actions (IQL, Kostrikov et al. 2021).

The same three regressions as the discrete IQL (``algos/iql.py``, whose loss functions this module uses),
with state-action critics and a Gaussian actor:

* V(s) is an upper expectile of ``min_i Q_i_target(s, a_data)``;
* the twin critics Q_i(s, a_data) regress on ``r + gamma * (1 - terminated) * V(s')``;
* the actor maximises the log-likelihood of the data action under a tanh-squashed Gaussian (one learned
  log std vector, as in the paper), weighted by ``min(exp(beta * (Q_target - V)), max_weight)``.

Q is never queried at actions outside the data. The three losses reach disjoint networks, so they are
summed and stepped together. Served: the Gaussian's mean ``tanh(u(s))``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rlops_trainer.algos.continuous import GaussianActor, TwinCritic, action_mse, log_prob, twin_td_loss
from rlops_trainer.algos.iql import awr_weights, expectile_loss, value_target
from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import ContinuousIQLConfig
from rlops_trainer.policy import mlp
from rlops_trainer.training import Batch, Learner, RunOptions, TargetSync, TrainResult, adam, fit

# ----------------------------------------------------------------------------------------------------
# Loss (the value and critic losses are algos.iql's)


def awr_actor_loss(log_likelihood: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean of weight * -log pi(a_data | s): advantage-weighted regression of the policy."""
    return -(weights * log_likelihood).mean()


# ----------------------------------------------------------------------------------------------------
# Networks and one update


class ContinuousIQLLearner(Learner):
    score_kind = "action"

    def __init__(self, cfg: ContinuousIQLConfig, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.critic = TwinCritic(obs_dim, action_dim, cfg.hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_sync = TargetSync(self.critic_target, self.critic)
        self.v = mlp(obs_dim, 1, cfg.hidden)
        self.actor = GaussianActor(obs_dim, action_dim, cfg.hidden, state_dependent_std=False)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            q_target = torch.minimum(*self.critic_target(batch.obs, batch.action))
            target = value_target(
                batch.reward, batch.terminated, self.v(batch.next_obs).squeeze(1), self.cfg.gamma
            )

        v = self.v(batch.obs).squeeze(1)
        value_loss = expectile_loss(q_target - v, self.cfg.expectile)

        q1, q2 = self.critic(batch.obs, batch.action)
        td = twin_td_loss(q1, q2, target)

        weights = awr_weights(q_target - v.detach(), self.cfg.beta, self.cfg.max_weight)
        mean, log_std = self.actor(batch.obs)
        actor_loss = awr_actor_loss(log_prob(batch.action, mean, log_std), weights)

        loss = value_loss + td + actor_loss
        with torch.no_grad():
            metrics = {
                "td_loss": td.detach(),
                "value_loss": value_loss.detach(),
                "actor_loss": actor_loss.detach(),
                "q_mean": q1.detach().mean(),
                "v_mean": v.detach().mean(),
                "awr_weight_mean": weights.mean(),
                "mse": action_mse(torch.tanh(mean), batch.action),
            }
        return loss, metrics

    def make_optimizer(self) -> torch.optim.Optimizer:
        # One Adam over disjoint networks equals one Adam per network: each loss reaches only its own.
        return adam(self.trainable(), self.cfg.lr)

    def after_step(self, step: int) -> None:
        self.target_sync.update(self.cfg.tau)

    def policy_net(self) -> nn.Module:
        return self.actor.mean_net()


def train(cfg: ContinuousIQLConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("iql", cfg, data, run, ContinuousIQLLearner)
