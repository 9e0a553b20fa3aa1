"""The online training config: one YAML file, typed and validated before Ray starts.

Top-level keys: ``algorithm`` (PPO, APPO or DQN for Discrete actions; SAC for Box actions), ``env`` (a
Gymnasium id), ``env_kwargs``, ``seed``,
and the sections ``resources``, ``model``, ``training`` (the algorithm's hyperparameters: its own
class below), ``stop``, ``checkpoint``, ``export``, ``metrics`` and ``tracking``. Every field is
documented where it is declared; ``rlops train online-config ALGO`` prints them. A mistake is reported
as ``<file>: <key path>: <what is wrong> (got <value>)``, an unknown key with the keys accepted there.
"""

from __future__ import annotations

import copy
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from rlops_contracts.card import NAME_RE
from rlops_contracts.metrics import PORT_TRAINER_METRICS

ALGORITHMS: tuple[str, ...] = ("PPO", "APPO", "DQN", "SAC")
BOX_ALGORITHMS: tuple[str, ...] = ("SAC",)
"""Algorithms for Box (continuous) action spaces; the others take Discrete actions."""

PositiveInt = Annotated[int, Field(ge=1)]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    """A config section: unknown keys are errors, fields are documented by their docstrings."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# --------------------------------------------------------------------------------------------------
# Sections every algorithm shares


class Resources(Section):
    """Where sampling and learning run; the same file works on a laptop and on a Ray cluster."""

    env_runners: int = Field(default=0, ge=0)
    """EnvRunner actors that sample in parallel; 0 samples in the driver process, which is the fastest
    choice for cheap environments on a few cores (no inter-process traffic)."""
    envs_per_env_runner: PositiveInt = 32
    """Environments each EnvRunner steps side by side (one batched forward pass per step)."""
    cpus_per_env_runner: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each EnvRunner actor."""
    learners: int = Field(default=0, ge=0)
    """Learner actors (data-parallel, gradients all-reduced); 0 updates in the driver process."""
    gpus_per_learner: float = Field(default=0.0, ge=0)
    """GPUs per learner (with learners: 0, the driver's learner uses this many)."""
    cpus_per_learner: float = Field(default=1.0, gt=0)
    """CPUs Ray reserves for each learner actor."""
    torch_threads: PositiveInt = 1
    """torch threads in the driver; more threads slow small networks down on a busy machine."""
    restart_failed_env_runners: bool = True
    """Replace an EnvRunner whose process died and keep training (on false a failure ends the run)."""
    max_env_runner_restarts: int = Field(default=1000, ge=0)
    """How many EnvRunner restarts a run tolerates in total before it fails."""
    sample_timeout_s: float = Field(default=60.0, gt=0)
    """Seconds to wait for a remote EnvRunner's samples before treating it as failed."""


class Model(Section):
    """The policy network (RLlib's default MLP module; exported as a plain torch MLP). SAC's two Q
    networks have the same layers."""

    hidden: list[PositiveInt] = Field(default_factory=lambda: [64, 64], min_length=1)
    """Hidden layer widths."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Activation after every hidden layer."""
    vf_share_layers: bool = False
    """PPO/APPO: the value head shares the policy's hidden layers (false: a separate value network)."""


class Stop(Section):
    """When training ends: the first limit reached. At least one budget must be set."""

    env_steps: PositiveInt | None = 200_000
    """Environment steps sampled."""
    iterations: PositiveInt | None = None
    """Training iterations."""
    time_s: float | None = Field(default=None, gt=0)
    """Seconds of training (Ray start-up not counted)."""
    target_return: float | None = None
    """Stop early once the mean return of the last ``metrics.episode_window`` episodes reaches this."""


class Evaluation(Section):
    """Greedy evaluation episodes during training (reported as eval_return, rlops_train_eval_return)."""

    every: int = Field(default=0, ge=0)
    """Iterations between evaluations; 0 turns evaluation off (the exported policy is still evaluated
    on its reference episodes at the end)."""
    episodes: PositiveInt = 10
    """Episodes per evaluation."""


