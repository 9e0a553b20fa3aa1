"""Behaviour cloning on Box actions: imitate the logged actions, deterministically or as a Gaussian.

The baseline every offline RL method must beat. Deterministic (the default, as in TD3+BC's baseline): the
squared error between ``tanh(u(s))`` and the data action. Gaussian (``gaussian=true``): the negative
log-likelihood of the data action under a tanh-squashed Gaussian whose log std is a second head of the
network. Either way the served action is ``tanh(u(s))`` in the dataset's bounds: the mean behaviour, which
drops the behaviour's noise.
"""

from __future__ import annotations

import torch
from torch import nn

from rlops_trainer.algos.continuous import GaussianActor, action_mse, log_prob
from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import ContinuousBCConfig
from rlops_trainer.training import Batch, Learner, RunOptions, TrainResult, adam, fit

# ----------------------------------------------------------------------------------------------------
# Losses


def deterministic_bc_loss(mean: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Mean over rows and dimensions of (tanh(u) - a_data)^2, actions in [-1, 1]."""
    return action_mse(torch.tanh(mean), action)


def gaussian_bc_loss(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log pi(a_data | s) under tanh(N(mean, exp(log_std)^2))."""
    return -log_prob(action, mean, log_std).mean()


# ----------------------------------------------------------------------------------------------------
# Network and one update


class ContinuousBCLearner(Learner):
    score_kind = "action"

    def __init__(self, cfg: ContinuousBCConfig, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        # One network shape for both modes; the deterministic loss leaves the log std head at zero gradient.
        self.actor = GaussianActor(obs_dim, action_dim, cfg.hidden, state_dependent_std=True)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean, log_std = self.actor(batch.obs)
        if self.cfg.gaussian:
            loss = gaussian_bc_loss(mean, log_std, batch.action)
        else:
            loss = deterministic_bc_loss(mean, batch.action)
        with torch.no_grad():
            mse = action_mse(torch.tanh(mean), batch.action)
        return loss, {"bc_loss": loss.detach(), "mse": mse}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return adam(self.trainable(), self.cfg.lr)

    def policy_net(self) -> nn.Module:
        return self.actor.mean_net()


def train(cfg: ContinuousBCConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("bc", cfg, data, run, ContinuousBCLearner)
