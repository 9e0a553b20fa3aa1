"""Off-policy evaluation: the value of a target policy from transitions another policy logged.

The value of a policy is the expected discounted return of an episode, ``E[sum_t gamma^t r_t]``, over
the dataset's initial-state distribution. For Discrete actions the target policy is a function from a
batch of observations to action probabilities (``probs_fn``); :func:`policy_probs_fn` builds one from a
policy module. For Box actions it is a :class:`ContinuousTarget`: the actions it takes (one draw per
observation, seeded) and, when it explores (``std > 0``), the log-density of given actions;
:func:`policy_target` builds one from a continuous policy module.

Estimators (``evaluate`` runs any subset):

* ``pdis``: per-decision importance sampling (Precup et al. 2000).
* ``wpdis``: its weighted form, self-normalised at every step.
* ``fqe``: fitted Q evaluation (Le et al. 2019): a small network regressed on
  ``r + gamma * (1 - terminated) * sum_a' pi(a'|s') Q_target(s', a')``. For Box actions the network
  takes the (normalised) observation and action and the sum becomes an average of ``Q_target(s', a')``
  over a few actions drawn from ``pi(.|s')`` (one for a deterministic policy); they are drawn once,
  seeded, before the fit.
* ``dr``: per-decision doubly robust (Jiang & Li 2016) with the FQE model.
* ``wdr``: weighted doubly robust (Thomas & Brunskill 2016) with the FQE model.
* ``behavior`` (:func:`behavior_value`): the on-policy mean discounted return of the logged episodes.

Conventions, chosen once for every estimator:

* Episodes are padded to the longest one. After its end an episode sits in an absorbing state: reward 0,
  value 0, importance weight frozen at its final value. The weighted estimators therefore normalise at
  step ``t`` over every episode, which keeps them consistent when episodes differ in length.
* Importance-sampling and doubly robust estimates cover the logged horizon: a truncated episode
  contributes the rewards it logged. FQE bootstraps through truncation (a time limit is not part of the
  state), so it estimates the untruncated value; the two differ by at most ``gamma^T`` times the value
  at the truncation step ``T``.
* Intervals are percentile bootstraps over episodes. FQE fits a small ensemble of Q networks
  (``FQEConfig.ensemble``, different seeds); the estimate averages them and each bootstrap resample
  is scored with one of them in turn, so the interval covers both the spread of initial states and
  the disagreement between the fitted models. Where the data do not cover the states a policy
  visits, the models extrapolate differently: that is the error a single fixed model's interval
  would hide (refitting per resample would multiply the cost by ``n_bootstrap``). The doubly robust
  intervals are built the same way. Models that disagree by more than ``FQEConfig.max_spread`` of
  the value add a warning to the estimate.
* Box actions: the importance ratio is ``exp(log pi(a|s) - behavior_logp)``, a ratio of densities
  (``behavior_logp`` is the behaviour policy's log-density of the logged action in raw action units).
  A deterministic target (``std == 0``) is a point mass, which has no density: importance sampling and
  doubly robust estimates are undefined for it and only ``fqe`` runs. Where the doubly robust estimators
  need ``V(s) = E_pi Q(s, a)`` it is the mean of ``Q`` over ``action_samples`` seeded draws.
* Importance weights can be clipped (``clip_weights``): cumulative weights above the cap are set to it,
  which trades bias for variance. Off by default.
* Everything runs on numpy arrays of shape (episodes, longest episode): memory grows with their product
  (100k CartPole transitions: a few tens of MB).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from rlops_trainer.datasets import Transitions
from rlops_trainer.hyperparams import ESTIMATORS, FQEConfig
from rlops_trainer.policy import Selection, mlp
from rlops_trainer.training import adam

ProbsFn = Callable[[np.ndarray], np.ndarray]
"""A target policy: observations ``[N, obs_dim]`` to action probabilities ``[N, n_actions]``."""

ACTION_SAMPLES = 8
"""Box actions, stochastic target: actions drawn from pi(.|s) per state to average Q over (FQE targets,
V(s) of the doubly robust estimators). Their Monte Carlo error enters the FQE regression target as noise,
which the fit averages out; more samples cost memory (``samples x transitions x action_dim`` floats)."""

NEEDS_PROPENSITIES: frozenset[str] = frozenset({"pdis", "wpdis", "dr", "wdr"})
NEEDS_MODEL: frozenset[str] = frozenset({"fqe", "dr", "wdr"})


class OPEError(ValueError):
    """The data or the target policy cannot support the requested estimate."""


@dataclass
class Estimate:
    """One estimate of a policy value with its bootstrap interval and weight diagnostics."""

    estimator: str
    value: float
    lower: float
    upper: float
    confidence: float
    n_episodes: int
    ess: float | None = None
    """Kish effective sample size of the per-episode cumulative importance weights (None: no weights).
    With weights frozen after an episode ends this is also the per-decision ESS at the horizon."""
    ess_fraction: float | None = None
    """``ess / n_episodes``."""
    ess_collapsed: bool = False
    """The ESS fell below the collapse threshold: the estimate rests on a handful of episodes."""
    collapse_step: int | None = None
    """First step at which the per-decision ESS fell below the threshold (None: it never did)."""
    interval: str = "episodes"
    """What the bootstrap resampled: ``episodes``, ``initial states`` or either of them with ``and
    <k> Q models``."""
    members: list[float] | None = None
    """The value under each fitted Q model of the FQE ensemble (None: no model)."""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Estimate:
        return cls(**{**d, "warnings": list(d.get("warnings", []))})


# ----------------------------------------------------------------------------------------------------
# Target policies


def policy_probs_fn(policy: nn.Module, selection: Selection, batch_size: int = 65536) -> ProbsFn:
    """Wrap a module with ``action_probs(obs, temperature, epsilon)`` (a ``PolicyModule`` or a loaded
    TorchScript policy) as a ``probs_fn`` that serves numpy batches."""
    if not hasattr(policy, "action_probs"):
        raise TypeError(f"{type(policy).__name__} has no action_probs(obs, temperature, epsilon) method")
    tensors = list(policy.buffers()) + list(policy.parameters())
    device = tensors[0].device if tensors else torch.device("cpu")
    temperature, epsilon = float(selection.temperature), float(selection.epsilon)
    action_probs = cast(Callable[[torch.Tensor, float, float], torch.Tensor], policy.action_probs)

    def probs_fn(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        out = []
        with torch.no_grad():
            for i in range(0, max(len(x), 1), batch_size):
                t = torch.tensor(x[i : i + batch_size], device=device)
                out.append(action_probs(t, temperature, epsilon).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    return probs_fn


def _target_probs(probs_fn: ProbsFn, obs: np.ndarray, n_actions: int, what: str) -> np.ndarray:
    probs = np.asarray(probs_fn(obs), dtype=np.float64)
    if probs.shape != (len(obs), n_actions):
        raise OPEError(
            f"target policy returned probabilities of shape {probs.shape} for {what}; "
            f"expected ({len(obs)}, {n_actions}) (one row per observation, one column per action)"
        )
    bad = ~np.isfinite(probs).all(axis=1) | (probs < -1e-6).any(axis=1)
    bad |= np.abs(probs.sum(axis=1) - 1.0) > 1e-4
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise OPEError(
            f"target policy returned an invalid distribution for {what} row {row}: {probs[row].tolist()} "
            "(probabilities must be finite, non-negative and sum to 1)"
        )
    return np.clip(probs, 0.0, 1.0)


@dataclass(frozen=True)
class ContinuousTarget:
    """A target policy over a Box action space, as the estimators use it."""

    sample: Callable[[np.ndarray, int], np.ndarray]
    """``(observations [N, d], seed) -> actions [N, k]`` in raw units: one draw from pi(.|s) per row (the
    deterministic action when the policy does not explore). The same seed gives the same draw."""
    log_prob: Callable[[np.ndarray, np.ndarray], np.ndarray] | None
    """``(observations [N, d], actions [N, k]) -> log pi(a|s) [N]``; None for a deterministic policy, which
    has no density."""

    @property
    def stochastic(self) -> bool:
        return self.log_prob is not None


Target = ProbsFn | ContinuousTarget
"""What :func:`evaluate` values: a ``probs_fn`` (Discrete) or a :class:`ContinuousTarget` (Box)."""


def policy_target(policy: nn.Module, selection: Selection, batch_size: int = 65536) -> ContinuousTarget:
    """Wrap a module with ``forward``, ``act(obs, std)`` and ``log_prob(obs, action, std)`` (a
    ``ContinuousPolicyModule`` or a loaded TorchScript Box policy) as the target ``selection.std`` gives."""
    if not (hasattr(policy, "act") and hasattr(policy, "log_prob")):
        raise TypeError(
            f"{type(policy).__name__} has no act(obs, std) and log_prob(obs, action, std) methods"
        )
    tensors = list(policy.buffers()) + list(policy.parameters())
    device = tensors[0].device if tensors else torch.device("cpu")
    std = float(selection.std)
    act = cast(Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]], policy.act)
    log_prob = cast(Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], policy.log_prob)

    def batches(x: np.ndarray) -> Iterator[slice]:
        return (slice(i, i + batch_size) for i in range(0, len(x), batch_size))

    def sample(obs: np.ndarray, seed: int) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)
        out = []
        # The policy draws its noise from torch's generator: seed it here and leave the caller's alone.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for rows in batches(x):
                out.append(act(torch.tensor(x[rows], device=device), std)[0].double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))

    def density(obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        x, a = np.asarray(obs, dtype=np.float32), np.asarray(action, dtype=np.float32)
        out = []
        with torch.no_grad():
            for rows in batches(x):
                t, u = torch.tensor(x[rows], device=device), torch.tensor(a[rows], device=device)
                out.append(log_prob(t, u, std).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return ContinuousTarget(sample=sample, log_prob=density if std > 0.0 else None)


def _target_actions(
    target: ContinuousTarget, obs: np.ndarray, data: Transitions, n: int, seed: int, what: str
) -> np.ndarray:
    """``[S, N, k]`` actions of ``target`` at ``obs``: ``n`` seeded draws when it explores, else its one
    deterministic action. Checked to be finite and inside the dataset's bounds."""
    low, high = data.meta.action_bounds()
    draws = n if target.stochastic else 1
    # One stream per (seed, what, draw): the draws at s and at s' are independent of each other.
    stream = 0 if what == "observation" else 1
    seeds = [int(np.random.SeedSequence([seed, stream, i]).generate_state(1)[0]) for i in range(draws)]
    out = np.stack([np.asarray(target.sample(obs, s), dtype=np.float64) for s in seeds])
    if out.shape[1:] != (len(obs), len(low)):
        raise OPEError(
            f"target policy returned actions of shape {out.shape[1:]} for {what}; expected "
            f"({len(obs)}, {len(low)}) (one row per observation, one column per action dimension)"
        )
    slack = 1e-5 * (high - low)
    bad = ~np.isfinite(out).all(axis=2) | ((out < low - slack) | (out > high + slack)).any(axis=2)
    if bad.any():
        draw, row = (int(i[0]) for i in np.nonzero(bad))
        raise OPEError(
            f"target policy returned an action outside the action space for {what} row {row}: "
            f"{out[draw, row].tolist()} (accepted: finite, within [{low.tolist()}, {high.tolist()}])"
        )
    return out


