"""TD3+BC (Fujimoto & Gu 2021): TD3 with a behaviour-cloning term in the actor's loss, Box actions only.

Each step, in this order:

* the twin critics regress on ``r + gamma * (1 - terminated) * min_i Q_i_target(s', a')`` where the
  target action is smoothed: ``a' = clip(pi_target(s') + clip(noise, -noise_clip, noise_clip), -1, 1)``;
* every ``policy_freq`` steps, the actor minimises ``-lambda * Q_1(s, pi(s)) + (pi(s) - a_data)^2`` with
  ``lambda = alpha / mean |Q_1(s, pi(s))|`` (the Q term's scale no longer depends on the rewards'),
  against the critics just updated, and the target networks move towards the online ones (Polyak).

The actor is deterministic, ``pi(s) = tanh(u(s))``; ``u`` is the exported policy network.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rlops_trainer.algos.continuous import TwinCritic, action_mse, twin_td_loss
from rlops_trainer.algos.iql import value_target
from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import TD3BCConfig
from rlops_trainer.policy import mlp
from rlops_trainer.training import (
    Apply,
    Batch,
    RunOptions,
    StagedLearner,
    TargetSync,
    TrainResult,
    adam,
    fit,
)

# ----------------------------------------------------------------------------------------------------
# Losses


def smoothed_target_action(action: torch.Tensor, noise: torch.Tensor, noise_clip: float) -> torch.Tensor:
    """Target policy smoothing: clip(action + clip(noise, -noise_clip, noise_clip), -1, 1)."""
    return (action + noise.clamp(-noise_clip, noise_clip)).clamp(-1.0, 1.0)


def td3bc_actor_loss(
    q: torch.Tensor, policy_action: torch.Tensor, data_action: torch.Tensor, alpha: float
) -> torch.Tensor:
    """-lambda * mean Q(s, pi(s)) + mean (pi(s) - a_data)^2; lambda = alpha / mean |Q|, held constant."""
    lam = alpha / q.abs().mean().detach()
    return -lam * q.mean() + action_mse(policy_action, data_action)


# ----------------------------------------------------------------------------------------------------
# Networks and one update


class TD3BCLearner(StagedLearner):
    score_kind = "action"

    def __init__(self, cfg: TD3BCConfig, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.actor = mlp(obs_dim, action_dim, cfg.hidden)
        self.critic = TwinCritic(obs_dim, action_dim, cfg.hidden)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_sync = [
            TargetSync(self.actor_target, self.actor),
            TargetSync(self.critic_target, self.critic),
        ]
        self.actor_params = list(self.actor.parameters())
        self.critic_params = list(self.critic.parameters())

    def update(self, batch: Batch, step: int, apply: Apply) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with torch.no_grad():
            next_action = torch.tanh(self.actor_target(batch.next_obs))
            noise = torch.randn_like(next_action) * cfg.policy_noise
            next_q1, next_q2 = self.critic_target(
                batch.next_obs, smoothed_target_action(next_action, noise, cfg.noise_clip)
            )
            target = value_target(batch.reward, batch.terminated, torch.minimum(next_q1, next_q2), cfg.gamma)
        q1, q2 = self.critic(batch.obs, batch.action)
        td = twin_td_loss(q1, q2, target)
        apply(td, self.critic_params)

        # Delayed actor: on other steps its loss is only measured, so the metric covers every step.
        update_actor = (step + 1) % cfg.policy_freq == 0
        with torch.set_grad_enabled(update_actor and torch.is_grad_enabled()):
            policy_action = torch.tanh(self.actor(batch.obs))
            actor_loss = td3bc_actor_loss(
                self.critic.first(batch.obs, policy_action), policy_action, batch.action, cfg.alpha
            )
        if update_actor:
            apply(actor_loss, self.actor_params)
        return {
            "td_loss": td.detach(),
            "actor_loss": actor_loss.detach(),
            "q_mean": q1.detach().mean(),
            "mse": action_mse(policy_action.detach(), batch.action),
        }

    def make_optimizer(self) -> torch.optim.Optimizer:
        return adam(self.actor_params, self.cfg.actor_lr, (self.critic_params, self.cfg.critic_lr))

    def after_step(self, step: int) -> None:
        if step % self.cfg.policy_freq == 0:
            for sync in self.target_sync:
                sync.update(self.cfg.tau)

    def policy_net(self) -> nn.Module:
        return self.actor


def train(cfg: TD3BCConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("td3bc", cfg, data, run, TD3BCLearner)
