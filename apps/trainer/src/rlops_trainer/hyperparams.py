"""Hyperparameters: the config dataclass of every offline algorithm and of FQE, and ``key=value`` overrides.

One dataclass per algorithm, one documented field per hyperparameter (``rlops train config ALGO`` prints
them); each algorithm module (``algos/bc.py`` …) trains with its config from here. They are plain data
with no torch, so a config can be checked where torch is not installed: the retraining loop's config
(``rlops_delivery.config``) is validated by ``pulumi preview`` before anything is deployed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Protocol

ESTIMATORS: tuple[str, ...] = ("pdis", "wpdis", "fqe", "dr", "wdr")
"""Off-policy estimators (rlops_trainer.ope)."""


class LoopConfig(Protocol):
    """Fields every algorithm config has; the shared loop reads only these (and how the policy is served:
    ``serve_temperature`` and ``serve_epsilon`` for Discrete actions, ``serve_std`` for Box actions)."""

    steps: int
    batch_size: int
    seed: int
    max_grad_norm: float


def check_config(
    algorithm: str,
    cfg: LoopConfig,
    *,
    positive: tuple[str, ...] = (),
    widths: tuple[str, ...] = (),
    unit: tuple[str, ...] = (),
) -> None:
    """Raise ValueError naming the field when a config value is out of range.

    Checks the fields every config has, the served selection it has (``serve_temperature`` and
    ``serve_epsilon``, or ``serve_std``), plus ``positive`` (> 0), ``widths`` (non-empty tuples of
    positive ints) and ``unit`` (in [0, 1)) fields named by the algorithm.
    """

    def bad(name: str, rule: str) -> ValueError:
        return ValueError(f"{algorithm}: {name} must be {rule}, got {getattr(cfg, name)!r}")

    for name in ("steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise bad(name, ">= 1")
    if cfg.max_grad_norm < 0:
        raise bad("max_grad_norm", ">= 0 (0 turns clipping off)")
    if hasattr(cfg, "serve_epsilon") and not 0 <= cfg.serve_epsilon <= 1:
        raise bad("serve_epsilon", "in [0, 1]")
    if hasattr(cfg, "serve_temperature") and cfg.serve_temperature < 0:
        raise bad("serve_temperature", ">= 0 (0 is greedy)")
    if hasattr(cfg, "serve_std") and not (math.isfinite(cfg.serve_std) and cfg.serve_std >= 0):
        raise bad("serve_std", "a finite number >= 0 (0 serves the deterministic action)")
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise bad(name, "> 0")
    for name in widths:
        value = getattr(cfg, name)
        if not value or any(int(w) < 1 for w in value):
            raise bad(name, "one or more positive layer widths")
    for name in unit:
        if not 0 <= getattr(cfg, name) < 1:
            raise bad(name, "in [0, 1)")


@dataclass(frozen=True)
class ConfigField:
    """One hyperparameter of an algorithm config, as shown by ``rlops train config``."""

    name: str
    type: Any
    default: Any
    doc: str


def config_fields(cls: type[Any]) -> list[ConfigField]:
    """The fields of a config dataclass with their resolved types, defaults and docstrings.

    The docstrings are the string literals written under each field in the class body.
    """
    hints = typing.get_type_hints(cls)
    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    if isinstance(body, ast.ClassDef):
        for node, after in zip(body.body, body.body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return [
        ConfigField(f.name, hints[f.name], f.default, docs.get(f.name, "")) for f in dataclasses.fields(cls)
    ]


# --- overrides (``--set key=value``) ----------------------------------------------------------------


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        (item, *_rest) = typing.get_args(tp)
        return f"comma-separated {item.__name__}s"
    return str(getattr(tp, "__name__", tp))


def _convert(text: str, tp: Any) -> Any:
    """Parse ``text`` as a value of the config field type ``tp``; ValueError names what is accepted."""
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str:
        return text
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if not parts:
            raise ValueError("expected one or more comma-separated values")
        return tuple(_convert(p, item) for p in parts)
    if isinstance(tp, types.UnionType):
        raise ValueError(f"fields of type {tp} cannot be set from the command line")
    return tp(text)


def apply_overrides(cfg: Any, items: list[str]) -> Any:
    """A copy of ``cfg`` with ``key=value`` overrides, type-checked; ValueError says what was wrong."""
    fields = {f.name: f for f in config_fields(type(cfg))}
    changes: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        if key not in fields:
            raise ValueError(f"--set {item!r}: unknown field '{key}'; valid fields: {', '.join(fields)}")
        try:
            changes[key] = _convert(value, fields[key].type)
        except ValueError as exc:
            raise ValueError(
                f"--set {item!r}: '{value}' is not a valid {type_name(fields[key].type)} for '{key}' ({exc})"
            ) from exc
    return dataclasses.replace(cfg, **changes)


# --- the algorithms ---------------------------------------------------------------------------------


@dataclass
class BCConfig:
    """Hyperparameters of behaviour cloning."""

    steps: int = 5_000
    """Gradient steps."""
    batch_size: int = 256
    """Transitions per gradient step."""
    lr: float = 3e-4
    """Adam learning rate."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy network."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    serve_temperature: float = 0.0
    """Served selection: 0 is greedy; > 0 samples from softmax(logits / temperature)."""
    serve_epsilon: float = 0.0
    """Served selection: probability mass spread uniformly over actions."""
    seed: int = 0
    """Seeds weights, minibatch sampling and every RNG."""

    def __post_init__(self) -> None:
        check_config("bc", self, positive=("lr",), widths=("hidden",))


