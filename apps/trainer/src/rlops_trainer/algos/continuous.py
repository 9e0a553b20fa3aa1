"""What the Box-action learners share: their networks, the tanh-squashed Gaussian, the twin TD loss.

The learners see actions scaled to [-1, 1] per dimension (:func:`rlops_trainer.training.scale_actions`),
so the squashing here is ``a = tanh(z)`` (mid 0, half-width 1, log half-width 0); the exported
:class:`rlops_trainer.policy.ContinuousPolicyModule` adds the dataset's bounds. Log-densities come from
the policy module's :func:`~rlops_trainer.policy.squashed_gaussian_log_prob`, so training and serving
compute them with one piece of code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rlops_trainer.policy import mlp, squashed_gaussian_log_prob, unsquash

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
"""Range of a learned log std: below e^-5 the log-likelihood of a data action explodes, above e^2 the
squashed Gaussian is already flat on [-1, 1]."""


# ----------------------------------------------------------------------------------------------------
# The squashed Gaussian on [-1, 1]


def log_prob(action: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Log-density of ``action`` (in [-1, 1]^k, shape ``[..., k]``) under ``tanh(N(mean, exp(log_std)^2))``,
    summed over the action dimensions. Actions on a bound are read just inside it (``unsquash``)."""
    z = unsquash(action, action.new_zeros(()), action.new_ones(()))
    return squashed_gaussian_log_prob(z, mean, log_std, action.new_zeros(()))


def sample(mean: torch.Tensor, log_std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tanh(z), log-density)`` with ``z = mean + exp(log_std) * N(0, I)``; differentiable in ``mean``
    and ``log_std`` (the reparameterisation SAC's actor loss needs)."""
    z = mean + torch.exp(log_std) * torch.randn_like(mean)
    return torch.tanh(z), squashed_gaussian_log_prob(z, mean, log_std, mean.new_zeros(()))


def uniform_log_density(action_dim: int) -> float:
    """Log-density of the uniform distribution on [-1, 1]^k: log(0.5^k)."""
    return action_dim * math.log(0.5)


# ----------------------------------------------------------------------------------------------------
# Losses


def twin_td_loss(q1: torch.Tensor, q2: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared TD errors of both critics against one target, summed: mse(q1, y) + mse(q2, y)."""
    return F.mse_loss(q1, target) + F.mse_loss(q2, target)


def action_mse(policy_action: torch.Tensor, data_action: torch.Tensor) -> torch.Tensor:
    """Mean over rows and dimensions of (policy action - data action)^2."""
    return F.mse_loss(policy_action, data_action)


# ----------------------------------------------------------------------------------------------------
# Networks


class PreSquashMean(nn.Module):
    """The first ``action_dim`` outputs of the actor's network: the pre-squash mean ``u(s)``, which is the
    network the exported policy runs (the log std head stays behind)."""

    def __init__(self, net: nn.Module, action_dim: int) -> None:
        super().__init__()
        self.net = net
        self.action_dim = action_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)[..., : self.action_dim]


class GaussianActor(nn.Module):
    """A tanh-squashed Gaussian policy: ``u(s)`` and a log std, either a second head of the same network
    (state-dependent, as in SAC) or one learned vector (state-independent, as in IQL); clamped to
    [:data:`LOG_STD_MIN`, :data:`LOG_STD_MAX`]."""

    def __init__(
        self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], state_dependent_std: bool
    ) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.net = mlp(obs_dim, 2 * action_dim if state_dependent_std else action_dim, hidden)
        self.log_std: nn.Parameter | None = (
            None if state_dependent_std else nn.Parameter(torch.zeros(action_dim))
        )

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, log_std)`` of the pre-squash Gaussian, each ``[..., action_dim]``."""
        out = self.net(obs)
        mean = out[..., : self.action_dim]
        log_std = out[..., self.action_dim :] if self.log_std is None else self.log_std.expand_as(mean)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def mean_net(self) -> nn.Module:
        """The network of the exported policy: ``u(s)`` alone."""
        return PreSquashMean(self.net, self.action_dim)


class TwinCritic(nn.Module):
    """Two independent state-action critics ``Q_i(s, a) = mlp([s, a])``; ``forward`` returns both."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, 1, hidden)
        self.q2 = mlp(obs_dim + action_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def first(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q_1 alone (TD3's actor follows the first critic)."""
        return self.q1(torch.cat([obs, action], dim=-1)).squeeze(-1)
