"""The trained RLModule as the same policy artifact the offline trainer writes.

RLlib's own export paths are not used (they have open bugs and tie the file to RLlib). Instead the
layers on the module's score path are copied into a plain torch network:

* PPO and APPO: the actor encoder's MLP followed by the policy head's MLP; scores are logits.
* DQN: the encoder's MLP, then the advantage head, plus with ``dueling`` the value head
  (``Q = V + A - mean(A)``, RLlib's own combination); scores are Q-values.
* SAC (Box actions): the actor encoder's MLP and the policy head, whose output is RLlib's squashed
  Gaussian (mean, log-std); the mean is the pre-squash action. RLlib squashes into [-1, 1] and its env
  connector rescales into the bounds, which is ``mid + half * tanh(mean)``: the same action as
  :class:`~rlops_trainer.policy.ContinuousPolicyModule`.

That network goes into :class:`~rlops_trainer.policy.PolicyModule` or ``ContinuousPolicyModule``
(observations enter unscaled, as RLlib saw them) and through :func:`rlops_trainer.export.write_policy_dir`,
the exporter of the offline trainer: TorchScript, parity check, model card, atomic directory. Before
that, the copied network must agree with RLlib's module itself on the same probe observations
(:func:`check_module_parity`).

The model card describes data as the offline card does; for an online policy, its data are
``export.reference_episodes`` episodes of the trained policy acting as it will be served, recorded as a
transition dataset (``reference.parquet`` in the run directory). Their observations are what serving
should see, so they are the reference for drift, and their propensities are exact.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from rlops_trainer import datasets
from rlops_trainer.collect import (
    STEP_COLUMNS,
    Choice,
    make_env,
    record_episode,
    squashed_gaussian,
    transitions_from_steps,
)
from rlops_trainer.datasets import DatasetMeta, Transitions, box_space, discrete_space
from rlops_trainer.export import (
    PARITY_TOL,
    ExportError,
    check_parity,
    probe_observations,
    within_tolerance,
    write_policy_dir,
)
from rlops_trainer.online.config import OnlineConfig
from rlops_trainer.policy import ContinuousPolicyModule, PolicyModule, Selection
from rlops_trainer.training import TrainResult

REFERENCE_FILE = "reference.parquet"


def _mlp(part: nn.Module, where: str) -> list[nn.Module]:
    """Copies of the layers of one of RLlib's MLP parts (an encoder or a head: ``.net.mlp``)."""
    net = getattr(getattr(part, "net", None), "mlp", None)
    if not isinstance(net, nn.Sequential):
        raise ExportError(
            f"cannot export the RLlib module: {where} is a {type(part).__name__} without an MLP "
            "(only RLlib's default MLP modules are supported)"
        )
    return [copy.deepcopy(layer) for layer in net]


class DuelingQ(nn.Module):
    """Q-values of a dueling network: ``V(s) + A(s, a) - mean_a A(s, a)``."""

    def __init__(self, encoder: nn.Module, advantage: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.encoder, self.advantage, self.value = encoder, advantage, value

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = self.encoder(obs)
        a = self.advantage(h)
        return self.value(h) + a - a.mean(dim=-1, keepdim=True)


class GaussianMean(nn.Module):
    """The mean half of RLlib's squashed-Gaussian inputs ``(mean, log_std)``: the pre-squash action."""

    def __init__(self, action_dim: int) -> None:
        super().__init__()
        self.action_dim = action_dim

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs[:, : self.action_dim]


def score_network(module: Any, algorithm: str) -> tuple[nn.Module, str]:
    """A plain torch copy of the module's score path, and what it scores (``logits``, ``q_values``, or
    for SAC ``action``: the pre-squash mean action)."""
    if algorithm == "SAC":
        action_dim = int(np.prod(module.action_space.shape))
        layers = [*_mlp(module.pi_encoder, "the actor encoder"), *_mlp(module.pi, "the policy head")]
        return nn.Sequential(*layers, GaussianMean(action_dim)), "action"
    if algorithm in ("PPO", "APPO"):
        encoder = module.encoder
        actor = getattr(encoder, "actor_encoder", None) or getattr(encoder, "encoder", None)
        if actor is None:
            raise ExportError(
                f"cannot export the RLlib module: {type(encoder).__name__} has no actor encoder"
            )
        return nn.Sequential(*_mlp(actor, "the actor encoder"), *_mlp(module.pi, "the policy head")), "logits"
    if algorithm == "DQN":
        if getattr(module, "num_atoms", 1) != 1:
            raise ExportError("cannot export a distributional DQN module (num_atoms > 1)")
        encoder = nn.Sequential(*_mlp(module.encoder, "the encoder"))
        advantage = nn.Sequential(*_mlp(module.af, "the advantage head"))
        if getattr(module, "uses_dueling", False):
            return DuelingQ(encoder, advantage, nn.Sequential(*_mlp(module.vf, "the value head"))), "q_values"
        return nn.Sequential(encoder, advantage), "q_values"
    raise ExportError(f"no exporter for algorithm {algorithm!r}")


class RLlibScores(nn.Module):
    """RLlib's module behind the ``obs -> scores`` interface (the reference side of the parity check)."""

    def __init__(self, module: Any, algorithm: str) -> None:
        super().__init__()
        self.module, self.algorithm = module, algorithm

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        batch = {"obs": obs}
        if self.algorithm == "DQN":
            return cast(torch.Tensor, self.module.compute_q_values(batch)["qf_preds"])
        return cast(torch.Tensor, self.module.forward_inference(batch)["action_dist_inputs"])


def _unscaled(net: nn.Module, obs_dim: int, score_kind: str) -> PolicyModule:
    return PolicyModule(net, np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32), score_kind).eval()


