"""Policy directories for tests that need a CartPole policy of a known quality without training one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from rlops_trainer.datasets import Transitions
from rlops_trainer.export import write_policy_dir
from rlops_trainer.policy import PolicyModule, Selection
from rlops_trainer.training import TrainResult


def linear_policy(weights: list[float]) -> PolicyModule:
    """Logit difference w . obs between pushing right and left (a hand-made CartPole controller)."""
    lin = torch.nn.Linear(4, 2)
    with torch.no_grad():
        w = torch.tensor(weights, dtype=torch.float32)
        lin.weight[:] = torch.stack([-w / 2, w / 2])
        lin.bias.zero_()
    return PolicyModule(lin, np.zeros(4), np.ones(4), "logits").eval()


def policy_dir(root: Path, data: Transitions, name: str, weights: list[float], selection: Selection) -> Path:
    """``linear_policy(weights)`` written as the policy directory ``root/name``, its card from ``data``."""
    result = TrainResult(
        algorithm="bc",
        policy=linear_policy(weights),
        selection=selection,
        config={},
        dataset_fingerprint=data.fingerprint(),
        steps=0,
        wall_time_s=0.0,
        final_metrics={},
        metrics_path=None,
        device="cpu",
    )
    return write_policy_dir(result, data, root / name, name)