@dataclass
class CQLConfig:
    """Hyperparameters of discrete CQL."""

    steps: int = 10_000
    """Gradient steps."""
    batch_size: int = 256
    """Transitions per gradient step."""
    lr: float = 3e-4
    """Adam learning rate."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the Q-network."""
    alpha: float = 1.0
    """Weight of the conservative penalty logsumexp_a Q(s, a) - Q(s, a_data)."""
    tau: float = 0.005
    """Target network update rate: target <- (1 - tau) * target + tau * online (1.0 copies)."""
    target_update_every: int = 1
    """Gradient steps between target network updates (use with tau=1.0 for periodic hard copies)."""
    huber: bool = True
    """Huber (smooth L1) TD loss instead of squared error: large TD errors early on stay bounded."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    serve_temperature: float = 0.0
    """Served selection: 0 is greedy in Q; > 0 samples from softmax(Q / temperature)."""
    serve_epsilon: float = 0.01
    """Served selection: probability mass spread uniformly over actions (keeps propensities > 0)."""
    seed: int = 0
    """Seeds weights, minibatch sampling and every RNG."""

    def __post_init__(self) -> None:
        check_config("cql", self, positive=("lr",), widths=("hidden",), unit=("gamma",))
        if self.alpha < 0:
            raise ValueError(f"cql: alpha must be >= 0, got {self.alpha}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"cql: tau must be in (0, 1], got {self.tau}")
        if self.target_update_every < 1:
            raise ValueError(f"cql: target_update_every must be >= 1, got {self.target_update_every}")


@dataclass
class IQLConfig:
    """Hyperparameters of discrete IQL."""

    steps: int = 10_000
    """Gradient steps."""
    batch_size: int = 256
    """Transitions per gradient step."""
    lr: float = 3e-4
    """Adam learning rate (critics, value and policy)."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of every network."""
    expectile: float = 0.7
    """Expectile of Q that V estimates; 0.5 is the mean (SARSA), towards 1 the best data action."""
    beta: float = 3.0
    """Inverse temperature of the advantage weights exp(beta * A)."""
    max_weight: float = 100.0
    """Upper clip of the advantage weights."""
    tau: float = 0.005
    """Target critic update rate: target <- (1 - tau) * target + tau * online."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    serve_temperature: float = 0.0
    """Served selection: 0 is greedy; > 0 samples from softmax(logits / temperature)."""
    serve_epsilon: float = 0.0
    """Served selection: probability mass spread uniformly over actions."""
    seed: int = 0
    """Seeds weights, minibatch sampling and every RNG."""

    def __post_init__(self) -> None:
        check_config("iql", self, positive=("lr", "max_weight"), widths=("hidden",), unit=("gamma",))
        if not 0 < self.expectile < 1:
            raise ValueError(f"iql: expectile must be in (0, 1), got {self.expectile}")
        if self.beta < 0:
            raise ValueError(f"iql: beta must be >= 0, got {self.beta}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"iql: tau must be in (0, 1], got {self.tau}")


# --- the algorithms for continuous (Box) actions ------------------------------------------------------
# Defaults follow the papers and CORL's MuJoCo settings. The learners see actions scaled to [-1, 1] per
# dimension, so noise and clips below are in those units whatever the dataset's bounds.


def _check_tau(algorithm: str, tau: float) -> None:
    if not 0 < tau <= 1:
        raise ValueError(f"{algorithm}: tau must be in (0, 1], got {tau}")


@dataclass
class ContinuousBCConfig:
    """Hyperparameters of behaviour cloning on Box actions."""

    steps: int = 10_000
    """Gradient steps."""
    batch_size: int = 256
    """Transitions per gradient step."""
    lr: float = 3e-4
    """Adam learning rate."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the policy network."""
    gaussian: bool = False
    """False: regress the deterministic action tanh(u(s)) on the data action (squared error). True: fit
    a tanh-squashed Gaussian with a state-dependent log std (clamped to [-5, 2]) by maximum likelihood of
    the data action; the served action is its mean either way."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    serve_std: float = 0.0
    """Served selection: std of the Gaussian exploration noise added before the tanh (in pre-squash
    units); 0 serves the deterministic action."""
    seed: int = 0
    """Seeds weights, minibatch sampling and every RNG."""

    def __post_init__(self) -> None:
        check_config("bc", self, positive=("lr",), widths=("hidden",))


@dataclass
class TD3BCConfig:
    """Hyperparameters of TD3+BC (Fujimoto & Gu 2021)."""

    steps: int = 100_000
    """Gradient steps (the paper trains 1M on D4RL)."""
    batch_size: int = 256
    """Transitions per gradient step."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the actor and of each critic."""
    alpha: float = 2.5
    """Weight of Q against behaviour cloning: the actor minimises -lambda * Q + (pi(s) - a)^2 with
    lambda = alpha / mean |Q|."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise added to the target action (actions in [-1, 1])."""
    noise_clip: float = 0.5
    """The smoothing noise is clipped to [-noise_clip, noise_clip]."""
    policy_freq: int = 2
    """Critic updates per actor update; the target networks move with the actor."""
    tau: float = 0.005
    """Target network update rate: target <- (1 - tau) * target + tau * online."""
    max_grad_norm: float = 0.0
    """Clip each stage's gradient norm to this value; 0 turns clipping off."""
    serve_std: float = 0.0
    """Served selection: std of the Gaussian exploration noise added before the tanh (in pre-squash
    units); 0 serves the deterministic action."""
    seed: int = 0
    """Seeds weights, minibatch sampling, the smoothing noise and every RNG."""

    def __post_init__(self) -> None:
        check_config("td3bc", self, positive=("actor_lr", "critic_lr"), widths=("hidden",), unit=("gamma",))
        for name in ("alpha", "policy_noise", "noise_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"td3bc: {name} must be >= 0, got {getattr(self, name)}")
        if self.policy_freq < 1:
            raise ValueError(f"td3bc: policy_freq must be >= 1, got {self.policy_freq}")
        _check_tau("td3bc", self.tau)


@dataclass
class ContinuousIQLConfig:
    """Hyperparameters of IQL on Box actions (Kostrikov et al. 2021)."""

    steps: int = 100_000
    """Gradient steps (the paper trains 1M on D4RL)."""
    batch_size: int = 256
    """Transitions per gradient step."""
    lr: float = 3e-4
    """Adam learning rate (critics, value and policy)."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of every network."""
    expectile: float = 0.7
    """Expectile of Q that V estimates; 0.5 is the mean (SARSA), towards 1 the best data action."""
    beta: float = 3.0
    """Inverse temperature of the advantage weights exp(beta * A)."""
    max_weight: float = 100.0
    """Upper clip of the advantage weights."""
    tau: float = 0.005
    """Target critic update rate: target <- (1 - tau) * target + tau * online."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this value; 0 turns clipping off."""
    serve_std: float = 0.0
    """Served selection: std of the Gaussian exploration noise added before the tanh (in pre-squash
    units); 0 serves the deterministic action (the policy's mean)."""
    seed: int = 0
    """Seeds weights, minibatch sampling and every RNG."""

    def __post_init__(self) -> None:
        check_config("iql", self, positive=("lr", "max_weight"), widths=("hidden",), unit=("gamma",))
        if not 0 < self.expectile < 1:
            raise ValueError(f"iql: expectile must be in (0, 1), got {self.expectile}")
        if self.beta < 0:
            raise ValueError(f"iql: beta must be >= 0, got {self.beta}")
        _check_tau("iql", self.tau)


@dataclass
class ContinuousCQLConfig:
    """Hyperparameters of CQL on Box actions (Kumar et al. 2020; SAC-based, as in CORL and d3rlpy)."""

    steps: int = 100_000
    """Gradient steps (the paper trains 1M on D4RL)."""
    batch_size: int = 256
    """Transitions per gradient step."""
    actor_lr: float = 3e-5
    """Adam learning rate of the SAC actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the twin critics."""
    temperature_lr: float = 3e-5
    """Adam learning rate of the log entropy temperature (with learn_temperature)."""
    gamma: float = 0.99
    """Discount factor."""
    hidden: tuple[int, ...] = (256, 256)
    """Hidden layer widths of the actor and of each critic."""
    alpha: float = 5.0
    """Weight of the conservative penalty logsumexp_a Q(s, a) - Q(s, a_data) in each critic's loss."""
    n_action_samples: int = 10
    """Actions sampled per state from each proposal (uniform, the policy at s, the policy at s') for
    the logsumexp of the penalty."""
    initial_temperature: float = 1.0
    """Entropy temperature of the SAC actor at the start."""
    learn_temperature: bool = True
    """Tune the temperature so that the policy's entropy tracks target_entropy_per_dim * action_dim."""
    target_entropy_per_dim: float = -1.0
    """Target entropy per action dimension for the temperature tuning (SAC's rule: -1)."""
    backup_entropy: bool = False
    """Subtract alpha * log pi(a'|s') from the bootstrapped value (soft Q-learning); CORL leaves it out."""
    lagrange: bool = False
    """Tune the penalty's multiplier so that the penalty stays near target_action_gap (CQL-Lagrange)."""
    target_action_gap: float = 10.0
    """With lagrange: the penalty value the multiplier aims at."""
    lagrange_lr: float = 3e-4
    """With lagrange: Adam learning rate of the log multiplier."""
    tau: float = 0.005
    """Target critic update rate: target <- (1 - tau) * target + tau * online."""
    max_grad_norm: float = 0.0
    """Clip each stage's gradient norm to this value; 0 turns clipping off."""
    serve_std: float = 0.0
    """Served selection: std of the Gaussian exploration noise added before the tanh (in pre-squash
    units); 0 serves the deterministic action (the actor's mean)."""
    seed: int = 0
    """Seeds weights, minibatch sampling, every sampled action and every RNG."""

    def __post_init__(self) -> None:
        check_config(
            "cql",
            self,
            positive=("actor_lr", "critic_lr", "temperature_lr", "lagrange_lr", "initial_temperature"),
            widths=("hidden",),
            unit=("gamma",),
        )
        if self.alpha < 0:
            raise ValueError(f"cql: alpha must be >= 0, got {self.alpha}")
        if self.n_action_samples < 1:
            raise ValueError(f"cql: n_action_samples must be >= 1, got {self.n_action_samples}")
        _check_tau("cql", self.tau)


# --- off-policy evaluation ---------------------------------------------------------------------------


@dataclass
class FQEConfig:
    """Fitted Q evaluation. Defaults suit CartPole-sized problems (gamma 0.99, 50k–100k transitions)."""

    hidden: tuple[int, ...] = (64, 64)
    """Widths of the Q network's hidden layers (ReLU)."""
    lr: float = 1e-3
    """Adam learning rate (before the decay)."""
    steps: int = 24000
    """Gradient steps in total. A candidate that survives much longer than the logged episodes needs
    values carried back over long horizons: on the offline benchmark's CartPole logs (docs/benchmarks.md)
    12,000 steps left such a candidate 19 % too high, 24,000 brought it to 4 %."""
    batch_size: int = 256
    """Transitions per gradient step, sampled uniformly with replacement."""
    target_update: int = 10
    """Gradient steps between copies of the Q network into the target network. Each copy is one
    Bellman backup; information travels about ``steps / target_update`` steps back in time, so keep
    that ratio well above the effective horizon ``1 / (1 - gamma)`` (here 2400 against 100)."""
    lr_decay_from: float = 0.5
    """Fraction of ``steps`` after which the learning rate decays linearly to 0. The constant phase
    propagates values; the decay removes minibatch noise from the final Q, which matters to the doubly
    robust estimators: they multiply its Bellman residuals by the importance weights. 1: no decay."""
    clip_targets: bool = True
    """Clip regression targets to the range of returns the logged rewards allow (see
    :func:`value_range`); keeps extrapolation errors from compounding through the target network."""
    seed: int = 0
    """Seeds the network initialisation and the minibatch order (member ``k`` of the ensemble uses
    ``seed + k``)."""
    ensemble: int = 3
    """Q networks fitted independently. Their mean is the estimate and their disagreement widens the
    interval; 1 fits a single network whose interval covers only the spread of initial states."""
    max_spread: float = 0.1
    """Warn when the ensemble's values (max - min) differ by more than this fraction of the value."""

    def __post_init__(self) -> None:
        if not self.max_spread > 0:
            raise ValueError(f"FQEConfig.max_spread must be > 0, got {self.max_spread}")
        for name in ("steps", "batch_size", "target_update", "ensemble"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"FQEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.lr_decay_from <= 1.0:
            raise ValueError(f"FQEConfig.lr_decay_from must be in [0, 1], got {self.lr_decay_from}")
        if not self.lr > 0:
            raise ValueError(f"FQEConfig.lr must be > 0, got {self.lr}")
        if not self.hidden or any(int(w) < 1 for w in self.hidden):
            raise ValueError(f"FQEConfig.hidden must be positive widths, got {self.hidden}")


OFFLINE: dict[str, type[Any]] = {"bc": BCConfig, "cql": CQLConfig, "iql": IQLConfig}
"""The config dataclass of each offline algorithm for Discrete actions."""

OFFLINE_CONTINUOUS: dict[str, type[Any]] = {
    "bc": ContinuousBCConfig,
    "cql": ContinuousCQLConfig,
    "iql": ContinuousIQLConfig,
    "td3bc": TD3BCConfig,
}
"""The config dataclass of each offline algorithm for Box actions."""
