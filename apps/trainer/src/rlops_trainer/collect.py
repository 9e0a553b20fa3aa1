"""Record a transition dataset from a Gymnasium environment with behaviour policies of graded quality.

Behaviour specs for Discrete action spaces:

* ``random``: uniform over the actions; log-propensity ``-log(n)``.
* ``eps-greedy:<eps>``: with probability ``eps`` a uniform action, otherwise the greedy action of a
  briefly trained linear policy; the logged propensity is ``(1 - eps) * [a == greedy] + eps / n``.
  ``eps-greedy:<eps>@<steps>`` trains that policy with a budget of ``<steps>`` environment steps
  instead of the default: a smaller budget gives a weaker greedy policy (a second quality knob).
* ``mixture:<component>=<weight>,...``: every *episode* draws one component (``random`` or
  ``eps-greedy:<eps>``) with the given weights and follows it to the end; the logged propensity
  is that component's.

For Box action spaces (actions in ``[low, high]``, logged ``behavior_logp`` a log-density):

* ``uniform``: uniform over the Box; log-density ``-Σ log(high - low)``.
* ``gaussian:<std>`` (``std > 0``): a squashed Gaussian around a controller: ``z = u(obs) + std * N(0, I)``,
  action ``mid + half * tanh(z)``, sampled and its exact log-density computed in one call,
  :meth:`~rlops_trainer.policy.ContinuousPolicyModule.act`. The controller is a policy directory
  (``policy=``, an exported ``policy.pt``) or else a small controller trained here;
  ``gaussian:<std>@<steps>`` trains that controller with a budget of ``<steps>`` environment steps.
* ``mixture:...`` as above, with ``uniform`` and ``gaussian:...`` components.

Why the component's propensity is the right one for a per-episode mixture: the component is drawn
once and held for the whole episode, so the probability of an episode's action sequence is
``Σ_k w_k Π_t π_k(a_t | s_t)``, not ``Π_t Σ_k w_k π_k(a_t | s_t)``; the per-step mixture
probability would describe a policy that re-draws its component every step, which is not what
generated the data. Conditioned on the drawn component (a fact of the logging process, like the
policy version in a production log) each episode is an ordinary sample from ``π_k``, and
importance weights ``π_e / π_k`` are unbiased per episode, which is what per-decision importance
sampling, doubly robust and the other estimators need.

The greedy policy is trained inside this module by the cross-entropy method on a linear policy
(``argmax(W @ obs + b)``), seeded and bounded by a budget of environment steps: a few seconds on
CartPole-v1, with the exploration rate as the quality knob. It is cached per (env, seed, budget)
so that mixtures and repeated collections reuse it.

The built-in controller for Box actions is trained the same way: the cross-entropy method on a small
network (one hidden layer of :data:`CONTROLLER_HIDDEN` tanh units) whose output, the pre-squash mean
``u``, is clipped to ±:data:`PRE_SQUASH_LIMIT`. The clip keeps ``z`` far from where float32 ``tanh``
rounds onto a bound, so the logged log-density is that of the action as stored (it is what importance
weights recompute). On Pendulum-v1 (observations ``cos θ, sin θ, θ̇``) 400,000 steps (about 10 s) give
a controller that swings up from most starts; see :data:`PENDULUM_MIXED`.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rlops_trainer.datasets import (
    DatasetMeta,
    Transitions,
    bound_tolerance,
    box_space,
    discrete_space,
    validate,
)
from rlops_trainer.policy import ContinuousPolicyModule

CARTPOLE_MIXED = "mixture:eps-greedy:0.1@2000=0.58,eps-greedy:0.3=0.09,random=0.33"
"""The mixed-quality CartPole-v1 behaviour of the demo and the benchmark, modelled on production logs:
most episodes come from a mediocre incumbent (epsilon-greedy around a policy trained on a 2,000-step
budget), a few from a better but noisy policy (epsilon 0.3 around the fully trained one), a third are
uniform exploration. Cloning the majority reproduces the mediocre policy; learning from the rewards
can do better. The behaviour policy averages under 150 (see docs/benchmarks.md)."""

PENDULUM_MIXED = "mixture:gaussian:0.5@100000=0.5,gaussian:1@400000=0.2,uniform=0.3"
"""The mixed-quality Pendulum-v1 behaviour, shaped like D4RL's medium-replay data: half the episodes
come from a partially trained controller with little noise, a fifth from the same controller with much
noise, the rest are uniform. 200 episodes at seed 0: the 100,000-step controller plays -1,064 alone
(deterministic) and -1,123 with its noise, the 400,000-step one -139 alone and -215 with its noise,
uniform -1,160; the behaviour averages -969. Cloning the majority reproduces a poor controller; the
good episodes (a sixth of the data) show what learning from rewards can reach."""

TRAIN_BUDGET_STEPS = 20_000
"""Environment steps the cross-entropy method may spend training the greedy policy."""

CONTROLLER_BUDGET_STEPS = 400_000
"""Environment steps the cross-entropy method may spend training the Box controller."""

CONTROLLER_HIDDEN = 8
"""Hidden tanh units of the built-in Box controller."""

PRE_SQUASH_LIMIT = 3.0
"""Bound on the built-in controller's pre-squash mean: tanh(3) = 0.995 of the half-width."""