def policy_from_module(
    module: nn.Module, algorithm: str, obs_dim: int
) -> PolicyModule | ContinuousPolicyModule:
    """The exported policy for an RLlib module: its score path copied, observations unscaled; for a Box
    action space squashed into the bounds of the module's action space."""
    net, kind = score_network(module, algorithm)
    for p in net.parameters():
        p.requires_grad_(False)
    if kind == "action":
        space: Any = module.action_space
        zeros, ones = np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)
        return ContinuousPolicyModule(net.eval(), zeros, ones, space.low, space.high).eval()
    return _unscaled(net.eval(), obs_dim, kind)


def rllib_policy(module: nn.Module, algorithm: str, obs_dim: int) -> PolicyModule:
    """RLlib's module itself wrapped as a PolicyModule (scores and action probabilities)."""
    kind = "q_values" if algorithm == "DQN" else "logits"
    return _unscaled(RLlibScores(module.eval(), algorithm), obs_dim, kind)


def _check_box_parity(module: Any, policy: ContinuousPolicyModule, probe: np.ndarray) -> dict[str, float]:
    """SAC: the pre-squash mean against RLlib's distribution inputs, and the deterministic action
    against RLlib's own path (its distribution's deterministic sample in [-1, 1], rescaled into the
    bounds by RLlib's ``unsquash_action``)."""
    from ray.rllib.utils.spaces.space_utils import unsquash_action

    x = torch.as_tensor(probe, dtype=torch.float32)
    with torch.no_grad():
        inputs = module.forward_inference({"obs": x})["action_dist_inputs"]
        dist = module.get_inference_action_dist_cls().from_logits(inputs).to_deterministic()
        action = unsquash_action(dist.sample().numpy(), module.action_space)
        mean = inputs[:, : policy.action_half.numel()]
        ours_mean, ours_action = policy.pre_squash(x), policy(x)
    deviations = {
        "pre_squash": float(((ours_mean - mean).abs() / mean.abs().clamp(min=1.0)).max()),
        "action": float(np.abs(ours_action.numpy() - action).max() / max(1.0, float(np.abs(action).max()))),
    }
    return within_tolerance(deviations, PARITY_TOL)


def check_module_parity(
    module: nn.Module,
    policy: PolicyModule | ContinuousPolicyModule,
    algorithm: str,
    probe: np.ndarray,
    selection: Selection,
) -> dict[str, float]:
    """Compare ``policy`` with RLlib's module on ``probe``; raises ExportError when they differ."""
    try:
        if isinstance(policy, ContinuousPolicyModule):
            return _check_box_parity(module, policy, probe)
        reference = rllib_policy(module, algorithm, probe.shape[1])
        # check_parity only calls forward and action_probs, which PolicyModule has as well.
        return check_parity(reference, cast(torch.jit.ScriptModule, policy), probe, selection)
    except ExportError as e:
        raise ExportError(f"the exported network does not reproduce RLlib's module: {e}") from e


def load_module(checkpoint: Path) -> Any:
    """The trained RLModule from an algorithm checkpoint (the learner's copy, on CPU)."""
    from ray.rllib.core.rl_module.rl_module import RLModule

    path = Path(checkpoint) / "learner_group" / "learner" / "rl_module" / "default_policy"
    if not path.is_dir():
        raise ExportError(
            f"{checkpoint}: not an RLlib algorithm checkpoint (no {path.relative_to(checkpoint)})"
        )
    module: Any = RLModule.from_checkpoint(path)
    return module.cpu().eval()


