"""The deployable policy: observation preprocessing, a network, and action selection in one module.

The same module is used eagerly (evaluation, OPE) and exported with TorchScript, so the rule that turns
the network's outputs into actions is written once and travels inside ``policy.pt``.

Discrete actions (:class:`PolicyModule`):

* ``forward(obs)`` returns one score per action: logits (``score_kind == "logits"``) or Q-values.
* ``action_probs(obs, temperature, epsilon)``: with ``temperature > 0`` a softmax of ``score /
  temperature``; with ``temperature <= 0`` the greedy action (ties to the lowest index). Then mixed
  with the uniform distribution: ``(1 - epsilon) * p + epsilon / n_actions``.

Continuous (Box) actions (:class:`ContinuousPolicyModule`, ``score_kind == "action"``):

* ``forward(obs)`` returns the deterministic action ``mid + half * tanh(u(obs))``, always inside the
  bounds (``mid``, ``half``: centre and half-width of the Box).
* ``act(obs, std)`` explores: ``z = u(obs) + std * N(0, I)`` in the unbounded space, squashed the same
  way; it returns the action and its exact log-density (change of variables through the tanh and the
  scaling). ``std <= 0`` is the deterministic action with log-density NaN (a point mass has none).
* ``log_prob(obs, action, std)`` is the log-density ``act`` gives ``action`` (for importance weights).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


def mlp(in_dim: int, out_dim: int, hidden: tuple[int, ...]) -> nn.Sequential:
    """A ReLU multilayer perceptron, the one network shape every algorithm here uses."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers += [nn.Linear(last, width), nn.ReLU()]
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Selection:
    """How the served policy picks an action from its scores (stored in the model card)."""

    temperature: float = 0.0
    """> 0: sample from softmax(score / temperature); <= 0: greedy."""
    epsilon: float = 0.0
    """Probability mass spread uniformly over all actions (exploration)."""
    std: float = 0.0
    """Continuous actions: standard deviation of the Gaussian exploration noise, added before the tanh
    squashing (in units of the unbounded pre-squash space); 0 serves the deterministic action."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")
        if not (math.isfinite(self.std) and self.std >= 0.0):
            raise ValueError(f"std must be a finite number >= 0, got {self.std}")

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "Selection":
        """The selection a model card records (``policy.selection``)."""
        sel = card["policy"]["selection"]
        return cls(
            temperature=float(sel["temperature"]),
            epsilon=float(sel["epsilon"]),
            std=float(sel.get("std", 0.0)),
        )


class PolicyModule(nn.Module):
    """Normalises observations with the training statistics, then scores every action."""

    # Real (not postponed) annotations: TorchScript reads them to type the buffers.
    obs_mean: torch.Tensor
    obs_std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        obs_mean: np.ndarray | torch.Tensor,
        obs_std: np.ndarray | torch.Tensor,
        score_kind: str,
    ) -> None:
        super().__init__()
        if score_kind not in ("logits", "q_values"):
            raise ValueError(f"score_kind must be 'logits' or 'q_values', got {score_kind!r}")
        self.net = net
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).clone())
        # A constant feature would divide by zero; 1 leaves it centred and unscaled.
        std = torch.as_tensor(obs_std, dtype=torch.float32).clone()
        self.register_buffer("obs_std", torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.score_kind = score_kind

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.obs_mean) / self.obs_std)

    @torch.jit.export
    def action_probs(self, obs: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        return self._probs(self.forward(obs), temperature, epsilon)

    @torch.jit.export
    def scores_and_probs(
        self, obs: torch.Tensor, temperature: float, epsilon: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` and ``action_probs`` from one pass of the network (what serving needs)."""
        scores = self.forward(obs)
        return scores, self._probs(scores, temperature, epsilon)

    def _probs(self, scores: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        n = scores.shape[-1]
        if temperature > 0.0:
            probs = torch.softmax(scores / temperature, dim=-1)
        else:
            # Served for every batch: a scatter into zeros is a third of one_hot's cost in TorchScript
            # (one_hot first checks its indices with two reductions). Same values, ties to the first.
            probs = torch.zeros_like(scores).scatter_(-1, scores.argmax(dim=-1, keepdim=True), 1.0)
        if epsilon == 0.0:
            return probs
        return (1.0 - epsilon) * probs + epsilon / n

    def probs_numpy(self, obs: np.ndarray, selection: Selection) -> np.ndarray:
        """Action probabilities for a batch of raw observations, as float64 numpy (for OPE)."""
        device = self.obs_mean.device
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
            p = self.action_probs(t, selection.temperature, selection.epsilon)
        return p.double().cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# Continuous actions

SQUASH_EDGE = 1.0 - 1e-6
"""Actions on (or numerically beyond) a bound are read as this fraction of the half-width: tanh reaches
±1 only at infinity, so an action exactly on the bound would have log-density -inf."""


def tanh_log_det(z: torch.Tensor, log_half: torch.Tensor) -> torch.Tensor:
    """log |d a / d z| per dimension for ``a = mid + half * tanh(z)``, stable for large |z|:
    log(half) + log(1 - tanh(z)^2) = log(half) + 2 * (log 2 - z - softplus(-2 z))."""
    return log_half + 2.0 * (0.6931471805599453 - z - torch.nn.functional.softplus(-2.0 * z))


def squashed_gaussian_log_prob(
    z: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, log_half: torch.Tensor
) -> torch.Tensor:
    """Log-density of ``a = mid + half * tanh(z)`` where ``z ~ N(mean, exp(log_std)^2)`` independently per
    dimension, summed over the last dimension. ``log_std`` broadcasts against ``mean``."""
    noise = (z - mean) * torch.exp(-log_std)
    gaussian = -0.5 * noise * noise - log_std - 0.9189385332046727  # 0.5 * log(2 pi)
    return (gaussian - tanh_log_det(z, log_half)).sum(dim=-1)


def unsquash(
    action: torch.Tensor, mid: torch.Tensor, half: torch.Tensor, edge: float = SQUASH_EDGE
) -> torch.Tensor:
    """The pre-squash ``z`` of an action (inverse of ``mid + half * tanh(z)``), bound actions pulled just
    inside (:data:`SQUASH_EDGE`)."""
    y = ((action - mid) / half).clamp(-edge, edge)
    return torch.atanh(y)


class ContinuousPolicyModule(nn.Module):
    """Normalises observations with the training statistics, then squashes the network's output into the
    action bounds. ``net`` maps normalised observations to the pre-squash mean ``u`` (one value per action
    dimension)."""

    score_kind = "action"

    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    action_mid: torch.Tensor
    action_half: torch.Tensor
    log_half: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        obs_mean: np.ndarray | torch.Tensor,
        obs_std: np.ndarray | torch.Tensor,
        action_low: np.ndarray | torch.Tensor,
        action_high: np.ndarray | torch.Tensor,
    ) -> None:
        super().__init__()
        low = torch.as_tensor(action_low, dtype=torch.float32).clone().reshape(-1)
        high = torch.as_tensor(action_high, dtype=torch.float32).clone().reshape(-1)
        if low.shape != high.shape or not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
            raise ValueError("action bounds must be finite and of one shape")
        if not bool((low < high).all()):
            raise ValueError(f"action bounds need low < high in every dimension, got {low} and {high}")
        self.net = net
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32).clone())
        std = torch.as_tensor(obs_std, dtype=torch.float32).clone()
        self.register_buffer("obs_std", torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.register_buffer("action_mid", (high + low) / 2.0)
        self.register_buffer("action_half", (high - low) / 2.0)
        self.register_buffer("log_half", torch.log((high - low) / 2.0))

    @torch.jit.export
    def pre_squash(self, obs: torch.Tensor) -> torch.Tensor:
        """``u(obs)``: the network's output before the tanh, one value per action dimension."""
        return self.net((obs - self.obs_mean) / self.obs_std)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.action_mid + self.action_half * torch.tanh(self.pre_squash(obs))

    @torch.jit.export
    def act(self, obs: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(action, log_density)``: the action explored with Gaussian noise of ``std`` before squashing."""
        u = self.pre_squash(obs)
        if std <= 0.0:
            action = self.action_mid + self.action_half * torch.tanh(u)
            return action, torch.full(u.shape[:-1], float("nan"), dtype=u.dtype, device=u.device)
        z = u + std * torch.randn_like(u)
        log_std = torch.full_like(u, math.log(std))
        logp = squashed_gaussian_log_prob(z, u, log_std, self.log_half)
        return self.action_mid + self.action_half * torch.tanh(z), logp

    @torch.jit.export
    def log_prob(self, obs: torch.Tensor, action: torch.Tensor, std: float) -> torch.Tensor:
        """Log-density of ``action`` under ``act(obs, std)`` (``std`` > 0; NaN for a point mass)."""
        u = self.pre_squash(obs)
        if std <= 0.0:
            return torch.full(u.shape[:-1], float("nan"), dtype=u.dtype, device=u.device)
        z = unsquash(action, self.action_mid, self.action_half)
        log_std = torch.full_like(u, math.log(std))
        return squashed_gaussian_log_prob(z, u, log_std, self.log_half)

    def act_numpy(self, obs: np.ndarray, selection: Selection) -> tuple[np.ndarray, np.ndarray]:
        """``act`` on a batch of raw observations, as float64 numpy (for evaluation and OPE)."""
        device = self.obs_mean.device
        with torch.no_grad():
            t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
            action, logp = self.act(t, selection.std)
        return action.double().cpu().numpy(), logp.double().cpu().numpy()

    def log_prob_numpy(self, obs: np.ndarray, action: np.ndarray, selection: Selection) -> np.ndarray:
        """``log_prob`` for raw observations and actions, as float64 numpy."""
        device = self.obs_mean.device
        with torch.no_grad():
            o = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
            a = torch.as_tensor(np.asarray(action, dtype=np.float32), device=device)
            logp = self.log_prob(o, a, selection.std)
        return logp.double().cpu().numpy()
