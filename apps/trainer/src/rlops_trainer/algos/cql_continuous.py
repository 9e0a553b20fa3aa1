"""Conservative Q-learning on Box actions (CQL, Kumar et al. 2020), on a soft actor-critic base as in
CORL and d3rlpy.

Each step, in this order:

* the twin critics regress on ``r + gamma * (1 - terminated) * min_i Q_i_target(s', a')`` with
  ``a' ~ pi(s')`` (minus ``alpha_sac * log pi(a'|s')`` with ``backup_entropy``), plus ``alpha`` times the
  conservative penalty of each critic

      logsumexp_j [Q(s, a_j) - log mu_j(a_j)] - Q(s, a_data)

  over ``n_action_samples`` actions from each of three proposals ``mu``: uniform on [-1, 1]^k
  (log-density log(0.5^k)), the current policy at s, and the current policy at s' (their exact
  log-densities). Dividing by the proposal's density makes the logsumexp an importance-sampled estimate of
  log of the integral of exp Q over the action box; the penalty pushes down Q where the data are not and
  up at the data actions. With ``lagrange``, the penalty's multiplier is tuned (dual ascent) so that the
  penalty stays near ``target_action_gap``;
* the actor minimises ``alpha_sac * log pi(a|s) - min_i Q_i(s, a)`` for ``a ~ pi(s)``, reparameterised,
  against the critics just updated;
* with ``learn_temperature``, the entropy temperature ``alpha_sac`` moves so that the policy's entropy
  tracks ``target_entropy_per_dim * k``;
* the target critics move towards the online ones (Polyak).

Actions are tanh-squashed Gaussians on [-1, 1] (``algos/continuous.py``); served: the mean ``tanh(u(s))``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from rlops_trainer.algos.continuous import (
    GaussianActor,
    TwinCritic,
    action_mse,
    sample,
    twin_td_loss,
    uniform_log_density,
)
from rlops_trainer.algos.iql import value_target
from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import ContinuousCQLConfig
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

MAX_LAGRANGE = 1e6
"""Upper clamp of the penalty's multiplier (CORL's): a penalty that cannot reach the gap would otherwise
drive it to infinity."""

# ----------------------------------------------------------------------------------------------------
# Losses


def conservative_penalty(
    q_sampled: torch.Tensor, log_density: torch.Tensor, q_data: torch.Tensor
) -> torch.Tensor:
    """Batch mean of logsumexp_j (Q(s, a_j) - log mu(a_j)) - Q(s, a_data).

    ``q_sampled`` and ``log_density`` are ``[B, M]`` (M sampled actions per state), ``q_data`` is ``[B]``.
    """
    return (torch.logsumexp(q_sampled - log_density, dim=1) - q_data).mean()


def sac_actor_loss(q: torch.Tensor, log_density: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """mean of temperature * log pi(a|s) - Q(s, a) over sampled actions (the temperature held constant)."""
    return (temperature.detach() * log_density - q).mean()


def temperature_loss(
    log_temperature: torch.Tensor, log_density: torch.Tensor, target_entropy: float
) -> torch.Tensor:
    """-mean of log_temperature * (log pi(a|s) + target_entropy): the temperature rises while the entropy
    -log pi is below the target and falls while it is above."""
    return -(log_temperature * (log_density.detach() + target_entropy)).mean()


def lagrange_loss(
    log_multiplier: torch.Tensor, penalty: torch.Tensor, target_action_gap: float
) -> torch.Tensor:
    """-exp(log_multiplier) * (penalty - target_action_gap): descending it raises the multiplier while the
    penalty is above the gap (dual ascent on the constraint penalty <= gap)."""
    return -(log_multiplier.exp().clamp(max=MAX_LAGRANGE) * (penalty.detach() - target_action_gap))


# ----------------------------------------------------------------------------------------------------
# Networks and one update


class ContinuousCQLLearner(StagedLearner):
    score_kind = "action"

    def __init__(self, cfg: ContinuousCQLConfig, obs_dim: int, action_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.action_dim = action_dim
        self.actor = GaussianActor(obs_dim, action_dim, cfg.hidden, state_dependent_std=True)
        self.critic = TwinCritic(obs_dim, action_dim, cfg.hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.target_sync = TargetSync(self.critic_target, self.critic)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.initial_temperature)))
        self.log_lagrange = nn.Parameter(torch.tensor(0.0))
        self.target_entropy = cfg.target_entropy_per_dim * action_dim
        self.actor_params = list(self.actor.parameters())
        self.critic_params = list(self.critic.parameters())

    def proposals(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The penalty's sampled actions ``[B, 3M, k]`` and their log-densities ``[B, 3M]`` (no gradient)."""
        b, m, k = batch.obs.shape[0], self.cfg.n_action_samples, self.action_dim
        uniform = torch.rand(b, m, k, device=batch.obs.device) * 2.0 - 1.0
        actions = [uniform]
        log_densities = [torch.full((b, m), uniform_log_density(k), device=batch.obs.device)]
        for obs in (batch.obs, batch.next_obs):
            mean, log_std = self.actor(obs)
            action, logp = sample(mean[:, None].expand(b, m, k), log_std[:, None].expand(b, m, k))
            actions.append(action)
            log_densities.append(logp)
        return torch.cat(actions, dim=1), torch.cat(log_densities, dim=1)

    def update(self, batch: Batch, step: int, apply: Apply) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        temperature = self.log_temperature.exp().detach()
        with torch.no_grad():
            next_mean, next_log_std = self.actor(batch.next_obs)
            next_action, next_logp = sample(next_mean, next_log_std)
            next_v = torch.minimum(*self.critic_target(batch.next_obs, next_action))
            if cfg.backup_entropy:
                next_v = next_v - temperature * next_logp
            target = value_target(batch.reward, batch.terminated, next_v, cfg.gamma)
            sampled, log_density = self.proposals(batch)

        # Critics: TD regression plus the conservative penalty of each.
        q1, q2 = self.critic(batch.obs, batch.action)
        td = twin_td_loss(q1, q2, target)
        obs_rep = batch.obs[:, None].expand(-1, sampled.shape[1], -1)
        q1_sampled, q2_sampled = self.critic(obs_rep, sampled)
        penalty1 = conservative_penalty(q1_sampled, log_density, q1)
        penalty2 = conservative_penalty(q2_sampled, log_density, q2)
        penalty = (penalty1 + penalty2) / 2.0
        metrics: dict[str, torch.Tensor] = {}
        multiplier = torch.ones((), device=q1.device)
        if cfg.lagrange:
            apply(lagrange_loss(self.log_lagrange, penalty, cfg.target_action_gap), [self.log_lagrange])
            multiplier = self.log_lagrange.exp().clamp(max=MAX_LAGRANGE).detach()
            metrics["lagrange_alpha"] = multiplier
        apply(td + multiplier * cfg.alpha * (penalty1 + penalty2), self.critic_params)

        # Actor against the updated critics, then the temperature on the same sampled actions.
        mean, log_std = self.actor(batch.obs)
        action, logp = sample(mean, log_std)
        q_pi = torch.minimum(*self.critic(batch.obs, action))
        actor_loss = sac_actor_loss(q_pi, logp, temperature)
        apply(actor_loss, self.actor_params)
        if cfg.learn_temperature:
            apply(temperature_loss(self.log_temperature, logp, self.target_entropy), [self.log_temperature])

        return {
            "td_loss": td.detach(),
            "cql_penalty": penalty.detach(),
            "q_mean": q1.detach().mean(),
            "actor_loss": actor_loss.detach(),
            "alpha": temperature,
            "entropy": -logp.detach().mean(),
            **metrics,
            "mse": action_mse(torch.tanh(mean.detach()), batch.action),
        }

    def make_optimizer(self) -> torch.optim.Optimizer:
        return adam(
            self.actor_params,
            self.cfg.actor_lr,
            (self.critic_params, self.cfg.critic_lr),
            ([self.log_temperature], self.cfg.temperature_lr),
            ([self.log_lagrange], self.cfg.lagrange_lr),
        )

    def after_step(self, step: int) -> None:
        self.target_sync.update(self.cfg.tau)

    def policy_net(self) -> nn.Module:
        return self.actor.mean_net()


def train(cfg: ContinuousCQLConfig, data: Transitions, run: RunOptions) -> TrainResult:
    return fit("cql", cfg, data, run, ContinuousCQLLearner)