BEHAVIOR_FORMS = (
    "accepted behaviours: for Discrete actions 'random'; 'eps-greedy:<eps>' or "
    "'eps-greedy:<eps>@<training steps>' with 0 <= eps <= 1; for Box actions 'uniform'; "
    "'gaussian:<std>' or 'gaussian:<std>@<training steps>' with std > 0; "
    "'mixture:<component>=<weight>,...' of those components with positive weights, e.g. "
    "'mixture:random=0.5,eps-greedy:0.3@2000=0.5' or 'mixture:uniform=0.3,gaussian:0.3=0.7'"
)


class CollectError(ValueError):
    """Bad input to :func:`collect` (environment id, behaviour spec, episode count)."""


# --------------------------------------------------------------------------------------------------
# Behaviour specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One behaviour: uniform exploration with probability ``epsilon``, greedy otherwise (Discrete), or
    a squashed Gaussian of pre-squash ``std`` around a controller (Box)."""

    epsilon: float
    """1.0 for ``random`` and ``uniform``: no greedy policy or controller is needed."""
    spec: str
    budget_steps: int | None = None
    """Training budget of this component's greedy policy or controller; None: the collection's default."""
    std: float | None = None
    """``gaussian:<std>``: the exploration noise before squashing; None for the other forms."""

    @property
    def needs_policy(self) -> bool:
        return self.epsilon < 1.0

    @property
    def for_box(self) -> bool:
        """Whether this component acts in a Box action space (``uniform``, ``gaussian:...``)."""
        return self.std is not None or self.spec == "uniform"


@dataclass(frozen=True)
class Behavior:
    components: tuple[Component, ...]
    weights: tuple[float, ...]
    """Normalised episode probabilities of the components."""
    spec: str
    """Canonical spec string, stored as the dataset's behaviour policy."""


def _parse_component(text: str, whole: str) -> Component:
    text = text.strip()
    if text in ("random", "uniform"):
        return Component(epsilon=1.0, spec=text)
    match = re.fullmatch(r"gaussian:([^@]+)(?:@(.*))?", text)
    if match:
        try:
            std = float(match.group(1))
        except ValueError:
            raise CollectError(
                f"bad std {match.group(1)!r} in behaviour {whole!r}; {BEHAVIOR_FORMS}"
            ) from None
        if not (math.isfinite(std) and std > 0.0):
            # std 0 is a point mass: no log-density could be logged for importance weights.
            raise CollectError(f"std {std:g} in behaviour {whole!r} must be positive; {BEHAVIOR_FORMS}")
        budget = _budget(match.group(2), whole)
        suffix = f"@{budget}" if budget is not None else ""
        return Component(epsilon=0.0, spec=f"gaussian:{std:g}{suffix}", budget_steps=budget, std=std)
    match = re.fullmatch(r"eps-greedy:([^@]+)(?:@(.*))?", text)
    if match:
        try:
            eps = float(match.group(1))
        except ValueError:
            raise CollectError(
                f"bad epsilon {match.group(1)!r} in behaviour {whole!r}; {BEHAVIOR_FORMS}"
            ) from None
        if not 0.0 <= eps <= 1.0:
            raise CollectError(f"epsilon {eps:g} in behaviour {whole!r} is outside [0, 1]; {BEHAVIOR_FORMS}")
        budget = _budget(match.group(2), whole)
        if budget is None:
            return Component(epsilon=eps, spec=f"eps-greedy:{eps:g}")
        return Component(epsilon=eps, spec=f"eps-greedy:{eps:g}@{budget}", budget_steps=budget)
    raise CollectError(f"unknown behaviour component {text!r} in {whole!r}; {BEHAVIOR_FORMS}")


