"""Behaviour cloning: imitate the logged actions with a cross-entropy loss on policy logits.

The baseline every offline RL method must beat. Served greedy (the most likely logged action): on data
mixed from good and random behaviour, the argmax keeps the majority behaviour of each state and drops
the random minority that sampling from the softmax would reproduce. On the mixed CartPole-v1 data of
``rlops_trainer.collect.CARTPOLE_MIXED`` the greedy policy returns 500 where sampling (temperature 1)
returns about 80, the behaviour's own level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rlops_trainer.datasets import Transitions
from rlops_trainer.policy import mlp
from rlops_trainer.training import Batch, Learner, RunOptions, TrainResult, adam, check_config, fit


@dataclass
class BCConfig:
    """Hyperparameters of behaviour cloning."""

    steps: int = 5_000
    """Gradient steps."""
    batch_size: int = 256
    """Transitions per gradient step."""
    lr: float = 3e-4
    """Adam learning rate."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy network."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    serve_temperature: float = 0.0
    """Served selection: 0 is greedy; > 0 samples from softmax(logits / temperature)."""
    serve_epsilon: float = 0.0
    """Served selection: probability mass spread uniformly over actions."""
    seed: int = 0
    """Seeds weights, minibatch sampling and every RNG."""

    def __post_init__(self) -> None:
        check_config("bc", self, positive=("lr",), widths=("hidden",))


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