class Checkpoint(Section):
    """Checkpoints of the whole algorithm state, in ``<run dir>/checkpoints``."""

    every: int = Field(default=10, ge=0)
    """Iterations between checkpoints; one is always written at the end (0: only that one). A crash
    loses at most this many iterations."""
    keep: PositiveInt = 2
    """Checkpoints kept (the oldest are removed)."""


class Export(Section):
    """The policy directory written at the end (policy.pt and model-card.json, as the offline trainer)."""

    name: str | None = None
    """Policy name in the model card (default: ``<algorithm>-<env>``, lower case)."""
    reference_episodes: PositiveInt = 20
    """Episodes of the trained policy recorded as the card's reference data (drift statistics)."""
    serve_temperature: float = Field(default=0.0, ge=0)
    """How serving picks actions: 0 is greedy, > 0 samples from softmax(scores / temperature)."""
    serve_epsilon: float = Field(default=0.0, ge=0, le=1)
    """Probability mass spread uniformly over the actions when serving."""
    serve_std: float = Field(default=0.0, ge=0, le=10)
    """Box actions (SAC): standard deviation of the Gaussian noise added before the tanh squashing when
    serving; 0 serves the deterministic action (the squashed mean)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError("use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return value


class Metrics(Section):
    """The Prometheus endpoint of the trainer (rlops_train_* series) and the episode window."""

    port: int = Field(default=PORT_TRAINER_METRICS, ge=0, le=65535)
    """Port of ``/metrics``; 0 turns the endpoint off."""
    addr: str = "0.0.0.0"
    """Address the endpoint binds (all interfaces, so that a cluster's Prometheus can scrape it)."""
    episode_window: PositiveInt = 100
    """Recent training episodes behind the reported mean return and length (and stop.target_return)."""


class Tracking(Section):
    """MLflow experiment tracking, used when MLFLOW_TRACKING_URI is set (and mlflow is installed)."""

    experiment: str = "rlops-online"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name (default: the run directory's name)."""


# --------------------------------------------------------------------------------------------------
# Hyperparameters, one class per algorithm


class PPOTraining(Section):
    """PPO hyperparameters. The defaults are tuned for fast, cheap environments such as CartPole."""

    lr: float = Field(default=1e-3, gt=0)
    """Adam learning rate (at the start, when it decays)."""
    lr_decay_env_steps: PositiveInt | None = None
    """Decay the learning rate linearly to ``lr_final_fraction × lr`` over this many environment steps
    (None: constant)."""
    lr_final_fraction: float = Field(default=0.0, ge=0, le=1)
    """Learning rate at the end of the decay, as a fraction of lr."""
    gamma: float = Field(default=0.98, gt=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(default=0.8, ge=0, le=1)
    """GAE lambda (bias-variance trade-off of the advantages)."""
    train_batch_size: PositiveInt = 1024
    """Environment steps per training iteration (per learner)."""
    minibatch_size: PositiveInt = 256
    """Rows per gradient step."""
    num_epochs: PositiveInt = 10
    """Passes over each training batch."""
    clip_param: float = Field(default=0.2, gt=0)
    """PPO's surrogate clipping range."""
    vf_clip_param: float = Field(default=10_000.0, gt=0)
    """Clip of the squared value error. RLlib's default (10) stops the value function from learning
    returns larger than about 3; set it below the squared return scale only on purpose."""
    vf_loss_coeff: float = Field(default=0.5, ge=0)
    """Weight of the value loss."""
    entropy_coeff: float = Field(default=0.0, ge=0)
    """Weight of the entropy bonus."""
    use_kl_loss: bool = False
    """Add an adaptive KL penalty to the loss."""
    kl_coeff: float = Field(default=0.2, ge=0)
    """Initial KL penalty coefficient (with use_kl_loss)."""
    kl_target: float = Field(default=0.01, gt=0)
    """KL the adaptive penalty steers towards (with use_kl_loss)."""
    grad_clip: float = Field(default=0.5, gt=0)
    """Clip of the global gradient norm (the norm before clipping is reported as grad_norm)."""
    rollout_fragment_length: PositiveInt | Literal["auto"] = "auto"
    """Steps each environment contributes per sample call; auto divides the batch evenly."""

    @model_validator(mode="after")
    def _batches(self) -> PPOTraining:
        if self.minibatch_size > self.train_batch_size:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be <= train_batch_size "
                f"({self.train_batch_size})"
            )
        return self


class APPOTraining(Section):
    """APPO hyperparameters (asynchronous PPO with V-trace, IMPALA-style)."""

    lr: float = Field(default=5e-4, gt=0)
    """Adam learning rate."""
    gamma: float = Field(default=0.99, gt=0, le=1)
    """Discount factor."""
    train_batch_size: PositiveInt = 500
    """Environment steps per learner update (per learner)."""
    rollout_fragment_length: PositiveInt = 50
    """Steps each environment contributes per sample call."""
    vtrace: bool = True
    """Correct for policy lag with V-trace (off: GAE on the stale samples)."""
    clip_param: float = Field(default=0.4, gt=0)
    """Surrogate clipping range."""
    vf_loss_coeff: float = Field(default=0.5, ge=0)
    """Weight of the value loss."""
    entropy_coeff: float = Field(default=0.01, ge=0)
    """Weight of the entropy bonus."""
    use_kl_loss: bool = False
    """Add a KL penalty against the target network."""
    kl_coeff: float = Field(default=1.0, ge=0)
    """KL penalty coefficient (with use_kl_loss)."""
    grad_clip: float = Field(default=40.0, gt=0)
    """Clip of the global gradient norm (the norm before clipping is reported as grad_norm)."""
    target_network_update_freq: PositiveInt = 2
    """Learner updates between target network syncs."""
    circular_buffer_num_batches: PositiveInt = 4
    """Batches the learner's circular buffer holds."""
    circular_buffer_iterations_per_batch: PositiveInt = 2
    """Times each batch is replayed from the circular buffer."""
    min_time_s_per_iteration: float = Field(default=1.0, ge=0)
    """Shortest training iteration: APPO samples and learns concurrently, an iteration is a
    reporting (and checkpointing) interval."""


class DQNTraining(Section):
    """DQN hyperparameters (double and dueling, prioritized replay by default)."""

    lr: float = Field(default=5e-4, gt=0)
    """Adam learning rate."""
    gamma: float = Field(default=0.99, gt=0, le=1)
    """Discount factor."""
    train_batch_size: PositiveInt = 32
    """Replayed transitions per gradient step."""
    replay_capacity: PositiveInt = 50_000
    """Transitions the replay buffer holds."""
    prioritized_replay: bool = True
    """Replay transitions in proportion to their TD error (false: uniformly)."""
    learning_starts: int = Field(default=1000, ge=0)
    """Environment steps sampled before the first update."""
    target_network_update_freq: PositiveInt = 500
    """Environment steps between target network syncs."""
    tau: float = Field(default=1.0, gt=0, le=1)
    """Target network update rate (1: copy)."""
    n_step: PositiveInt = 1
    """Steps in the bootstrapped return."""
    double_q: bool = True
    """Pick the target action with the online network (double DQN)."""
    dueling: bool = True
    """Separate value and advantage heads."""
    epsilon_start: float = Field(default=1.0, ge=0, le=1)
    """Exploration rate at the start."""
    epsilon_end: float = Field(default=0.05, ge=0, le=1)
    """Exploration rate after epsilon_steps environment steps."""
    epsilon_steps: PositiveInt = 10_000
    """Environment steps over which epsilon falls linearly."""
    training_intensity: float | None = Field(default=None, gt=0)
    """Replayed over sampled steps; None lets RLlib derive it from the batch sizes."""
    grad_clip: float = Field(default=40.0, gt=0)
    """Clip of the global gradient norm (the norm before clipping is reported as grad_norm)."""
    rollout_fragment_length: PositiveInt = 4
    """Steps each environment contributes per sample call."""

    def epsilon_at(self, env_steps: float) -> float:
        """The exploration rate after ``env_steps`` environment steps (the linear schedule)."""
        done = min(max(env_steps, 0.0) / self.epsilon_steps, 1.0)
        return self.epsilon_start + done * (self.epsilon_end - self.epsilon_start)


class SACTraining(Section):
    """SAC hyperparameters (soft actor-critic: twin Q networks, a tanh-squashed Gaussian actor and an
    entropy temperature tuned towards a target entropy). For Box action spaces."""

    actor_lr: float = Field(default=3e-4, gt=0)
    """Adam learning rate of the actor."""
    critic_lr: float = Field(default=3e-4, gt=0)
    """Adam learning rate of the Q networks."""
    alpha_lr: float = Field(default=3e-4, gt=0)
    """Adam learning rate of the entropy temperature."""
    gamma: float = Field(default=0.99, gt=0, le=1)
    """Discount factor."""
    tau: float = Field(default=0.005, gt=0, le=1)
    """Rate of the target Q networks' soft update after every learner update."""
    initial_alpha: float = Field(default=1.0, gt=0)
    """Entropy temperature at the start."""
    target_entropy: float | Literal["auto"] = "auto"
    """Entropy the temperature steers the actor towards; auto is minus the number of action dimensions."""
    train_batch_size: PositiveInt = 256
    """Replayed transitions per gradient step."""
    replay_capacity: PositiveInt = 100_000
    """Transitions the replay buffer holds."""
    prioritized_replay: bool = False
    """Replay transitions in proportion to their TD error (false: uniformly)."""
    learning_starts: int = Field(default=1000, ge=0)
    """Environment steps sampled (with the initial, untrained actor) before the first update."""
    n_step: PositiveInt = 1
    """Steps in the bootstrapped return."""
    twin_q: bool = True
    """Two Q networks, the smaller of their estimates in the target (clipped double Q)."""
    training_intensity: float | None = Field(default=None, gt=0)
    """Replayed over sampled steps; None lets RLlib derive it from the batch sizes."""
    grad_clip: float | None = Field(default=None, gt=0)
    """Clip of the global gradient norm of each network; None: no clipping."""
    rollout_fragment_length: PositiveInt | Literal["auto"] = 1
    """Steps each environment contributes per sample call (1: one update per sampled step)."""

    @field_validator("target_entropy", mode="before")
    @classmethod
    def _target_entropy(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, int | float) and not isinstance(value, bool)):
            return value
        raise ValueError("expected a number, or auto for minus the number of action dimensions")


TRAINING: dict[str, type[Section]] = {
    "PPO": PPOTraining,
    "APPO": APPOTraining,
    "DQN": DQNTraining,
    "SAC": SACTraining,
}


# --------------------------------------------------------------------------------------------------
# The whole file


class OnlineConfig(Section):
    """An online training run."""

    algorithm: Literal["PPO", "APPO", "DQN", "SAC"]
    """PPO (synchronous), APPO (asynchronous, IMPALA-style) or DQN for Discrete actions; SAC for Box
    actions."""
    env: str = Field(min_length=1)
    """Gymnasium environment id with Box observations, e.g. CartPole-v1 (Discrete actions) or
    Pendulum-v1 (Box actions with finite bounds, for SAC)."""
    env_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for gymnasium.make."""
    seed: int = Field(default=0, ge=0)
    """Seed of the networks, the environments and the samplers."""
    resources: Resources = Resources()
    model: Model = Model()
    training: PPOTraining | APPOTraining | DQNTraining | SACTraining
    stop: Stop = Stop()
    evaluation: Evaluation = Evaluation()
    checkpoint: Checkpoint = Checkpoint()
    export: Export = Export()
    metrics: Metrics = Metrics()
    tracking: Tracking = Tracking()

    @property
    def policy_name(self) -> str:
        if self.export.name is not None:
            return self.export.name
        return re.sub(r"[^A-Za-z0-9._-]", "-", f"{self.algorithm}-{self.env}".lower())[:100]

    @property
    def box_actions(self) -> bool:
        """Whether the algorithm acts in a Box (continuous) action space."""
        return self.algorithm in BOX_ALGORITHMS

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the form written to ``config.yaml`` and the model card."""
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _budget(self) -> OnlineConfig:
        if not isinstance(self.training, TRAINING[self.algorithm]):
            raise ValueError(
                f"training: holds {type(self.training).__name__}, not the {self.algorithm} section"
            )
        e = self.export
        if self.box_actions and (e.serve_temperature or e.serve_epsilon):
            raise ValueError(
                f"export: serve_temperature and serve_epsilon are for Discrete actions; {self.algorithm} "
                "serves Box actions, explored with serve_std"
            )
        if not self.box_actions and e.serve_std:
            raise ValueError(
                f"export: serve_std is for Box actions (SAC); {self.algorithm} serves Discrete actions, "
                "explored with serve_temperature and serve_epsilon"
            )
        s = self.stop
        if s.env_steps is None and s.iterations is None and s.time_s is None:
            raise ValueError("stop: set at least one budget (env_steps, iterations or time_s)")
        return self


# --------------------------------------------------------------------------------------------------
# Loading and errors


def _section_at(loc: tuple[int | str, ...], algorithm: str | None) -> type[BaseModel] | None:
    """The config class that holds the key at ``loc`` (for the list of accepted keys)."""
    cls: type[BaseModel] | None = OnlineConfig
    for part in loc[:-1]:
        if cls is None:
            return None
        if part == "training" and cls is OnlineConfig:
            cls = TRAINING.get(algorithm or "")
            continue
        field = cls.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return cls


def _format_errors(
    error: ValidationError, source: str, algorithm: str | None, prefix: tuple[str, ...]
) -> str:
    lines = []
    for e in error.errors():
        loc = prefix + tuple(str(p) for p in e["loc"])
        where = ".".join(loc) if loc else "(top level)"
        if e["type"] == "extra_forbidden":
            cls = _section_at(loc, algorithm)
            accepted = f"; accepted keys: {', '.join(cls.model_fields)}" if cls is not None else ""
            lines.append(f"{source}: {where}: unknown key{accepted}")
        elif e["type"] == "missing":
            lines.append(f"{source}: {where}: required key is missing")
        else:
            message = str(e["msg"]).removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if loc and not isinstance(e["input"], dict) else ""
            lines.append(f"{source}: {where}: {message}{got}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], item: str, source: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source} {item!r}: expected key=value, e.g. --set training.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} {item!r}: the value is not valid YAML ({e})") from None
    *parents, last = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source} {item!r}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[last] = value