def _budget(text: str | None, whole: str) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise CollectError(
            f"bad training budget {text!r} in behaviour {whole!r}: a positive whole number of "
            f"environment steps; {BEHAVIOR_FORMS}"
        )
    return int(text)


def parse_behavior(spec: str) -> Behavior:
    """Parse a behaviour spec (see the module docstring); raises :class:`CollectError` when malformed."""
    spec = spec.strip()
    if not spec.startswith("mixture:"):
        component = _parse_component(spec, spec)
        return Behavior((component,), (1.0,), component.spec)
    body = spec[len("mixture:") :]
    components: list[Component] = []
    weights: list[float] = []
    for item in body.split(","):
        name, sep, weight_text = item.rpartition("=")
        if not sep or not name.strip():
            raise CollectError(f"mixture item {item!r} is not <component>=<weight>; {BEHAVIOR_FORMS}")
        try:
            weight = float(weight_text)
        except ValueError:
            raise CollectError(
                f"weight {weight_text!r} of {name!r} is not a number; {BEHAVIOR_FORMS}"
            ) from None
        if not (math.isfinite(weight) and weight > 0):
            raise CollectError(f"weight {weight_text!r} of {name!r} must be positive; {BEHAVIOR_FORMS}")
        components.append(_parse_component(name, spec))
        weights.append(weight)
    if len({c.spec for c in components}) != len(components):
        raise CollectError(f"mixture {spec!r} names a component twice; {BEHAVIOR_FORMS}")
    total = sum(weights)
    canonical = "mixture:" + ",".join(f"{c.spec}={w:g}" for c, w in zip(components, weights, strict=True))
    return Behavior(tuple(components), tuple(w / total for w in weights), canonical)


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------


@dataclass
class EnvHandle:
    env: gym.Env[Any, Any]
    n_actions: int
    """Discrete: the number of actions; 0 for a Box action space (see ``action_space``)."""
    start: int
    """Value of the first action (``Discrete.start``): dataset actions are 0-based."""
    observation_space: gym.spaces.Box
    action_space: gym.spaces.Discrete | gym.spaces.Box


def make_env(
    env_id: str,
    max_episode_steps: int | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    box_actions: bool = False,
) -> EnvHandle:
    """``gym.make`` with errors that say what is accepted: Box observations, Discrete actions (and, with
    ``box_actions``, Box actions with finite bounds).

    ``kwargs`` go to the environment's constructor.
    """
    try:
        env = gym.make(env_id, max_episode_steps=max_episode_steps, **(kwargs or {}))
    except TypeError as e:
        if not kwargs:
            raise
        raise CollectError(
            f"Gymnasium environment {env_id!r} does not accept the arguments {kwargs}: {e}"
        ) from None
    except gym.error.Error as e:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CollectError(
            f"unknown or unavailable Gymnasium environment {env_id!r} ({e}){hint} "
            "(python -c 'import gymnasium; gymnasium.pprint_registry()' lists the registered ids)"
        ) from None
    action_space = env.action_space
    if isinstance(action_space, gym.spaces.Box) and box_actions:
        if not (np.isfinite(action_space.low).all() and np.isfinite(action_space.high).all()):
            env.close()
            raise CollectError(f"{env_id} has action space {action_space}: Box actions need finite bounds")
    elif not isinstance(action_space, gym.spaces.Discrete):
        env.close()
        accepted = "Discrete or Box" if box_actions else "only Discrete"
        raise CollectError(
            f"{env_id} has action space {action_space}: {accepted} action spaces are supported"
        )
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise CollectError(
            f"{env_id} has observation space {env.observation_space}: "
            "only Box observation spaces are supported"
        )
    observation_space = env.observation_space
    if env.spec is None or env.spec.max_episode_steps is None:
        env.close()
        raise CollectError(f"{env_id} has no time limit: pass max_episode_steps so that every episode ends")
    if isinstance(action_space, gym.spaces.Box):
        return EnvHandle(env, 0, 0, observation_space, action_space)
    return EnvHandle(env, int(action_space.n), int(action_space.start), observation_space, action_space)


# --------------------------------------------------------------------------------------------------
# The briefly trained greedy policy
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearPolicy:
    """Greedy linear policy ``argmax(weight @ obs + bias)`` (ties to the lowest action index)."""

    weight: np.ndarray  # float64 [n_actions, obs_dim]
    bias: np.ndarray  # float64 [n_actions]
    train_info: dict[str, Any]

    def act(self, obs: np.ndarray) -> int:
        return int(np.argmax(self.weight @ obs + self.bias))


