"""Behaviour cloning: imitate the logged actions with a cross-entropy loss on policy logits.

The baseline every offline RL method must beat. Served greedy (the most likely logged action): on data
mixed from good and random behaviour, the argmax keeps the majority behaviour of each state and drops
the random minority that sampling from the softmax would reproduce. On the mixed CartPole-v1 data of
``rlops_trainer.collect.CARTPOLE_MIXED`` the greedy policy returns 500 where sampling (temperature 1)
returns about 80, the behaviour's own level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import BCConfig
from rlops_trainer.policy import mlp
from rlops_trainer.training import Batch, Learner, RunOptions, TrainResult, adam, fit

# ----------------------------------------------------------------------------------------------------
# Loss


def bc_loss(logits: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy -log softmax(logits)[a_data]."""
    return F.cross_entropy(logits, action)


# ----------------------------------------------------------------------------------------------------
# Network and one update


class BCLearner(Learner):
    score_kind = "logits"

    def __init__(self, cfg: BCConfig, obs_dim: int, n_actions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.pi = mlp(obs_dim, n_actions, cfg.hidden)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.pi(batch.obs)
        loss = bc_loss(logits, batch.action)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == batch.action).float().mean()
        return loss, {"bc_loss": loss.detach(), "accuracy": accuracy}

    def make_optimizer(self) -> torch.optim.Optimizer:
        return adam(self.trainable(), self.cfg.lr)

    def policy_net(self) -> nn.Module:
        return self.pi


def train(cfg: BCConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("bc", cfg, data, run, BCLearner)