# --------------------------------------------------------------------------------------------------
# Reference episodes


def reference_episodes(
    policy: PolicyModule | ContinuousPolicyModule,
    selection: Selection,
    cfg: OnlineConfig,
    episodes: int,
    seed: int,
) -> Transitions:
    """Episodes of ``policy`` acting as served (``selection``), as a validated transition dataset.

    Every action is drawn from the served distribution, so ``behavior_logp`` is exact: a probability
    for Discrete actions, a log-density for Box actions explored with ``selection.std`` (unknown, NaN,
    for the deterministic action, a point mass).
    """
    handle = make_env(cfg.env, kwargs=dict(cfg.env_kwargs), box_actions=cfg.box_actions)
    env, n, start, space = handle.env, handle.n_actions, handle.start, handle.observation_space
    rng = np.random.default_rng([seed, 3])
    columns: dict[str, list[Any]] = {k: [] for k in STEP_COLUMNS}
    choose: Choice
    if isinstance(policy, ContinuousPolicyModule):
        choose = squashed_gaussian(policy, selection.std)
    else:

        def choose(obs: np.ndarray) -> tuple[int, int, float]:
            probs = policy.probs_numpy(obs[None], selection)[0]
            action = int(min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum()), n - 1))
            return action, start + action, math.log(probs[action]) if probs[action] > 0 else -math.inf

    try:
        # A Box policy's noise comes from torch's generator: seed it, and leave the caller's state alone.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
            lengths = [
                record_episode(env, int(rng.integers(0, 2**31 - 1)), choose, columns) for _ in range(episodes)
            ]
    finally:
        env.close()
    if isinstance(handle.action_space, gym.spaces.Box):
        actions = box_space(handle.action_space.low, handle.action_space.high)
        served = f"std {selection.std:g}"
    else:
        actions = discrete_space(n)
        served = f"temperature {selection.temperature:g}, epsilon {selection.epsilon:g}"
    meta = DatasetMeta(
        env_id=cfg.env,
        observation_space=box_space(space.low, space.high),
        action_space=actions,
        behavior_policy=f"{cfg.policy_name} ({cfg.algorithm}, {served})",
        source=f"online:{cfg.algorithm.lower()}",
        extra={"seed": seed, "episodes": episodes, "env_kwargs": dict(cfg.env_kwargs)},
    )
    return transitions_from_steps(columns, lengths, meta)


# --------------------------------------------------------------------------------------------------
# The policy directory


def export_checkpoint(
    checkpoint: Path,
    cfg: OnlineConfig,
    out_dir: Path,
    *,
    env_steps: int,
    wall_time_s: float,
    final_metrics: dict[str, float],
    metrics_path: Path | None,
    device: str,
) -> tuple[Path, TrainResult, Transitions]:
    """Write the policy of ``checkpoint`` as a policy directory ``out_dir / "policy"``.

    Records the reference episodes to ``out_dir / reference.parquet``, checks the copied network
    against RLlib's module, then writes through the offline trainer's exporter. Returns the policy
    directory, the TrainResult behind its card, and the reference data.
    """
    module = load_module(checkpoint)
    obs_dim = int(np.prod(module.observation_space.shape))
    selection = Selection(
        temperature=cfg.export.serve_temperature, epsilon=cfg.export.serve_epsilon, std=cfg.export.serve_std
    )
    policy = policy_from_module(module, cfg.algorithm, obs_dim)
    data = reference_episodes(policy, selection, cfg, cfg.export.reference_episodes, cfg.seed)
    deviations = check_module_parity(module, policy, cfg.algorithm, probe_observations(data), selection)
    datasets.save(data, Path(out_dir) / REFERENCE_FILE)
    returns = data.episode_returns()
    metrics = {
        **final_metrics,
        "reference_return_mean": float(returns.mean()),
        "rllib_parity_max_deviation": max(deviations.values()),
    }
    result = TrainResult(
        algorithm=cfg.algorithm.lower(),
        policy=policy,
        selection=selection,
        config=cfg.to_dict(),
        dataset_fingerprint=data.fingerprint(),
        steps=int(env_steps),
        wall_time_s=float(wall_time_s),
        final_metrics=metrics,
        metrics_path=metrics_path,
        device=device,
    )
    policy_dir = write_policy_dir(result, data, Path(out_dir) / "policy", cfg.policy_name)
    return policy_dir, result, data
