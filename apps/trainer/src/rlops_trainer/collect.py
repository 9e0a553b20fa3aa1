"""Record a transition dataset from a Gymnasium environment with behaviour policies of graded quality.

Behaviour specs:

* ``random``: uniform over the actions; log-propensity ``-log(n)``.
* ``eps-greedy:<eps>``: with probability ``eps`` a uniform action, otherwise the greedy action of a
  briefly trained linear policy; the logged propensity is ``(1 - eps) * [a == greedy] + eps / n``.
  ``eps-greedy:<eps>@<steps>`` trains that policy with a budget of ``<steps>`` environment steps
  instead of the default: a smaller budget gives a weaker greedy policy (a second quality knob).
* ``mixture:<component>=<weight>,...``: every *episode* draws one component (``random`` or
  ``eps-greedy:<eps>``) with the given weights and follows it to the end; the logged propensity
  is that component's.

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
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rlops_trainer.datasets import DatasetMeta, Transitions, box_space, discrete_space, validate

CARTPOLE_MIXED = "mixture:eps-greedy:0.1@2000=0.58,eps-greedy:0.3=0.09,random=0.33"
"""The mixed-quality CartPole-v1 behaviour of the demo and the benchmark, modelled on production logs:
most episodes come from a mediocre incumbent (epsilon-greedy around a policy trained on a 2,000-step
budget), a few from a better but noisy policy (epsilon 0.3 around the fully trained one), a third are
uniform exploration. Cloning the majority reproduces the mediocre policy; learning from the rewards
can do better. The behaviour policy averages under 150 (see docs/benchmarks.md)."""

TRAIN_BUDGET_STEPS = 20_000
"""Environment steps the cross-entropy method may spend training the greedy policy."""

BEHAVIOR_FORMS = (
    "accepted behaviours: 'random'; 'eps-greedy:<eps>' or 'eps-greedy:<eps>@<training steps>' with "
    "0 <= eps <= 1; 'mixture:<component>=<weight>,...' with components 'random' or 'eps-greedy:...' "
    "and positive weights, e.g. 'mixture:random=0.5,eps-greedy:0.3@2000=0.5'"
)


class CollectError(ValueError):
    """Bad input to :func:`collect` (environment id, behaviour spec, episode count)."""


# --------------------------------------------------------------------------------------------------
# Behaviour specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One behaviour: uniform exploration with probability ``epsilon``, greedy otherwise."""

    epsilon: float
    """1.0 for ``random``: no greedy policy is needed."""
    spec: str
    budget_steps: int | None = None
    """Training budget of this component's greedy policy; None: the collection's default."""

    @property
    def needs_policy(self) -> bool:
        return self.epsilon < 1.0


@dataclass(frozen=True)
class Behavior:
    components: tuple[Component, ...]
    weights: tuple[float, ...]
    """Normalised episode probabilities of the components."""
    spec: str
    """Canonical spec string, stored as the dataset's behaviour policy."""


def _parse_component(text: str, whole: str) -> Component:
    text = text.strip()
    if text == "random":
        return Component(epsilon=1.0, spec="random")
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
        if match.group(2) is None:
            return Component(epsilon=eps, spec=f"eps-greedy:{eps:g}")
        budget_text = match.group(2)
        if not budget_text.isdigit() or int(budget_text) < 1:
            raise CollectError(
                f"bad training budget {budget_text!r} in behaviour {whole!r}: a positive whole number of "
                f"environment steps; {BEHAVIOR_FORMS}"
            )
        budget = int(budget_text)
        return Component(epsilon=eps, spec=f"eps-greedy:{eps:g}@{budget}", budget_steps=budget)
    raise CollectError(f"unknown behaviour component {text!r} in {whole!r}; {BEHAVIOR_FORMS}")


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
    start: int
    """Value of the first action (``Discrete.start``): dataset actions are 0-based."""
    observation_space: gym.spaces.Box


