"""The deployable policy: observation preprocessing, a network, and action selection in one module.

The same module is used eagerly (evaluation, OPE) and exported with TorchScript, so the rule that turns
scores into action probabilities is written once and travels inside ``policy.pt``:

* ``forward(obs)`` returns one score per action: logits (``score_kind == "logits"``) or Q-values.
* ``action_probs(obs, temperature, epsilon)``: with ``temperature > 0`` a softmax of ``score /
  temperature``; with ``temperature <= 0`` the greedy action (ties to the lowest index). Then mixed
  with the uniform distribution: ``(1 - epsilon) * p + epsilon / n_actions``.
"""

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

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> "Selection":
        """The selection a model card records (``policy.selection``)."""
        sel = card["policy"]["selection"]
        return cls(temperature=float(sel["temperature"]), epsilon=float(sel["epsilon"]))


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