def parse_config(data: Any, source: str = "config", overrides: list[str] | None = None) -> OnlineConfig:
    """Validate plain data (as loaded from YAML) with ``key.path=value`` overrides applied first."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping of keys (algorithm, env, ...), got {type(data).__name__}"
        )
    data = copy.deepcopy(data)
    for item in overrides or []:
        _set_dotted(data, item, "--set")
    algorithm = data.get("algorithm")
    if isinstance(algorithm, str):
        data["algorithm"] = algorithm = algorithm.upper()
    if algorithm not in TRAINING:
        got = "missing" if algorithm is None else f"got {algorithm!r}"
        raise ConfigError(f"{source}: algorithm: must be one of {', '.join(ALGORITHMS)} ({got})")
    training = data.get("training", {})
    if training is None:
        training = {}
    if not isinstance(training, dict):
        raise ConfigError(f"{source}: training: expected a mapping of hyperparameters, got {training!r}")
    try:
        data["training"] = TRAINING[algorithm].model_validate(training)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, algorithm, ("training",))) from None
    try:
        return OnlineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source, algorithm, ())) from None


def load_config(path: Path, overrides: list[str] | None = None) -> OnlineConfig:
    """Read and validate a YAML config file; :class:`ConfigError` names the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path), overrides)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def fields(cls: type[BaseModel]) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, meaning) of the plain fields of a section (sections themselves are skipped)."""
    rows = []
    for name, f in cls.model_fields.items():
        parts = typing.get_args(f.annotation) or (f.annotation,)
        if any(isinstance(p, type) and issubclass(p, BaseModel) for p in parts):
            continue
        default = "(required)" if f.is_required() else f.get_default(call_default_factory=True)
        rows.append((name, _type_name(f.annotation), default, " ".join((f.description or "").split())))
    return rows