def _target_log_density(target: ContinuousTarget, data: Transitions) -> np.ndarray:
    """log pi(a_t|s_t) of every logged action, checked to be a number (-inf is allowed: zero density)."""
    if target.log_prob is None:
        raise OPEError(_DETERMINISTIC)
    logp = np.asarray(target.log_prob(data.observation, data.action), dtype=np.float64)
    if logp.shape != (len(data),):
        raise OPEError(f"target policy returned log-densities of shape {logp.shape}; expected ({len(data)},)")
    if np.isnan(logp).any() or np.isposinf(logp).any():
        row = int(np.flatnonzero(np.isnan(logp) | np.isposinf(logp))[0])
        raise OPEError(f"target policy returned log-density {logp[row]} for the logged action at row {row}")
    return logp


_DETERMINISTIC = (
    "the target policy is deterministic (selection std 0): for continuous actions it puts all its mass on "
    "one action, which has no density, so the importance ratio pi(a|s) / mu(a|s) of importance-sampling "
    "and doubly robust estimators (pdis, wpdis, dr, wdr) is undefined; use fqe, or evaluate the policy "
    "with exploration noise (std > 0)"
)


def possible_estimators(data: Transitions, stochastic: bool = True) -> tuple[str, ...]:
    """The estimators that can run on ``data`` for a target policy: all of them with behaviour
    propensities (and, for Box actions, a stochastic target), else fqe alone."""
    if data.has_propensities and (stochastic or not data.meta.is_continuous):
        return ESTIMATORS
    return ("fqe",)