def _episode_return(env: gym.Env[Any, Any], policy: LinearPolicy, seed: int, start: int) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        obs, reward, terminated, truncated, _ = env.step(
            start + policy.act(np.asarray(obs, np.float64).ravel())
        )
        total += float(reward)
        steps += 1
        if terminated or truncated:
            return total, steps


_POLICY_CACHE: dict[tuple[str, int, int, int | None], LinearPolicy] = {}


def train_greedy_policy(
    env_id: str, seed: int, budget_steps: int = TRAIN_BUDGET_STEPS, max_episode_steps: int | None = None
) -> LinearPolicy:
    """Cross-entropy method on a linear policy, seeded; cached per (env, seed, budget) in this process."""
    key = (env_id, seed, budget_steps, max_episode_steps)
    if key in _POLICY_CACHE:
        return _POLICY_CACHE[key]
    handle = make_env(env_id, max_episode_steps)
    env, n, start = handle.env, handle.n_actions, handle.start
    d = int(np.prod(handle.observation_space.shape))
    rng = np.random.default_rng([seed, 1])
    population, n_elite = 32, 6
    mean, std = np.zeros(n * d + n), np.ones(n * d + n)

    def unpack(theta: np.ndarray) -> LinearPolicy:
        return LinearPolicy(theta[: n * d].reshape(n, d), theta[n * d :], {})

    used, iterations, elite_return = 0, 0, float("nan")
    while used < budget_steps:
        thetas = mean + std * rng.standard_normal((population, mean.size))
        seeds = rng.integers(0, 2**31 - 1, size=population)
        results = [
            _episode_return(env, unpack(th), int(s), start) for th, s in zip(thetas, seeds, strict=True)
        ]
        returns = np.array([r for r, _ in results])
        used += sum(steps for _, steps in results)
        elite = np.argsort(-returns, kind="stable")[:n_elite]
        # The floor on std keeps the search from collapsing before the budget is spent.
        mean, std = thetas[elite].mean(axis=0), thetas[elite].std(axis=0) + 0.1
        elite_return = float(returns[elite].mean())
        iterations += 1
    policy = unpack(mean)
    eval_seeds = rng.integers(0, 2**31 - 1, size=5)
    greedy_return = float(np.mean([_episode_return(env, policy, int(s), start)[0] for s in eval_seeds]))
    env.close()
    info = {
        "method": "cross-entropy method, linear policy",
        "budget_steps": budget_steps,
        "steps_used": used,
        "iterations": iterations,
        "elite_return": elite_return,
        "greedy_return": greedy_return,
    }
    trained = LinearPolicy(policy.weight, policy.bias, info)
    _POLICY_CACHE[key] = trained
    return trained


# --------------------------------------------------------------------------------------------------
# The briefly trained Box controller
# --------------------------------------------------------------------------------------------------


def controller_module(
    theta: np.ndarray, obs_dim: int, low: np.ndarray, high: np.ndarray, hidden: int = CONTROLLER_HIDDEN
) -> ContinuousPolicyModule:
    """The built-in controller with flat parameters ``theta`` as a policy module: pre-squash mean
    ``clip(W2 tanh(W1 obs + b1) + b2, ±PRE_SQUASH_LIMIT)`` on raw observations."""
    k = int(low.size)
    # The layers' random initialisation is overwritten below: keep it from drawing on the caller's generator.
    with torch.random.fork_rng(devices=[]):
        net = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, k),
            torch.nn.Hardtanh(-PRE_SQUASH_LIMIT, PRE_SQUASH_LIMIT),
        )
    torch.nn.utils.vector_to_parameters(torch.as_tensor(theta, dtype=torch.float32), net.parameters())
    return ContinuousPolicyModule(net, np.zeros(obs_dim), np.ones(obs_dim), low, high).eval()


def _controller_size(obs_dim: int, k: int, hidden: int = CONTROLLER_HIDDEN) -> int:
    return hidden * obs_dim + hidden + k * hidden + k


def _controller_action(theta: np.ndarray, obs: np.ndarray, mid: np.ndarray, half: np.ndarray) -> np.ndarray:
    """:func:`controller_module`'s deterministic action in numpy (the search evaluates thousands)."""
    d, k, h = obs.size, mid.size, CONTROLLER_HIDDEN
    w1, rest = theta[: h * d].reshape(h, d), theta[h * d :]
    b1, rest = rest[:h], rest[h:]
    w2, b2 = rest[: k * h].reshape(k, h), rest[k * h :]
    u = np.clip(w2 @ np.tanh(w1 @ obs + b1) + b2, -PRE_SQUASH_LIMIT, PRE_SQUASH_LIMIT)
    return mid + half * np.tanh(u)


