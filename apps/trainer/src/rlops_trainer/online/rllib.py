"""RLlib on its current API stack (RLModule, Learner, EnvRunner), configured from an OnlineConfig.

Everything RLlib-specific about a run lives here: the translation of the typed config into an
``AlgorithmConfig``, the episode callback, and the translation of RLlib's nested result dict into one
flat rlops metrics record per iteration (the names the offline trainer and the Prometheus exporter
use, see :mod:`rlops_trainer.telemetry`).

RLlib's own ``episode_return_mean`` covers only the episodes that ended during the last iteration, so
the mean return of a run with long episodes jumps between iterations. The callback therefore reports
every finished episode, and :class:`EpisodeWindow` keeps the last ``metrics.episode_window`` of them:
the mean return and length, the early stop and the benchmark all read that window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from ray.rllib.algorithms import AlgorithmConfig
from ray.rllib.algorithms.appo import APPOConfig
from ray.rllib.algorithms.appo.torch.appo_torch_learner import APPOTorchLearner
from ray.rllib.algorithms.dqn import DQNConfig
from ray.rllib.algorithms.dqn.torch.dqn_torch_learner import DQNTorchLearner
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.algorithms.sac import SACConfig
from ray.rllib.algorithms.sac.sac_catalog import SACCatalog
from ray.rllib.callbacks.callbacks import RLlibCallback
from ray.rllib.core.distribution.torch.torch_distribution import TorchDeterministic, TorchSquashedGaussian
from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
from ray.rllib.core.rl_module.rl_module import RLModuleSpec

from rlops_trainer.online.config import APPOTraining, DQNTraining, OnlineConfig, PPOTraining, SACTraining
from rlops_trainer.training import adam

if TYPE_CHECKING:
    from ray.rllib.algorithms import Algorithm

EPISODES_KEY = "rlops_episodes"
"""Metrics key under which every EnvRunner reports its finished episodes."""

MODULE_ID = "default_policy"


class EpisodeStats(RLlibCallback):
    """Reports (return, length, non-greedy actions, actions with scores) for every finished episode.

    A sampled action is non-greedy when it is not the argmax of the policy's scores at that step; their
    share is the measured exploration rate of a stochastic policy. Modules that do not return their
    scores (DQN) and Box actions (SAC, where no action is "greedy") report 0 actions with scores.
    """

    def on_episode_end(
        self,
        *,
        episode: Any,
        prev_episode_chunks: list[Any] | None = None,
        metrics_logger: Any = None,
        **kwargs: Any,
    ) -> None:
        chunks = [*(prev_episode_chunks or []), episode]
        ret = float(sum(c.get_return() for c in chunks))
        # The episode's own step counter: with sampling in the learner's process, RLlib's learner
        # connector appends a bootstrap step to the earlier chunks in place, so their lengths overcount.
        length = int(episode.t)
        nongreedy = scored = 0
        ends = [c.t_started for c in chunks[1:]] + [episode.t]
        for chunk, end in zip(chunks, ends, strict=True):
            if "action_dist_inputs" not in chunk.extra_model_outputs:
                continue
            steps = end - chunk.t_started  # leaves out a bootstrap step appended later
            scores = np.asarray(chunk.get_extra_model_outputs("action_dist_inputs"))[:steps]
            actions = np.asarray(chunk.get_actions())
            if not np.issubdtype(actions.dtype, np.integer):
                continue
            actions = actions.reshape(-1)[:steps]
            if scores.ndim == 2 and len(scores) == len(actions):
                nongreedy += int((scores.argmax(axis=-1) != actions).sum())
                scored += len(actions)
        if metrics_logger is not None:
            metrics_logger.log_value(EPISODES_KEY, (ret, length, nongreedy, scored), reduce="item_series")


class _FusedAdam:
    """RLlib's torch learners with Adam's fused kernel: one call for all parameters instead of a loop over
    tensors, which is most of an optimizer step for networks as small as these (the update is the same)."""

    def configure_optimizers_for_module(self, module_id: str, config: Any = None) -> None:
        learner: Any = self
        params = learner.get_parameters(learner._module[module_id])
        learner.register_optimizer(
            module_id=module_id, optimizer=adam(params, lr=1e-3), params=params, lr_or_lr_schedule=config.lr
        )


class PPOLearner(_FusedAdam, PPOTorchLearner):
    pass


class APPOLearner(_FusedAdam, APPOTorchLearner):  # type: ignore[misc]  # RLlib's own bases disagree
    pass


class DQNLearner(_FusedAdam, DQNTorchLearner):
    pass


class SquashedGaussian(TorchSquashedGaussian):
    """RLlib's tanh-squashed Gaussian whose deterministic action is squashed as well. RLlib 2.60 returns
    the raw mean there (ray-project/ray#51544), which its env connector then clips into the bounds: greedy
    evaluation would act with ``clip(mean)`` instead of ``tanh(mean)``, the action the exported policy
    serves. Sampling and log-densities, all that training uses, are RLlib's own."""

    def to_deterministic(self) -> TorchDeterministic:
        return TorchDeterministic(loc=self._squash(self.loc))


class SACModuleCatalog(SACCatalog):
    """SAC's catalog with :class:`SquashedGaussian` for Box actions."""

    def get_action_dist_cls(self, framework: str) -> Any:
        cls: Any = super().get_action_dist_cls(framework)  # a class, though RLlib annotates an instance
        return SquashedGaussian if cls is TorchSquashedGaussian else cls


def _replay_buffer(capacity: int, prioritized: bool) -> dict[str, Any]:
    """RLlib's replay buffer config: episodes replayed uniformly, or in proportion to their TD error."""
    if prioritized:
        return {"type": "PrioritizedEpisodeReplayBuffer", "capacity": capacity, "alpha": 0.6, "beta": 0.4}
    return {"type": "EpisodeReplayBuffer", "capacity": capacity}


def _hyperparameters(cfg: OnlineConfig) -> AlgorithmConfig:
    """The algorithm's config class with its hyperparameters set."""
    t = cfg.training
    if isinstance(t, PPOTraining):
        return (
            PPOConfig()
            .env_runners(rollout_fragment_length=t.rollout_fragment_length)
            .training(
                learner_class=PPOLearner,
                lr=(
                    t.lr
                    if t.lr_decay_env_steps is None
                    else [[0, t.lr], [t.lr_decay_env_steps, t.lr * t.lr_final_fraction]]
                ),
                gamma=t.gamma,
                lambda_=t.gae_lambda,
                train_batch_size_per_learner=t.train_batch_size,
                minibatch_size=t.minibatch_size,
                num_epochs=t.num_epochs,
                clip_param=t.clip_param,
                vf_clip_param=t.vf_clip_param,
                vf_loss_coeff=t.vf_loss_coeff,
                entropy_coeff=t.entropy_coeff,
                use_kl_loss=t.use_kl_loss,
                kl_coeff=t.kl_coeff,
                kl_target=t.kl_target,
                grad_clip=t.grad_clip,
                grad_clip_by="global_norm",
            )
        )
    if isinstance(t, APPOTraining):
        return (
            APPOConfig()
            .env_runners(rollout_fragment_length=t.rollout_fragment_length)
            .reporting(min_time_s_per_iteration=t.min_time_s_per_iteration)
            .training(
                learner_class=APPOLearner,
                lr=t.lr,
                gamma=t.gamma,
                train_batch_size_per_learner=t.train_batch_size,
                vtrace=t.vtrace,
                clip_param=t.clip_param,
                vf_loss_coeff=t.vf_loss_coeff,
                entropy_coeff=t.entropy_coeff,
                use_kl_loss=t.use_kl_loss,
                kl_coeff=t.kl_coeff,
                grad_clip=t.grad_clip,
                grad_clip_by="global_norm",
                target_network_update_freq=t.target_network_update_freq,
                circular_buffer_num_batches=t.circular_buffer_num_batches,
                circular_buffer_iterations_per_batch=t.circular_buffer_iterations_per_batch,
            )
        )
    if isinstance(t, SACTraining):
        # SAC keeps RLlib's learner: it steps three optimisers (actor, critics, temperature) of its own.
        return (
            SACConfig()
            .env_runners(rollout_fragment_length=t.rollout_fragment_length)
            .training(
                actor_lr=t.actor_lr,
                critic_lr=t.critic_lr,
                alpha_lr=t.alpha_lr,
                lr=None,
                gamma=t.gamma,
                tau=t.tau,
                initial_alpha=t.initial_alpha,
                target_entropy=t.target_entropy,
                train_batch_size_per_learner=t.train_batch_size,
                replay_buffer_config=_replay_buffer(t.replay_capacity, t.prioritized_replay),
                num_steps_sampled_before_learning_starts=t.learning_starts,
                n_step=t.n_step,
                twin_q=t.twin_q,
                training_intensity=t.training_intensity,
                grad_clip=t.grad_clip,
                target_network_update_freq=1,
            )
        )
    return (
        DQNConfig()
        .env_runners(rollout_fragment_length=t.rollout_fragment_length)
        .training(
            learner_class=DQNLearner,
            lr=t.lr,
            gamma=t.gamma,
            train_batch_size_per_learner=t.train_batch_size,
            replay_buffer_config=_replay_buffer(t.replay_capacity, t.prioritized_replay),
            num_steps_sampled_before_learning_starts=t.learning_starts,
            target_network_update_freq=t.target_network_update_freq,
            tau=t.tau,
            n_step=t.n_step,
            double_q=t.double_q,
            dueling=t.dueling,
            num_atoms=1,
            epsilon=[(0, t.epsilon_start), (t.epsilon_steps, t.epsilon_end)],
            training_intensity=t.training_intensity,
            grad_clip=t.grad_clip,  # type: ignore[arg-type]  # annotated int, takes any number
            grad_clip_by="global_norm",
        )
    )


def algorithm_config(cfg: OnlineConfig) -> AlgorithmConfig:
    """The RLlib config of ``cfg`` (new API stack, torch)."""
    r = cfg.resources
    c = _hyperparameters(cfg)
    if cfg.box_actions:
        c = c.rl_module(rl_module_spec=RLModuleSpec(catalog_class=SACModuleCatalog))
    if cfg.evaluation.every:
        c = c.evaluation(
            evaluation_interval=cfg.evaluation.every,
            evaluation_duration=cfg.evaluation.episodes,
            evaluation_duration_unit="episodes",
            evaluation_config=AlgorithmConfig.overrides(explore=False),
        )
    return (
        c.api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
        .framework("torch")
        .environment(cfg.env, env_config=dict(cfg.env_kwargs))
        .env_runners(
            num_env_runners=r.env_runners,
            num_envs_per_env_runner=r.envs_per_env_runner,
            num_cpus_per_env_runner=r.cpus_per_env_runner,  # type: ignore[arg-type]  # Ray takes fractions
            sample_timeout_s=r.sample_timeout_s,
        )
        .learners(
            num_learners=r.learners,
            num_gpus_per_learner=r.gpus_per_learner,
            num_cpus_per_learner=r.cpus_per_learner,
        )
        .fault_tolerance(
            restart_failed_env_runners=r.restart_failed_env_runners,
            max_num_env_runner_restarts=r.max_env_runner_restarts,
            delay_between_env_runner_restarts_s=1.0,
        )
        .rl_module(
            model_config=DefaultModelConfig(
                fcnet_hiddens=list(cfg.model.hidden),
                fcnet_activation=cfg.model.activation,
                vf_share_layers=cfg.model.vf_share_layers,
            ),
        )
        .reporting(metrics_num_episodes_for_smoothing=cfg.metrics.episode_window)
        .callbacks(EpisodeStats)
        .debugging(seed=cfg.seed, log_level="WARN")
    )


# --------------------------------------------------------------------------------------------------
# Results


class EpisodeWindow:
    """The last ``size`` finished training episodes, and running totals over the whole run."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.returns: deque[float] = deque(maxlen=size)
        self.lengths: deque[int] = deque(maxlen=size)
        self.episodes = 0
        self.nongreedy = 0
        self.scored = 0

    def add(self, items: Any) -> tuple[int, int]:
        """Add the episodes one iteration reported; returns (non-greedy actions, scored actions) in it."""
        nongreedy = scored = 0
        if not isinstance(items, list | tuple) or not items:
            return 0, 0  # RLlib reports NaN when no episode ended
        if not isinstance(items[0], list | tuple):
            items = [items]  # RLlib unwraps a series that holds a single item
        for ret, length, ng, sc in items:
            self.returns.append(float(ret))
            self.lengths.append(int(length))
            self.episodes += 1
            nongreedy += int(ng)
            scored += int(sc)
        self.nongreedy += nongreedy
        self.scored += scored
        return nongreedy, scored

    @property
    def full(self) -> bool:
        return len(self.returns) >= self.size

    def mean_return(self) -> float:
        return float(np.mean(self.returns)) if self.returns else math.nan

    def mean_length(self) -> float:
        return float(np.mean(self.lengths)) if self.lengths else math.nan

    def state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "returns": list(self.returns),
            "lengths": list(self.lengths),
            "episodes": self.episodes,
            "nongreedy": self.nongreedy,
            "scored": self.scored,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.returns.extend(float(x) for x in state.get("returns", []))
        self.lengths.extend(int(x) for x in state.get("lengths", []))
        self.episodes = int(state.get("episodes", 0))
        self.nongreedy = int(state.get("nongreedy", 0))
        self.scored = int(state.get("scored", 0))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    return float(value)


# Learner results (per module) and the rlops record keys they become.
_LEARNER_KEYS: dict[str, str] = {
    "total_loss": "loss",
    "policy_loss": "policy_loss",
    "vf_loss": "value_loss",
    "qf_loss": "td_loss",
    "qf_mean": "q_mean",
    "entropy": "entropy",
    "mean_kl_loss": "kl",
    "gradients_default_optimizer_global_norm": "grad_norm",
    "default_optimizer_learning_rate": "lr",
    "vf_explained_var": "vf_explained_var",
    "alpha_value": "alpha",
    "alpha_loss": "alpha_loss",
}


def record_from_result(
    result: Mapping[str, Any],
    cfg: OnlineConfig,
    window: EpisodeWindow,
    *,
    iteration_s: float,
    env_steps_before: float,
    time_s: float,
) -> dict[str, float]:
    """One flat metrics record from an ``Algorithm.train()`` result (and the episode window)."""
    runners = result.get("env_runners", {}) or {}
    learner = (result.get("learners", {}) or {}).get(MODULE_ID, {}) or {}
    faults = result.get("fault_tolerance", {}) or {}
    nongreedy, scored = window.add(runners.get(EPISODES_KEY))
    env_steps = _number(result.get("num_env_steps_sampled_lifetime")) or env_steps_before
    record: dict[str, float] = {
        "iteration": float(result.get("training_iteration", 0)),
        "env_steps": env_steps,
        "time_s": round(time_s, 4),
        "env_steps_per_s": (env_steps - env_steps_before) / max(iteration_s, 1e-9),
        "episodes": float(window.episodes),
        "episode_return_mean": window.mean_return(),
        "episode_length_mean": window.mean_length(),
    }
    # An iteration whose samples were lost (an EnvRunner died) or that is still filling a replay
    # buffer updates nothing; RLlib then reports NaN for every learner value. A NaN from an update
    # that did happen is kept: that is a diverged loss.
    all_modules = (result.get("learners", {}) or {}).get("__all_modules__", {}) or {}
    trained = _number(all_modules.get("num_env_steps_trained"))
    if trained is not None and math.isfinite(trained) and trained > 0:
        seq = _number(learner.get("weights_seq_no"))
        if seq is not None and math.isfinite(seq):
            record["step"] = float(round(seq))
        for key, name in _LEARNER_KEYS.items():
            value = _number(learner.get(key))
            if value is not None:
                record[name] = value
        logps = _number(learner.get("logps"))  # SAC: mean log-density of the actor's own actions
        if logps is not None:
            record["entropy"] = -logps
    evaluation = (result.get("evaluation", {}) or {}).get("env_runners", {}) or {}
    eval_return = _number(evaluation.get("episode_return_mean"))
    if eval_return is not None and math.isfinite(eval_return):
        record["eval_return"] = eval_return
    if isinstance(cfg.training, DQNTraining):
        record["exploration_rate"] = cfg.training.epsilon_at(env_steps)
    elif scored:
        record["exploration_rate"] = nongreedy / scored
    if cfg.resources.env_runners:
        healthy = _number(faults.get("num_healthy_workers"))
        if healthy is not None:
            record["healthy_env_runners"] = healthy
        record["env_runner_restarts"] = _number(faults.get("num_remote_worker_restarts")) or 0.0
    return record


def build_algorithm(cfg: OnlineConfig) -> Algorithm:
    """A new RLlib Algorithm for ``cfg`` (Ray must be initialised)."""
    return algorithm_config(cfg).build_algo()