def make_env(
    env_id: str, max_episode_steps: int | None = None, kwargs: dict[str, Any] | None = None
) -> EnvHandle:
    """``gym.make`` with errors that say what is accepted: Box observations, Discrete actions.

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
    if not isinstance(env.action_space, gym.spaces.Discrete):
        env.close()
        raise CollectError(
            f"{env_id} has action space {env.action_space}: only Discrete action spaces are supported for now"
        )
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise CollectError(
            f"{env_id} has observation space {env.observation_space}: "
            "only Box observation spaces are supported"
        )
    action_space, observation_space = env.action_space, env.observation_space
    if env.spec is None or env.spec.max_episode_steps is None:
        env.close()
        raise CollectError(f"{env_id} has no time limit: pass max_episode_steps so that every episode ends")
    return EnvHandle(env, int(action_space.n), int(action_space.start), observation_space)


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
# Collection
# --------------------------------------------------------------------------------------------------


def collect(
    env_id: str,
    behavior: str,
    episodes: int,
    seed: int,
    progress: bool = True,
    *,
    max_episode_steps: int | None = None,
    budget_steps: int = TRAIN_BUDGET_STEPS,
) -> Transitions:
    """Roll out ``behavior`` for ``episodes`` episodes and return the validated transitions.

    The same arguments give the same dataset (and fingerprint) on the same machine.
    """
    spec = parse_behavior(behavior)
    if episodes < 1:
        raise CollectError(f"episodes must be at least 1, got {episodes}")
    handle = make_env(env_id, max_episode_steps)
    env, n, start = handle.env, handle.n_actions, handle.start
    obs_space = handle.observation_space
    console = Console(stderr=True)
    progress_bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    )

    # One greedy policy per training budget; components with the same budget share it.
    policies: dict[int, LinearPolicy] = {}
    with progress_bar:
        for budget in sorted({c.budget_steps or budget_steps for c in spec.components if c.needs_policy}):
            progress_bar.add_task(f"training a greedy policy on {env_id} ({budget} steps)", total=None)
            policies[budget] = train_greedy_policy(env_id, seed, budget, max_episode_steps)
        task = progress_bar.add_task(f"collecting {env_id} with {spec.spec}", total=episodes)

        rng = np.random.default_rng([seed, 2])
        log_uniform = -math.log(n)
        columns: dict[str, list[Any]] = {
            c: [] for c in ("obs", "action", "reward", "next_obs", "term", "trunc")
        }
        logps: list[float] = []
        lengths: list[int] = []
        chosen = rng.choice(len(spec.components), size=episodes, p=spec.weights)
        for episode in range(episodes):
            component = spec.components[chosen[episode]]
            eps = component.epsilon
            policy = policies.get(component.budget_steps or budget_steps)
            # Both branches give exact probabilities: the greedy action also wins eps / n of the time.
            log_greedy = math.log((1.0 - eps) + eps / n) if eps < 1.0 else log_uniform
            log_other = math.log(eps / n) if eps > 0.0 else -math.inf
            obs, _ = env.reset(seed=int(rng.integers(0, 2**31 - 1)))
            obs = np.asarray(obs, dtype=np.float32).ravel()
            steps = 0
            while True:
                if eps >= 1.0 or policy is None:
                    action, logp = int(rng.integers(n)), log_uniform
                else:
                    greedy = policy.act(obs.astype(np.float64))
                    action = int(rng.integers(n)) if rng.random() < eps else greedy
                    logp = log_greedy if action == greedy else log_other
                next_obs, reward, terminated, truncated, _ = env.step(start + action)
                next_obs = np.asarray(next_obs, dtype=np.float32).ravel()
                columns["obs"].append(obs)
                columns["action"].append(action)
                columns["reward"].append(float(reward))
                columns["next_obs"].append(next_obs)
                columns["term"].append(bool(terminated))
                columns["trunc"].append(bool(truncated) and not terminated)
                logps.append(min(logp, 0.0))
                obs = next_obs
                steps += 1
                if terminated or truncated:
                    break
            lengths.append(steps)
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
    length_arr = np.asarray(lengths, dtype=np.int64)
    episode_id = np.repeat(np.arange(episodes, dtype=np.int64), length_arr)
    starts = np.concatenate([[0], np.cumsum(length_arr)[:-1]])
    step = np.arange(int(length_arr.sum()), dtype=np.int64) - np.repeat(starts, length_arr)
    t = Transitions(
        episode_id=episode_id,
        step=step,
        observation=np.stack(columns["obs"]),
        action=np.asarray(columns["action"], dtype=np.int64),
        reward=np.asarray(columns["reward"], dtype=np.float32),
        next_observation=np.stack(columns["next_obs"]),
        terminated=np.asarray(columns["term"], dtype=np.bool_),
        truncated=np.asarray(columns["trunc"], dtype=np.bool_),
        behavior_logp=np.asarray(logps, dtype=np.float32),
        meta=meta,
    )
    return validate(t)