def _controller_return(
    env: gym.Env[Any, Any], theta: np.ndarray, seed: int, mid: np.ndarray, half: np.ndarray
) -> tuple[float, int]:
    obs, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        action = _controller_action(theta, np.asarray(obs, np.float64).ravel(), mid, half)
        obs, reward, terminated, truncated, _ = env.step(action.astype(np.float32))
        total += float(reward)
        steps += 1
        if terminated or truncated:
            return total, steps


@dataclass(frozen=True)
class Controller:
    """A Box policy to explore around: the built-in controller or a loaded ``policy.pt``."""

    policy: Any
    """A :class:`ContinuousPolicyModule` or its TorchScript form (both have ``act``)."""
    train_info: dict[str, Any]


_CONTROLLER_CACHE: dict[tuple[str, int, int, int | None], Controller] = {}


def train_controller(
    env_id: str, seed: int, budget_steps: int = CONTROLLER_BUDGET_STEPS, max_episode_steps: int | None = None
) -> Controller:
    """Cross-entropy method on the built-in Box controller, seeded; cached per (env, seed, budget).

    Every candidate of an iteration plays the same two start states (common random numbers), so the
    elite is chosen by the controller rather than by lucky starts.
    """
    key = (env_id, seed, budget_steps, max_episode_steps)
    if key in _CONTROLLER_CACHE:
        return _CONTROLLER_CACHE[key]
    handle = make_env(env_id, max_episode_steps, box_actions=True)
    env, space = handle.env, handle.action_space
    if not isinstance(space, gym.spaces.Box):
        env.close()
        raise CollectError(f"{env_id} has action space {space}: the controller is for Box action spaces")
    low, high = space.low.astype(np.float64).ravel(), space.high.astype(np.float64).ravel()
    mid, half = (high + low) / 2.0, (high - low) / 2.0
    d = int(np.prod(handle.observation_space.shape))
    rng = np.random.default_rng([seed, 3])
    population, n_elite, starts = 32, 6, 2
    mean = np.zeros(_controller_size(d, low.size))
    std = np.ones_like(mean)
    used, iterations, elite_return = 0, 0, float("nan")
    while used < budget_steps:
        thetas = mean + std * rng.standard_normal((population, mean.size))
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=starts)]
        returns = np.zeros(population)
        for i, theta in enumerate(thetas):
            results = [_controller_return(env, theta, s, mid, half) for s in seeds]
            returns[i] = np.mean([r for r, _ in results])
            used += sum(steps for _, steps in results)
        elite = np.argsort(-returns, kind="stable")[:n_elite]
        # The floor on std keeps the search from collapsing before the budget is spent.
        mean, std = thetas[elite].mean(axis=0), thetas[elite].std(axis=0) + 0.1
        elite_return = float(returns[elite].mean())
        iterations += 1
    eval_seeds = rng.integers(0, 2**31 - 1, size=10)
    deterministic_return = float(
        np.mean([_controller_return(env, mean, int(s), mid, half)[0] for s in eval_seeds])
    )
    env.close()
    info = {
        "method": f"cross-entropy method, tanh MLP ({CONTROLLER_HIDDEN} hidden), pre-squash mean "
        f"clipped to ±{PRE_SQUASH_LIMIT:g}",
        "budget_steps": budget_steps,
        "steps_used": used,
        "iterations": iterations,
        "elite_return": elite_return,
        "deterministic_return": deterministic_return,
    }
    trained = Controller(controller_module(mean, d, low, high), info)
    _CONTROLLER_CACHE[key] = trained
    return trained