# ----------------------------------------------------------------------------------------------------
# Episodes padded to the longest


@dataclass
class _Padded:
    n: int  # episodes
    horizon: int
    lengths: np.ndarray  # [E]
    episode: np.ndarray  # [N] episode index of every row
    t: np.ndarray  # [N] position of every row inside its episode
    starts: np.ndarray  # [E] first row of every episode
    discount: np.ndarray  # [H] gamma^t

    def pad(self, values: np.ndarray) -> np.ndarray:
        """Per-row values into ``[E, H]``, zero after each episode's end."""
        out = np.zeros((self.n, self.horizon), dtype=np.float64)
        out[self.episode, self.t] = values
        return out


def _padded(data: Transitions, gamma: float) -> _Padded:
    if len(data) == 0:
        raise OPEError("the dataset has no transitions")
    if not 0.0 < gamma <= 1.0:
        raise OPEError(f"gamma must be in (0, 1], got {gamma}")
    starts = data.episode_starts()
    lengths = np.diff(np.append(starts, len(data)))
    episode = np.repeat(np.arange(len(starts)), lengths)
    t = np.arange(len(data)) - np.repeat(starts, lengths)
    horizon = int(lengths.max())
    discount = gamma ** np.arange(horizon, dtype=np.float64)
    return _Padded(len(starts), horizon, lengths, episode, t, starts, discount)


def _check_propensities(data: Transitions, estimator: str) -> None:
    missing = np.isnan(data.behavior_logp)
    if missing.any():
        raise OPEError(
            f"{estimator} needs the behaviour log-propensity of every logged action, but column "
            f"'behavior_logp' is missing (NaN) in {int(missing.sum())} of {len(data)} rows "
            f"(first at row {int(np.flatnonzero(missing)[0])}); importance-sampling and doubly robust "
            "estimators (pdis, wpdis, dr, wdr) cannot run on this dataset; use fqe"
        )


