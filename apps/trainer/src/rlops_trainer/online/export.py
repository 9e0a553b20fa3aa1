"""The trained RLModule as the same policy artifact the offline trainer writes.

RLlib's own export paths are not used (they have open bugs and tie the file to RLlib). Instead the
layers on the module's score path are copied into a plain torch network:

* PPO and APPO: the actor encoder's MLP followed by the policy head's MLP; scores are logits.
* DQN: the encoder's MLP, then the advantage head, plus with ``dueling`` the value head
  (``Q = V + A - mean(A)``, RLlib's own combination); scores are Q-values.

That network goes into :class:`~rlops_trainer.policy.PolicyModule` (observations enter unscaled, as
RLlib saw them) and through :func:`rlops_trainer.export.write_policy_dir`, the exporter of the offline
trainer: TorchScript, parity check, model card, atomic directory. Before that, the copied network must
agree with RLlib's module itself on the same probe observations (:func:`check_module_parity`).

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

import numpy as np
import torch
from torch import nn

from rlops_trainer import datasets
from rlops_trainer.collect import make_env
from rlops_trainer.datasets import DatasetMeta, Transitions, box_space, discrete_space
from rlops_trainer.export import ExportError, check_parity, probe_observations, write_policy_dir
from rlops_trainer.online.config import OnlineConfig
from rlops_trainer.policy import PolicyModule, Selection
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


def score_network(module: Any, algorithm: str) -> tuple[nn.Module, str]:
    """A plain torch copy of the module's score path, and what it scores (``logits`` or ``q_values``)."""
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


def policy_from_module(module: nn.Module, algorithm: str, obs_dim: int) -> PolicyModule:
    """The exported policy for an RLlib module: its score path copied, observations unscaled."""
    net, kind = score_network(module, algorithm)
    for p in net.parameters():
        p.requires_grad_(False)
    return _unscaled(net.eval(), obs_dim, kind)


def rllib_policy(module: nn.Module, algorithm: str, obs_dim: int) -> PolicyModule:
    """RLlib's module itself wrapped as a PolicyModule (scores and action probabilities)."""
    kind = "q_values" if algorithm == "DQN" else "logits"
    return _unscaled(RLlibScores(module.eval(), algorithm), obs_dim, kind)


def check_module_parity(
    module: nn.Module, policy: PolicyModule, algorithm: str, probe: np.ndarray, selection: Selection
) -> dict[str, float]:
    """Compare ``policy`` with RLlib's module on ``probe``; raises ExportError when they differ."""
    reference = rllib_policy(module, algorithm, probe.shape[1])
    try:
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
    policy: PolicyModule, selection: Selection, cfg: OnlineConfig, episodes: int, seed: int
) -> Transitions:
    """Episodes of ``policy`` acting as served (``selection``), as a validated transition dataset.

    Every action is drawn from the served distribution, so ``behavior_logp`` is exact.
    """
    handle = make_env(cfg.env, kwargs=dict(cfg.env_kwargs))
    env, n, start, space = handle.env, handle.n_actions, handle.start, handle.observation_space
    rng = np.random.default_rng([seed, 3])
    cols: dict[str, list[Any]] = {
        k: [] for k in ("obs", "action", "reward", "next_obs", "term", "trunc", "logp")
    }
    lengths: list[int] = []
    try:
        for _ in range(episodes):
            obs, _ = env.reset(seed=int(rng.integers(0, 2**31 - 1)))
            obs = np.asarray(obs, dtype=np.float32).ravel()
            steps = 0
            while True:
                probs = policy.probs_numpy(obs[None], selection)[0]
                action = int(min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum()), n - 1))
                next_obs, reward, terminated, truncated, _ = env.step(start + action)
                next_obs = np.asarray(next_obs, dtype=np.float32).ravel()
                cols["obs"].append(obs)
                cols["action"].append(action)
                cols["reward"].append(float(reward))
                cols["next_obs"].append(next_obs)
                cols["term"].append(bool(terminated))
                cols["trunc"].append(bool(truncated) and not terminated)
                cols["logp"].append(math.log(probs[action]) if probs[action] > 0 else -math.inf)
                obs = next_obs
                steps += 1
                if terminated or truncated:
                    break
            lengths.append(steps)
    finally:
        env.close()
    meta = DatasetMeta(
        env_id=cfg.env,
        observation_space=box_space(space.low, space.high),
        action_space=discrete_space(n),
        behavior_policy=(
            f"{cfg.policy_name} ({cfg.algorithm}, temperature {selection.temperature:g}, "
            f"epsilon {selection.epsilon:g})"
        ),
        source=f"online:{cfg.algorithm.lower()}",
        extra={"seed": seed, "episodes": episodes, "env_kwargs": dict(cfg.env_kwargs)},
    )
    length_arr = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(length_arr)[:-1]])
    t = Transitions(
        episode_id=np.repeat(np.arange(episodes, dtype=np.int64), length_arr),
        step=np.arange(int(length_arr.sum()), dtype=np.int64) - np.repeat(starts, length_arr),
        observation=np.stack(cols["obs"]),
        action=np.asarray(cols["action"], dtype=np.int64),
        reward=np.asarray(cols["reward"], dtype=np.float32),
        next_observation=np.stack(cols["next_obs"]),
        terminated=np.asarray(cols["term"], dtype=np.bool_),
        truncated=np.asarray(cols["trunc"], dtype=np.bool_),
        behavior_logp=np.asarray(cols["logp"], dtype=np.float32),
        meta=meta,
    )
    return datasets.validate(t)


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
    selection = Selection(temperature=cfg.export.serve_temperature, epsilon=cfg.export.serve_epsilon)
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