def load_controller(
    policy_dir: str | Path, env_id: str, low: np.ndarray, high: np.ndarray, obs_dim: int
) -> Controller:
    """An exported Box policy (``policy.pt`` with score_kind "action") as the controller to explore around."""
    from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE

    from rlops_trainer.export import load_script

    root = Path(policy_dir)
    file = root / POLICY_FILE
    if not file.is_file():
        raise CollectError(f"{root}: no {POLICY_FILE}; expected an exported policy directory")
    card_file = root / MODEL_CARD_FILE
    if card_file.is_file():
        try:
            kind = json.loads(card_file.read_text())["policy"]["score_kind"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CollectError(
                f"{card_file}: cannot read policy.score_kind ({type(e).__name__}: {e})"
            ) from None
        if kind != "action":
            raise CollectError(
                f"{root}: the policy's score_kind is {kind!r}; exploring a Box action space needs an "
                "'action' policy (a Box policy exported by rlops)"
            )
    try:
        module = load_script(file)
    except (RuntimeError, OSError, ValueError) as e:
        raise CollectError(f"{file}: not a loadable TorchScript policy ({e})") from None
    if not (hasattr(module, "act") and hasattr(module, "action_mid") and hasattr(module, "action_half")):
        raise CollectError(f"{file}: not a Box policy (it has no act() and action bounds)")
    mid = module.action_mid.detach().double().numpy()
    half = module.action_half.detach().double().numpy()
    if mid.shape != low.shape or not np.allclose(
        np.stack([mid - half, mid + half]), np.stack([low, high]), rtol=1e-6, atol=1e-6
    ):
        raise CollectError(
            f"{file}: the policy squashes actions into [{(mid - half).tolist()}, {(mid + half).tolist()}], "
            f"but {env_id} acts in [{low.tolist()}, {high.tolist()}]"
        )
    try:
        with torch.no_grad():
            module.act(torch.zeros(1, obs_dim), 0.0)
    except RuntimeError as e:
        raise CollectError(
            f"{file}: the policy does not take {env_id}'s {obs_dim} observation features ({e})"
        ) from None
    return Controller(module, {"policy_dir": str(root)})


# --------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------


def _progress_bar(progress: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not progress,
        transient=True,
    )


def _eps_greedy(
    rng: np.random.Generator, n: int, start: int, eps: float, policy: LinearPolicy | None
) -> Choice:
    """Uniform with probability ``eps``, else ``policy``'s greedy action (uniform without a policy)."""
    log_uniform = -math.log(n)
    # Both branches give exact probabilities: the greedy action also wins eps / n of the time.
    log_greedy = math.log((1.0 - eps) + eps / n) if eps < 1.0 else log_uniform
    log_other = math.log(eps / n) if eps > 0.0 else -math.inf

    def choose(obs: np.ndarray) -> tuple[int, int, float]:
        if eps >= 1.0 or policy is None:
            action, logp = int(rng.integers(n)), log_uniform
        else:
            greedy = policy.act(obs.astype(np.float64))
            action = int(rng.integers(n)) if rng.random() < eps else greedy
            logp = log_greedy if action == greedy else log_other
        return action, start + action, min(logp, 0.0)

    return choose


def _uniform_box(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> Choice:
    """Actions uniform in the Box ``[low, high]``."""
    log_uniform = -float(np.log(high - low).sum())

    def choose(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        action = rng.uniform(low, high).astype(np.float32)
        return action, action, log_uniform

    return choose


def squashed_gaussian(policy: ContinuousPolicyModule, std: float) -> Choice:
    """``policy``'s action explored with pre-squash noise ``std`` (torch's generator), with its exact
    log-density (NaN when ``std`` is 0, a point mass)."""

    def choose(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        sample, density = policy.act(torch.as_tensor(obs)[None], std)
        action = sample[0].numpy().astype(np.float32)
        return action, action, float(density[0])

    return choose


STEP_COLUMNS = ("obs", "action", "reward", "next_obs", "term", "trunc", "logp")
"""What a rollout records per step (lists, one entry per step) for :func:`transitions_from_steps`."""


Choice = Callable[[np.ndarray], tuple[Any, Any, float]]
"""A behaviour's step: observation -> (the action to record, the action the environment takes, its
log-probability or log-density)."""


def record_episode(env: gym.Env[Any, Any], seed: int, choose: Choice, columns: dict[str, list[Any]]) -> int:
    """Play one episode from ``env.reset(seed=seed)`` with ``choose``, append every step to ``columns``
    (the :data:`STEP_COLUMNS`) and return its length."""
    obs, _ = env.reset(seed=seed)
    obs = np.asarray(obs, dtype=np.float32).ravel()
    steps = 0
    while True:
        action, env_action, logp = choose(obs)
        next_obs, reward, terminated, truncated, _ = env.step(env_action)
        next_obs = np.asarray(next_obs, dtype=np.float32).ravel()
        for key, value in (
            ("obs", obs),
            ("action", action),
            ("reward", float(reward)),
            ("next_obs", next_obs),
            ("term", bool(terminated)),
            ("trunc", bool(truncated) and not terminated),
            ("logp", logp),
        ):
            columns[key].append(value)
        obs = next_obs
        steps += 1
        if terminated or truncated:
            return steps


def transitions_from_steps(
    columns: dict[str, list[Any]], lengths: list[int], meta: DatasetMeta
) -> Transitions:
    """The validated dataset of consecutive episodes recorded step by step: ``columns`` holds the
    :data:`STEP_COLUMNS` (``logp`` NaN where the behaviour's log-probability or density is unknown),
    ``lengths`` the steps of each episode in order."""
    length_arr = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(length_arr)[:-1]])
    if meta.is_continuous:
        action = np.stack(columns["action"]).astype(np.float32)
    else:
        action = np.asarray(columns["action"], dtype=np.int64)
    t = Transitions(
        episode_id=np.repeat(np.arange(len(lengths), dtype=np.int64), length_arr),
        step=np.arange(int(length_arr.sum()), dtype=np.int64) - np.repeat(starts, length_arr),
        observation=np.stack(columns["obs"]),
        action=action,
        reward=np.asarray(columns["reward"], dtype=np.float32),
        next_observation=np.stack(columns["next_obs"]),
        terminated=np.asarray(columns["term"], dtype=np.bool_),
        truncated=np.asarray(columns["trunc"], dtype=np.bool_),
        behavior_logp=np.asarray(columns["logp"], dtype=np.float32),
        meta=meta,
    )
    return validate(t)


def collect(
    env_id: str,
    behavior: str | None,
    episodes: int,
    seed: int,
    progress: bool = True,
    *,
    max_episode_steps: int | None = None,
    budget_steps: int | None = None,
    policy_dir: str | Path | None = None,
) -> Transitions:
    """Roll out ``behavior`` for ``episodes`` episodes and return the validated transitions.

    ``behavior`` None picks the mixed-quality default of the action space: :data:`CARTPOLE_MIXED` for
    Discrete, :data:`PENDULUM_MIXED` for Box actions.

    ``budget_steps`` is the default training budget of components without ``@<steps>``
    (:data:`TRAIN_BUDGET_STEPS` for Discrete, :data:`CONTROLLER_BUDGET_STEPS` for Box actions).
    ``policy_dir``: Box actions only, an exported policy directory whose policy the ``gaussian``
    components explore around instead of the built-in controller. The same arguments give the same
    dataset (and fingerprint) on the same machine.
    """
    if behavior is not None:
        parse_behavior(behavior)  # a malformed spec fails before the environment is made
    if episodes < 1:
        raise CollectError(f"episodes must be at least 1, got {episodes}")
    handle = make_env(env_id, max_episode_steps, box_actions=True)
    box = isinstance(handle.action_space, gym.spaces.Box)
    spec = parse_behavior(behavior if behavior is not None else PENDULUM_MIXED if box else CARTPOLE_MIXED)
    wrong = [c.spec for c in spec.components if c.for_box != box]
    if wrong:
        handle.env.close()
        kind, other = ("Box", "Discrete") if box else ("Discrete", "Box")
        raise CollectError(
            f"behaviour component(s) {', '.join(wrong)} are for {other} action spaces, but {env_id} has "
            f"{handle.action_space} ({kind}); {BEHAVIOR_FORMS}"
        )
    if policy_dir is not None and not box:
        handle.env.close()
        raise CollectError(f"a policy directory is for Box action spaces; {env_id} has {handle.action_space}")
    if policy_dir is not None and any(c.budget_steps is not None for c in spec.components):
        handle.env.close()
        raise CollectError(
            f"behaviour {spec.spec!r} names a training budget (@<steps>) but the policy comes from "
            f"{policy_dir}: drop the budget"
        )
    if isinstance(handle.action_space, gym.spaces.Box):
        return _collect_box(
            handle,
            handle.action_space,
            env_id,
            spec,
            episodes,
            seed,
            _progress_bar(progress),
            budget_steps or CONTROLLER_BUDGET_STEPS,
            max_episode_steps,
            policy_dir,
        )
    budget_steps = budget_steps or TRAIN_BUDGET_STEPS
    env, n, start = handle.env, handle.n_actions, handle.start
    obs_space = handle.observation_space
    progress_bar = _progress_bar(progress)

    # One greedy policy per training budget; components with the same budget share it.
    policies: dict[int, LinearPolicy] = {}
    with progress_bar:
        for budget in sorted({c.budget_steps or budget_steps for c in spec.components if c.needs_policy}):
            progress_bar.add_task(f"training a greedy policy on {env_id} ({budget} steps)", total=None)
            policies[budget] = train_greedy_policy(env_id, seed, budget, max_episode_steps)
        task = progress_bar.add_task(f"collecting {env_id} with {spec.spec}", total=episodes)

        rng = np.random.default_rng([seed, 2])
        columns: dict[str, list[Any]] = {c: [] for c in STEP_COLUMNS}
        lengths: list[int] = []
        chosen = rng.choice(len(spec.components), size=episodes, p=spec.weights)
        for episode in range(episodes):
            component = spec.components[chosen[episode]]
            policy = policies.get(component.budget_steps or budget_steps)
            choose = _eps_greedy(rng, n, start, component.epsilon, policy)
            lengths.append(record_episode(env, int(rng.integers(0, 2**31 - 1)), choose, columns))
            progress_bar.advance(task)
    env.close()

    counts = np.bincount(chosen, minlength=len(spec.components))
    extra: dict[str, Any] = {
        "seed": seed,
        "episodes": episodes,
        "episodes_per_component": {c.spec: int(k) for c, k in zip(spec.components, counts, strict=True)},
    }
    if policies:
        extra["greedy_policies"] = {str(b): p.train_info for b, p in policies.items()}
    meta = DatasetMeta(
        env_id=env_id,
        observation_space=box_space(obs_space.low, obs_space.high),
        action_space=discrete_space(n),
        behavior_policy=spec.spec,
        source="collect",
        extra=extra,
    )
    return transitions_from_steps(columns, lengths, meta)


def _collect_box(
    handle: EnvHandle,
    space: gym.spaces.Box,
    env_id: str,
    spec: Behavior,
    episodes: int,
    seed: int,
    progress_bar: Progress,
    budget_steps: int,
    max_episode_steps: int | None,
    policy_dir: str | Path | None,
) -> Transitions:
    """:func:`collect` for a Box action space: uniform or squashed-Gaussian components."""
    env = handle.env
    low, high = space.low.astype(np.float64).ravel(), space.high.astype(np.float64).ravel()
    obs_dim = int(np.prod(handle.observation_space.shape))
    # One controller per training budget (components with the same budget share it), or the given policy.
    controllers: dict[int, Controller] = {}
    with progress_bar:
        budgets = sorted({c.budget_steps or budget_steps for c in spec.components if c.needs_policy})
        for budget in budgets:
            if policy_dir is not None:
                controllers[budget] = load_controller(policy_dir, env_id, low, high, obs_dim)
                continue
            progress_bar.add_task(f"training a controller on {env_id} ({budget} steps)", total=None)
            controllers[budget] = train_controller(env_id, seed, budget, max_episode_steps)
        task = progress_bar.add_task(f"collecting {env_id} with {spec.spec}", total=episodes)

        rng = np.random.default_rng([seed, 2])
        columns: dict[str, list[Any]] = {c: [] for c in STEP_COLUMNS}
        lengths: list[int] = []
        chosen = rng.choice(len(spec.components), size=episodes, p=spec.weights)
        # The Gaussian noise comes from torch's generator: seed it, and leave the caller's state alone.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(int(rng.integers(0, 2**31 - 1)))
            for episode in range(episodes):
                component = spec.components[chosen[episode]]
                controller = controllers.get(component.budget_steps or budget_steps)
                if controller is None or component.std is None:
                    choose = _uniform_box(rng, low, high)
                else:
                    choose = squashed_gaussian(controller.policy, component.std)
                lengths.append(record_episode(env, int(rng.integers(0, 2**31 - 1)), choose, columns))
                progress_bar.advance(task)
    env.close()

    action = np.stack(columns["action"])
    on_bound = (action <= low + bound_tolerance(low)) | (action >= high - bound_tolerance(high))
    counts = np.bincount(chosen, minlength=len(spec.components))
    extra: dict[str, Any] = {
        "seed": seed,
        "episodes": episodes,
        "episodes_per_component": {c.spec: int(k) for c, k in zip(spec.components, counts, strict=True)},
        "rows_with_an_action_on_a_bound": int(on_bound.any(axis=1).sum()),
    }
    if controllers:
        extra["controllers"] = {str(b): c.train_info for b, c in controllers.items()}
    meta = DatasetMeta(
        env_id=env_id,
        observation_space=box_space(handle.observation_space.low, handle.observation_space.high),
        action_space=box_space(low, high),
        behavior_policy=spec.spec if policy_dir is None else f"{spec.spec} around {policy_dir}",
        source="collect",
        extra=extra,
    )
    return transitions_from_steps(columns, lengths, meta)