def _cumulative_weights(
    data: Transitions, pad: _Padded, target_logp: np.ndarray, clip_weights: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative importance weights ``rho_{0:t}`` ``[E, H]`` (frozen after the end) and ``rho_{0:t-1}``;
    ``target_logp`` is log pi(a_t|s_t) of every logged action."""
    log_ratio = target_logp - data.behavior_logp.astype(np.float64)
    # log-space cumsum, then exp: a zero target probability gives -inf and so a weight of exactly 0.
    with np.errstate(invalid="ignore", over="ignore"):
        log_rho = np.cumsum(pad.pad(log_ratio), axis=1)
        rho = np.exp(log_rho)
    if clip_weights is not None:
        if not clip_weights > 0:
            raise OPEError(f"clip_weights must be > 0 or None, got {clip_weights}")
        rho = np.minimum(rho, clip_weights)
    rho_prev = np.concatenate([np.ones((pad.n, 1)), rho[:, :-1]], axis=1)
    return rho, rho_prev


def kish_ess(weights: np.ndarray, axis: int = 0) -> np.ndarray:
    """Kish effective sample size ``(sum w)^2 / sum w^2`` (0 where every weight is 0)."""
    w = np.asarray(weights, dtype=np.float64)
    s1, s2 = w.sum(axis=axis), (w * w).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ess = np.where(s2 > 0, s1 * s1 / np.where(s2 > 0, s2, 1.0), 0.0)
    return np.asarray(ess)


def ess_threshold(n_episodes: int, min_ess: float, min_ess_fraction: float) -> float:
    """ESS below which the weights are said to have collapsed."""
    return max(float(min_ess), float(min_ess_fraction) * n_episodes)


# ----------------------------------------------------------------------------------------------------
# Bootstrap


def _resample_counts(n: int, n_bootstrap: int, seed: int, chunk: int = 128) -> Iterator[np.ndarray]:
    """Episode multiplicities for each bootstrap resample, in chunks of ``[b, n]`` (float64).

    The same seed gives the same resamples to every estimator, so their intervals are paired."""
    rng = np.random.default_rng(seed)
    uniform = np.full(n, 1.0 / n)
    for i in range(0, n_bootstrap, chunk):
        yield rng.multinomial(n, uniform, size=min(chunk, n_bootstrap - i)).astype(np.float64)


def _percentile(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size < samples.size or finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _check_bootstrap(n_bootstrap: int, confidence: float) -> None:
    if n_bootstrap < 1:
        raise OPEError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise OPEError(f"confidence must be in (0, 1), got {confidence}")


def _members(n_rows: int, start: int, k: int) -> np.ndarray:
    """Which ensemble member scores each of ``n_rows`` resamples starting at resample ``start``: in
    turn, so every member scores the same share of them."""
    return (start + np.arange(n_rows)) % k


def _mean_with_ci(
    per_episode: np.ndarray, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float, float]:
    """Mean of per-episode contributions and its percentile bootstrap interval over episodes.

    ``per_episode`` is ``[E]``, or ``[K, E]`` with one row per Q model of an ensemble: then the mean is
    over models too, and each resample is scored with one model in turn."""
    rows = np.atleast_2d(per_episode)
    k, n = rows.shape
    samples, start = [], 0
    for c in _resample_counts(n, n_bootstrap, seed):
        samples.append(np.einsum("be,be->b", c, rows[_members(len(c), start, k)]) / n)
        start += len(c)
    lo, hi = _percentile(np.concatenate(samples), confidence)
    return float(rows.mean()), lo, hi


@dataclass
class _DRParts:
    rho_r_minus_q: np.ndarray  # [E, H] rho_{0:t} (r_t - Q(s_t, a_t))
    rho_prev_v: np.ndarray  # [E, H] rho_{0:t-1} V(s_t)
    discount: np.ndarray  # [H]


def _weighted(counts: np.ndarray, rho: np.ndarray, rho_prev: np.ndarray, parts: _DRParts) -> np.ndarray:
    """Weighted (self-normalised per step) doubly robust value for every row of ``counts`` ``[b, E]``.

    With ``q = v = 0`` this is weighted per-decision importance sampling."""
    with np.errstate(invalid="ignore", divide="ignore"):
        s = counts @ rho
        s_prev = counts @ rho_prev
        now = np.where(s > 0, (counts @ parts.rho_r_minus_q) / np.where(s > 0, s, 1.0), 0.0)
        before = np.where(s_prev > 0, (counts @ parts.rho_prev_v) / np.where(s_prev > 0, s_prev, 1.0), 0.0)
    return np.asarray((now + before) @ parts.discount)


# ----------------------------------------------------------------------------------------------------
# Fitted Q evaluation


@dataclass
class FQEModel:
    """A fitted Q function for one target policy, in reward units: ``q_values(obs)`` gives every action's
    value (Discrete), ``q_at(obs, action)`` the value of given actions (Box)."""

    net: nn.Module
    scale: float  # the network predicts Q * scale
    final_loss: float
    config: FQEConfig

    def q_values(self, obs: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(obs), batch_size):
                t = torch.tensor(np.asarray(obs[i : i + batch_size], dtype=np.float32))
                out.append(self.net(t).double().numpy())
        return np.concatenate(out) / self.scale if out else np.zeros((0, 0))

    def q_at(self, obs: np.ndarray, action: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """``Q(s, a)`` ``[N]`` of a Box model for observations ``[N, d]`` and raw actions ``[N, k]``."""
        out = []
        with torch.no_grad():
            for i in range(0, len(obs), batch_size):
                o = torch.tensor(np.asarray(obs[i : i + batch_size], dtype=np.float32))
                a = torch.tensor(np.asarray(action[i : i + batch_size], dtype=np.float32))
                out.append(self.net(o, a).double().numpy())
        return np.concatenate(out) / self.scale if out else np.zeros(0)

    def expected_q(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """``mean_s Q(obs, actions[s])`` ``[N]`` over draws ``actions`` ``[S, N, k]``: a Box policy's V."""
        return np.mean([self.q_at(obs, a) for a in actions], axis=0)


class _StateAction(nn.Module):
    """Q(s, a) of a Box action space: the network sees the normalised observation and the action scaled
    to [-1, 1] per dimension, side by side, and returns one value."""

    obs_mean: torch.Tensor
    obs_std: torch.Tensor
    action_mid: torch.Tensor
    action_half: torch.Tensor

    def __init__(
        self, net: nn.Module, mean: np.ndarray, std: np.ndarray, low: np.ndarray, high: np.ndarray
    ) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("obs_mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("obs_std", torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        self.register_buffer("action_mid", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_half", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat(
            [(obs - self.obs_mean) / self.obs_std, (action - self.action_mid) / self.action_half], -1
        )
        return self.net(x).squeeze(-1)


class _Normalised(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net((obs - self.mean) / self.std)


def value_range(data: Transitions, gamma: float) -> tuple[float, float]:
    """The discounted returns any policy can earn from this data's rewards: each reward lies in the
    logged range and an episode may end at any step."""
    if len(data) == 0:
        return 0.0, 0.0
    lengths = np.diff(np.append(data.episode_starts(), len(data)))
    steps = 1.0 / (1.0 - gamma) if gamma < 1.0 else float(lengths.max())
    return min(0.0, float(data.reward.min())) * steps, max(0.0, float(data.reward.max())) * steps


def _returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted returns-to-go of padded ``[E, H]`` rewards."""
    out = np.zeros_like(rewards)
    acc = np.zeros(rewards.shape[0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        acc = rewards[:, t] + gamma * acc
        out[:, t] = acc
    return out


def fit_fqe(
    data: Transitions,
    next_probs: np.ndarray,
    *,
    gamma: float,
    config: FQEConfig | None = None,
    progress: bool = False,
    label: str = "FQE",
) -> FQEModel:
    """Fit one Q^pi by fitted Q evaluation (``config.seed``; ``config.ensemble`` is for
    :func:`fit_fqe_ensemble`). ``next_probs`` is what pi does at every row's next observation: for a
    Discrete space its probabilities ``[N, n_actions]``, for a Box space ``S`` actions drawn from
    pi(.|s') ``[S, N, k]`` (``S = 1`` for a deterministic policy) whose Q values are averaged."""
    cfg = config or FQEConfig()
    # Regressing on values of order 1 keeps Adam's step size (and so its noise) commensurate with the
    # values; the logged returns-to-go give that order without knowing the target policy's value.
    pad = _padded(data, gamma)
    g = np.abs(_returns_to_go(pad.pad(data.reward.astype(np.float64)), gamma)).max()
    lo, hi = value_range(data, gamma)
    scale = 1.0 / g if g > 0 else (1.0 / (hi - lo) if hi > lo else 1.0)
    # Targets outside the returns any policy can earn are extrapolation errors; clipping them stops a
    # target network from feeding such errors back into itself (they compound over the horizon).
    y_lo, y_hi = (lo * scale, hi * scale) if cfg.clip_targets else (-math.inf, math.inf)
    generator = torch.Generator().manual_seed(cfg.seed)
    both = np.concatenate([data.observation, data.next_observation]).astype(np.float64)
    continuous = data.meta.is_continuous
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        if continuous:
            net = mlp(data.meta.obs_dim + data.meta.action_dim, 1, cfg.hidden)
        else:
            net = mlp(data.meta.obs_dim, data.meta.n_actions, cfg.hidden)
    q: nn.Module
    if continuous:
        _check_next_actions(data, next_probs)
        q = _StateAction(net, both.mean(0), both.std(0), *data.meta.action_bounds())
    else:
        q = _Normalised(net, both.mean(0), both.std(0))
    target = copy.deepcopy(q).requires_grad_(False)
    opt = adam(list(q.parameters()), cfg.lr)
    decay_start = int(cfg.lr_decay_from * cfg.steps)

    obs = torch.tensor(data.observation, dtype=torch.float32)
    nxt = torch.tensor(data.next_observation, dtype=torch.float32)
    rew = torch.tensor(data.reward, dtype=torch.float32) * scale
    cont = gamma * (1.0 - torch.tensor(data.terminated, dtype=torch.float32))
    pn = torch.tensor(next_probs, dtype=torch.float32)

    # The one difference between the action spaces: how Q is read at the logged action and how the
    # target policy's next-state value is formed from the target network.
    if continuous:
        act = torch.tensor(data.action, dtype=torch.float32)

        def predicted(idx: torch.Tensor) -> torch.Tensor:
            return q(obs[idx], act[idx])

        def next_value(idx: torch.Tensor) -> torch.Tensor:
            draws = pn[:, idx]  # [S, B, k]
            return target(nxt[idx].expand(len(draws), -1, -1), draws).mean(0)

    else:
        act = torch.tensor(data.action, dtype=torch.int64)

        def predicted(idx: torch.Tensor) -> torch.Tensor:
            return q(obs[idx]).gather(1, act[idx, None]).squeeze(1)

        def next_value(idx: torch.Tensor) -> torch.Tensor:
            return (pn[idx] * target(nxt[idx])).sum(-1)

    bar = _progress(label, cfg.steps) if progress else None
    params, target_params = list(q.parameters()), list(target.parameters())
    loss_sum, loss_n, final_loss = torch.zeros(()), 0, float("nan")
    try:
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(0, len(data), (cfg.batch_size,), generator=generator)
            with torch.no_grad():
                y = (rew[idx] + cont[idx] * next_value(idx)).clamp(y_lo, y_hi)
            pred = predicted(idx)
            loss = torch.nn.functional.mse_loss(pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step > decay_start:
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * (cfg.steps - step) / max(cfg.steps - decay_start, 1)
            loss_sum += loss.detach()
            loss_n += 1
            if step % cfg.target_update == 0:
                with torch.no_grad():
                    for tp, p in zip(target_params, params, strict=True):
                        tp.copy_(p)
            if step % 500 == 0 or step == cfg.steps:
                final_loss = float(loss_sum) / loss_n
                loss_sum, loss_n = torch.zeros(()), 0
                if bar is not None:
                    bar[0].update(bar[1], completed=step)
    finally:
        if bar is not None:
            bar[0].stop()
    q.eval()
    return FQEModel(net=q, scale=scale, final_loss=final_loss, config=cfg)


def _check_next_actions(data: Transitions, next_actions: np.ndarray) -> None:
    shape = np.shape(next_actions)
    if len(shape) != 3 or shape[1:] != (len(data), data.meta.action_dim) or shape[0] < 1:
        raise OPEError(
            f"FQE on a Box action space needs the target's actions at the next observations as "
            f"(draws, {len(data)}, {data.meta.action_dim}), got {shape}"
        )


def fit_fqe_ensemble(
    data: Transitions,
    next_probs: np.ndarray,
    *,
    gamma: float,
    config: FQEConfig | None = None,
    progress: bool = False,
) -> list[FQEModel]:
    """``config.ensemble`` FQE models, member ``k`` seeded with ``config.seed + k``."""
    cfg = config or FQEConfig()
    return [
        fit_fqe(
            data,
            next_probs,
            gamma=gamma,
            config=dataclasses.replace(cfg, seed=cfg.seed + k),
            progress=progress,
            label=f"FQE {k + 1}/{cfg.ensemble}" if cfg.ensemble > 1 else "FQE",
        )
        for k in range(cfg.ensemble)
    ]


def _progress(label: str, total: int) -> tuple[Any, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # Progress goes to stderr, so stdout carries only results.
    p = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    p.start()
    return p, p.add_task(label, total=total)


# ----------------------------------------------------------------------------------------------------
# Estimators


def _ess_fields(
    rho: np.ndarray, n: int, min_ess: float, min_ess_fraction: float, estimator: str
) -> dict[str, Any]:
    ess = float(kish_ess(rho[:, -1]))
    threshold = ess_threshold(n, min_ess, min_ess_fraction)
    below = np.flatnonzero(kish_ess(rho, axis=0) < threshold)
    collapse_step = int(below[0]) if below.size else None
    warnings = []
    if ess < threshold:
        msg = (
            f"importance weights collapsed: ESS {ess:.1f} of {n} episodes ({100 * ess / n:.2f} %), "
            f"below the threshold {threshold:.1f}"
        )
        if collapse_step is not None:
            msg += f"; the per-decision ESS fell below it at step {collapse_step}"
        if estimator in ("dr", "wdr"):
            msg += "; beyond that the estimate rests on the FQE model"
        warnings.append(msg)
    if not np.isfinite(rho).all():
        warnings.append("importance weights overflowed float64; consider clip_weights")
    return {
        "ess": ess,
        "ess_fraction": ess / n,
        "ess_collapsed": ess < threshold,
        "collapse_step": collapse_step,
        "warnings": warnings,
    }


def estimate_is(
    estimator: str,
    data: Transitions,
    probs: np.ndarray,
    *,
    gamma: float = 0.99,
    q_values: np.ndarray | None = None,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clip_weights: float | None = None,
    min_ess: float = 10.0,
    min_ess_fraction: float = 0.01,
) -> Estimate:
    """One importance-sampling (``pdis``, ``wpdis``) or doubly robust (``dr``, ``wdr``) estimate for a
    Discrete action space.

    ``probs`` is pi(.|s_t) for every row ``[N, A]``; ``q_values`` the model's Q(s_t, .) ``[N, A]``,
    required by ``dr`` and ``wdr``, or ``[K, N, A]``, one slice per model of an FQE ensemble. The
    estimate itself is :func:`estimate_is_logp`'s, with ``log pi(a_t|s_t)``, ``Q(s_t, a_t)`` and
    ``V(s) = sum_a pi(a|s) Q(s, a)`` read from these.
    """
    if estimator not in NEEDS_PROPENSITIES:
        raise OPEError(f"estimate_is runs {', '.join(sorted(NEEDS_PROPENSITIES))}, not {estimator!r}")
    _check_bootstrap(n_bootstrap, confidence)
    _padded(data, gamma)
    _check_propensities(data, estimator)
    if probs.shape != (len(data), data.meta.n_actions):
        raise OPEError(f"probs has shape {probs.shape}; expected ({len(data)}, {data.meta.n_actions})")
    rows = np.arange(len(data))
    with np.errstate(divide="ignore"):
        target_logp = np.log(probs[rows, data.action])
    q_taken = v = None
    if estimator in ("dr", "wdr"):
        models = _as_ensemble(q_values, probs.shape, estimator)
        q_taken = models[:, rows, data.action]
        v = (probs[None] * models).sum(axis=2)
    return estimate_is_logp(
        estimator,
        data,
        target_logp,
        q_taken=q_taken,
        v=v,
        gamma=gamma,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
        clip_weights=clip_weights,
        min_ess=min_ess,
        min_ess_fraction=min_ess_fraction,
    )


def estimate_is_logp(
    estimator: str,
    data: Transitions,
    target_logp: np.ndarray,
    *,
    q_taken: np.ndarray | None = None,
    v: np.ndarray | None = None,
    gamma: float = 0.99,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    clip_weights: float | None = None,
    min_ess: float = 10.0,
    min_ess_fraction: float = 0.01,
) -> Estimate:
    """One importance-sampling or doubly robust estimate, for any action space.

    ``target_logp`` is log pi(a_t|s_t) of every logged action ``[N]`` (a log-probability for Discrete
    actions, a log-density in raw action units for Box actions; ``behavior_logp`` must be the same kind).
    ``dr`` and ``wdr`` also need the model's ``q_taken = Q(s_t, a_t)`` and ``v = V(s_t) = E_pi Q(s_t, .)``,
    each ``[N]`` or ``[K, N]`` for an ensemble of ``K`` models. All four share one formula,
    ``sum_t gamma^t [w_t (r_t - Q(s_t, a_t)) + w_{t-1} V(s_t)]``, ``Q = V = 0`` for pdis / wpdis, ``w`` the
    cumulative weights (pdis, dr) or the cumulative weights divided by their sum over episodes at each
    step (wpdis, wdr), and ``w_{-1} = 1`` (resp. ``1/n``). With an ensemble the estimate is the mean over
    models and the interval covers their disagreement (see :func:`_mean_with_ci`).
    """
    if estimator not in NEEDS_PROPENSITIES:
        raise OPEError(f"estimate_is runs {', '.join(sorted(NEEDS_PROPENSITIES))}, not {estimator!r}")
    _check_bootstrap(n_bootstrap, confidence)
    pad = _padded(data, gamma)
    _check_propensities(data, estimator)
    target_logp = np.asarray(target_logp, dtype=np.float64)
    if target_logp.shape != (len(data),):
        raise OPEError(f"target_logp has shape {target_logp.shape}; expected ({len(data)},)")
    rho, rho_prev = _cumulative_weights(data, pad, target_logp, clip_weights)
    r = pad.pad(data.reward.astype(np.float64))
    members: list[float] | None = None
    if estimator in ("dr", "wdr"):
        qs = [pad.pad(m) for m in _per_row(q_taken, len(data), estimator, "q_taken")]
        vs = [pad.pad(m) for m in _per_row(v, len(data), estimator, "v")]
        if len(qs) != len(vs):
            raise OPEError(f"{estimator}: q_taken has {len(qs)} models but v has {len(vs)}")
    else:
        qs = vs = [np.zeros_like(r)]
    with np.errstate(invalid="ignore"):
        parts = [_DRParts(rho * (r - q), rho_prev * vq, pad.discount) for q, vq in zip(qs, vs, strict=True)]
    if estimator in ("pdis", "dr"):
        per_episode = np.stack([(p.rho_r_minus_q + p.rho_prev_v) @ pad.discount for p in parts])
        value, lo, hi = _mean_with_ci(per_episode, n_bootstrap, confidence, seed)
        by_member = per_episode.mean(axis=1)
    else:
        everyone = np.ones((1, pad.n))
        by_member = np.array([_weighted(everyone, rho, rho_prev, p)[0] for p in parts])
        value = float(by_member.mean())
        chunks, start = [], 0
        for c in _resample_counts(pad.n, n_bootstrap, seed):
            scored = np.stack([_weighted(c, rho, rho_prev, p) for p in parts])  # [K, b]
            chunks.append(scored[_members(len(c), start, len(parts)), np.arange(len(c))])
            start += len(c)
        lo, hi = _percentile(np.concatenate(chunks), confidence)
    if estimator in ("dr", "wdr"):
        members = [float(x) for x in by_member]
    return Estimate(
        estimator=estimator,
        value=value,
        lower=lo,
        upper=hi,
        confidence=confidence,
        n_episodes=pad.n,
        interval=_interval_label("episodes", len(parts) if members is not None else 0),
        members=members,
        **_ess_fields(rho, pad.n, min_ess, min_ess_fraction, estimator),
    )


def _per_row(values: np.ndarray | None, n: int, estimator: str, what: str) -> np.ndarray:
    """``values`` as ``[K, N]``: one model's per-row values ``[N]`` or an ensemble of them."""
    x = None if values is None else np.asarray(values, dtype=np.float64)
    if x is not None and x.shape == (n,):
        return x[None]
    if x is None or x.ndim != 2 or x.shape[1] != n or x.shape[0] < 1:
        got = None if x is None else x.shape
        raise OPEError(f"{estimator} needs {what} of shape ({n},) or (models, {n}), got {got}")
    return x


def _as_ensemble(q_values: np.ndarray | None, shape: tuple[int, ...], estimator: str) -> np.ndarray:
    """``q_values`` as ``[K, N, A]``: one model ``[N, A]`` or an ensemble of them."""
    q = None if q_values is None else np.asarray(q_values, dtype=np.float64)
    if q is not None and q.shape == shape:
        return q[None]
    if q is None or q.ndim != 3 or q.shape[1:] != shape or q.shape[0] < 1:
        got = None if q is None else q.shape
        raise OPEError(f"{estimator} needs q_values of shape {shape} or (models, *{shape}), got {got}")
    return q


def _interval_label(resampled: str, n_models: int) -> str:
    if n_models == 0:
        return resampled
    return f"{resampled} and {n_models} Q models" if n_models > 1 else f"{resampled} (Q fixed)"


def estimate_fqe(
    data: Transitions,
    probs: np.ndarray,
    q_values: np.ndarray,
    *,
    gamma: float = 0.99,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The FQE estimate for a Discrete action space: :func:`estimate_fqe_values` with
    ``V(s) = sum_a pi(a|s) Q(s, a)``. ``q_values`` is ``[N, A]`` (one model, held fixed) or ``[K, N, A]``
    (an ensemble: mean over models, their disagreement in the interval)."""
    _check_bootstrap(n_bootstrap, confidence)
    _padded(data, gamma)
    models = _as_ensemble(q_values, probs.shape, "fqe")
    return estimate_fqe_values(
        data,
        (probs[None] * models).sum(axis=2),
        gamma=gamma,
        n_bootstrap=n_bootstrap,
        confidence=confidence,
        seed=seed,
    )


def estimate_fqe_values(
    data: Transitions,
    v: np.ndarray,
    *,
    gamma: float = 0.99,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The FQE estimate from the model's ``V(s_t) = E_pi Q(s_t, .)`` at every row (``[N]``, or ``[K, N]``
    for an ensemble), for any action space: the mean over episodes of ``V`` at each episode's first row,
    with the interval over initial states."""
    _check_bootstrap(n_bootstrap, confidence)
    pad = _padded(data, gamma)
    values = _per_row(v, len(data), "fqe", "v")
    v0 = values[:, pad.starts]  # [K, E]
    value, lo, hi = _mean_with_ci(v0, n_bootstrap, confidence, seed)
    est = Estimate(
        "fqe",
        value,
        lo,
        hi,
        confidence,
        pad.n,
        interval=_interval_label("initial states", len(values)),
        members=[float(x) for x in v0.mean(axis=1)],
    )
    est.warnings.extend(_model_warnings(data, gamma, values.mean(axis=0)))
    return est


def behavior_value(
    data: Transitions,
    *,
    gamma: float = 0.99,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """On-policy value of the logged data: the mean discounted return of its episodes."""
    _check_bootstrap(n_bootstrap, confidence)
    pad = _padded(data, gamma)
    per_episode = pad.pad(data.reward.astype(np.float64)) @ pad.discount
    value, lo, hi = _mean_with_ci(per_episode, n_bootstrap, confidence, seed)
    return Estimate("behavior", value, lo, hi, confidence, pad.n)


@dataclass
class _TargetParts:
    """What the estimators need from the target policy and the fitted models, for either action space."""

    target_logp: np.ndarray | None  # [N] log pi(a_t|s_t) of the logged actions (when weights are needed)
    q_taken: np.ndarray | None  # [K, N] Q(s_t, a_t) under each model (when a model is needed)
    v: np.ndarray | None  # [K, N] V(s_t) = E_pi Q(s_t, .) under each model
    fit_warnings: list[str]


def _discrete_parts(
    data: Transitions,
    probs_fn: ProbsFn,
    estimators: Sequence[str],
    gamma: float,
    cfg: FQEConfig,
    progress: bool,
) -> _TargetParts:
    n_actions = data.meta.n_actions
    probs = _target_probs(probs_fn, data.observation, n_actions, "observation")
    rows = np.arange(len(data))
    with np.errstate(divide="ignore"):
        target_logp = np.log(probs[rows, data.action])
    parts = _TargetParts(target_logp, None, None, [])
    if NEEDS_MODEL.intersection(estimators):
        next_probs = _target_probs(probs_fn, data.next_observation, n_actions, "next_observation")
        models = fit_fqe_ensemble(data, next_probs, gamma=gamma, config=cfg, progress=progress)
        q_values = np.stack([m.q_values(data.observation) for m in models])
        parts.q_taken = q_values[:, rows, data.action]
        parts.v = (probs[None] * q_values).sum(axis=2)
        parts.fit_warnings = fqe_budget_warnings(cfg, gamma, _padded(data, gamma).horizon)
    return parts


def _continuous_parts(
    data: Transitions,
    target: ContinuousTarget,
    estimators: Sequence[str],
    gamma: float,
    cfg: FQEConfig,
    progress: bool,
    seed: int,
    action_samples: int,
) -> _TargetParts:
    weighted = NEEDS_PROPENSITIES.intersection(estimators)
    if weighted and not target.stochastic:
        raise OPEError(f"{', '.join(sorted(weighted))}: {_DETERMINISTIC}")
    parts = _TargetParts(_target_log_density(target, data) if weighted else None, None, None, [])
    if NEEDS_MODEL.intersection(estimators):
        next_actions = _target_actions(
            target, data.next_observation, data, action_samples, seed, "next_observation"
        )
        models = fit_fqe_ensemble(
            data, next_actions.astype(np.float32), gamma=gamma, config=cfg, progress=progress
        )
        here = _target_actions(target, data.observation, data, action_samples, seed, "observation")
        parts.v = np.stack([m.expected_q(data.observation, here) for m in models])
        parts.q_taken = np.stack([m.q_at(data.observation, data.action) for m in models])
        parts.fit_warnings = fqe_budget_warnings(cfg, gamma, _padded(data, gamma).horizon)
    return parts


def evaluate(
    data: Transitions,
    probs_fn: Target,
    *,
    gamma: float = 0.99,
    estimators: Sequence[str] = ESTIMATORS,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    fqe_config: FQEConfig | None = None,
    seed: int = 0,
    clip_weights: float | None = None,
    min_ess: float = 10.0,
    min_ess_fraction: float = 0.01,
    progress: bool = False,
    action_samples: int = ACTION_SAMPLES,
) -> dict[str, Estimate]:
    """Estimate the value of the target policy ``probs_fn`` with each estimator in ``estimators``.

    ``probs_fn`` is a ``probs_fn`` for a Discrete dataset and a :class:`ContinuousTarget` for a Box one
    (whose importance-weighted estimators need a stochastic target; ``action_samples`` draws average Q
    over its actions). ``min_ess`` and ``min_ess_fraction`` set the collapse threshold: the weights have
    collapsed when the ESS is below ``max(min_ess, min_ess_fraction * n_episodes)``. The FQE model, when
    one is needed, is fitted once and shared by ``fqe``, ``dr`` and ``wdr``. Every estimate resamples the
    same episodes (same ``seed``), so their intervals are paired.
    """
    unknown = [e for e in estimators if e not in ESTIMATORS]
    if unknown or not estimators:
        raise OPEError(
            f"unknown estimator(s) {unknown or '(none given)'}; choose from {', '.join(ESTIMATORS)}"
        )
    _check_bootstrap(n_bootstrap, confidence)
    _padded(data, gamma)
    for name in estimators:
        if name in NEEDS_PROPENSITIES:
            _check_propensities(data, name)
    if action_samples < 1:
        raise OPEError(f"action_samples must be >= 1, got {action_samples}")
    cfg = fqe_config or FQEConfig()
    if data.meta.is_continuous:
        if not isinstance(probs_fn, ContinuousTarget):
            raise OPEError(
                "the dataset has a Box action space: the target policy must be a ContinuousTarget "
                "(policy_target(module, selection)), not action probabilities"
            )
        parts = _continuous_parts(data, probs_fn, estimators, gamma, cfg, progress, seed, action_samples)
    else:
        if isinstance(probs_fn, ContinuousTarget):
            raise OPEError(
                "the dataset has a Discrete action space: the target policy must give action "
                "probabilities (policy_probs_fn), not a ContinuousTarget"
            )
        parts = _discrete_parts(data, probs_fn, estimators, gamma, cfg, progress)

    boot: dict[str, Any] = {
        "gamma": gamma,
        "n_bootstrap": n_bootstrap,
        "confidence": confidence,
        "seed": seed,
    }
    weights: dict[str, Any] = {
        "clip_weights": clip_weights,
        "min_ess": min_ess,
        "min_ess_fraction": min_ess_fraction,
    }
    out: dict[str, Estimate] = {}
    for name in estimators:
        if name == "fqe":
            if parts.v is None:
                raise RuntimeError("FQE model missing")  # unreachable: fitted above when fqe is asked for
            out[name] = estimate_fqe_values(data, parts.v, **boot)
        else:
            if parts.target_logp is None:
                raise RuntimeError("target log-probabilities missing")  # unreachable: computed above
            out[name] = estimate_is_logp(
                name, data, parts.target_logp, q_taken=parts.q_taken, v=parts.v, **boot, **weights
            )
            if parts.v is not None and name in NEEDS_MODEL:
                out[name].warnings.extend(_model_warnings(data, gamma, parts.v.mean(axis=0)))
        if name in NEEDS_MODEL:
            out[name].warnings.extend(parts.fit_warnings + spread_warnings(out[name], cfg.max_spread))
    return out


def spread_warnings(est: Estimate, max_spread: float) -> list[str]:
    """A warning when the Q models of an ensemble disagree by more than ``max_spread`` of the value:
    the data do not pin the value down where this policy goes, whatever the interval's width."""
    if not est.members or len(est.members) < 2:
        return []
    lo, hi = min(est.members), max(est.members)
    scale = max(abs(est.value), 1e-12)
    if (hi - lo) / scale <= max_spread:
        return []
    return [
        f"the {len(est.members)} FQE models disagree: {est.estimator} ranges over [{lo:.4g}, {hi:.4g}] "
        f"({100 * (hi - lo) / scale:.0f} % of the value, above {100 * max_spread:.0f} %); the logged "
        "data cover the states this policy visits too thinly to fix its value"
    ]


def fqe_budget_warnings(config: FQEConfig, gamma: float, horizon: int) -> list[str]:
    """A warning when FQE's training budget is too short for values to travel over the horizon.

    Each target copy in the constant-learning-rate phase is about one Bellman backup; with fewer than
    five effective horizons of them, values stay biased toward a truncated return (too low when
    rewards are positive)."""
    backups = config.steps * config.lr_decay_from / config.target_update
    effective = min(1.0 / (1.0 - gamma), float(horizon)) if gamma < 1.0 else float(horizon)
    if backups >= 5 * effective:
        return []
    return [
        f"FQE ran about {backups:.0f} Bellman backups (steps x lr_decay_from / target_update) for an "
        f"effective horizon of {effective:.0f} steps; below {5 * effective:.0f} the values are biased "
        "toward a truncated return: raise FQEConfig.steps"
    ]


def _model_warnings(data: Transitions, gamma: float, v_s: np.ndarray) -> list[str]:
    if not np.isfinite(v_s).all():
        return ["the FQE model produced non-finite values"]
    lo, hi = value_range(data, gamma)
    slack = 0.1 * (hi - lo)
    outside = (v_s < lo - slack) | (v_s > hi + slack)
    # A few odd states always get odd values; a share of them, or any initial state, means the model
    # extrapolates where the estimate needs it.
    starts = data.episode_starts()
    if outside.mean() > 0.01 or outside[starts].any():
        return [
            f"the FQE model is out of range on {100 * outside.mean():.1f} % of the logged states "
            f"({100 * outside[starts].mean():.1f} % of initial states): V spans "
            f"[{v_s.min():.4g}, {v_s.max():.4g}], but returns on these rewards lie in [{lo:.4g}, {hi:.4g}]"
        ]
    return []
