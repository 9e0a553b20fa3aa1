"""D4RL-style MuJoCo datasets from a Stable-Baselines3 SAC run, in SB3's own environment (.venv-sb3).

    # train SAC, keep every transition it saw ("medium-replay") and the policy it ended with
    benchmarks/.venv-sb3/bin/python benchmarks/mujoco_data.py train --env Hopper-v5 --steps 60000 --out DIR
    # play that policy, sampling its actions, for N transitions ("medium")
    benchmarks/.venv-sb3/bin/python benchmarks/mujoco_data.py rollout --env Hopper-v5 --out DIR

D4RL built its MuJoCo datasets the same way: "medium" is played by a SAC policy trained part of the way,
its actions sampled; "medium-replay" is that run's replay buffer up to the point where it stopped. SAC's
settings are rl-zoo3's for these tasks (SB3's defaults with 10,000 uniform random steps first). Both files
are in D4RL's HDF5 layout: ``observations, actions, rewards, terminals, timeouts, next_observations`` and
``infos/action_log_probs``, the exact log-density of each logged action in the environment's action space
(uniform for the warm-up steps, the tanh-squashed Gaussian afterwards), so that importance-weighted
estimators have propensities. The file's ``env_id`` attribute names the task.

Runs on CPU or CUDA (``--device``); one torch thread unless ``--threads`` says otherwise. Imports nothing
from rlops (``benchmarks/continuous.py`` imports :func:`write_d4rl_hdf5` from here). The last stdout
line is ``RESULT <json>``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

D4RL_COLUMNS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def write_d4rl_hdf5(columns: dict[str, np.ndarray], path: Path, attrs: dict[str, Any] | None = None) -> Path:
    """Write ``columns`` (D4RL's names; ``infos/...`` keys become the ``infos`` group) to ``path``.

    Compressed (gzip with byte shuffling, which h5py reads back transparently); written to a temporary
    file first and renamed, so that an interrupted run leaves no half-written dataset behind."""
    missing = [c for c in D4RL_COLUMNS[:5] if c not in columns]
    if missing:
        raise ValueError(f"D4RL layout needs {', '.join(missing)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for key, value in columns.items():
            f.create_dataset(key, data=value, compression="gzip", shuffle=True)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
    tmp.replace(path)
    return path


def stem(env_id: str) -> str:
    """File-name form of a task id (``Hopper-v5`` -> ``hopper-v5``): datasets are ``<stem>-<name>.hdf5``."""
    return env_id.lower()


class Recorder:
    """Transitions as they happen, with the log-density of each action under what chose it."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        self.half_log = float(np.log((high - low) / 2.0).sum())
        self.uniform_logp = -float(np.log(high - low).sum())
        self.rows: dict[str, list[Any]] = {k: [] for k in (*D4RL_COLUMNS, "infos/action_log_probs")}
        self.returns: list[float] = []
        self.lengths: list[int] = []
        self._ret = 0.0
        self._len = 0

    def add(
        self,
        obs: Any,
        action: Any,
        reward: float,
        terminated: bool,
        truncated: bool,
        next_obs: Any,
        logp: float,
    ) -> None:
        r = self.rows
        r["observations"].append(np.asarray(obs, dtype=np.float32))
        r["actions"].append(np.asarray(action, dtype=np.float32))
        r["rewards"].append(float(reward))
        r["terminals"].append(bool(terminated))
        r["timeouts"].append(bool(truncated))
        r["next_observations"].append(np.asarray(next_obs, dtype=np.float32))
        r["infos/action_log_probs"].append(float(logp))
        self._ret += float(reward)
        self._len += 1
        if terminated or truncated:
            self.returns.append(self._ret)
            self.lengths.append(self._len)
            self._ret, self._len = 0.0, 0

    def __len__(self) -> int:
        return len(self.rows["rewards"])

    def columns(self) -> dict[str, np.ndarray]:
        out = {
            k: np.stack(v)
            for k, v in self.rows.items()
            if k in ("observations", "actions", "next_observations")
        }
        out["rewards"] = np.asarray(self.rows["rewards"], dtype=np.float32)
        out["terminals"] = np.asarray(self.rows["terminals"], dtype=np.bool_)
        out["timeouts"] = np.asarray(self.rows["timeouts"], dtype=np.bool_)
        out["infos/action_log_probs"] = np.asarray(self.rows["infos/action_log_probs"], dtype=np.float32)
        return out

    def summary(self) -> dict[str, Any]:
        rets = np.asarray(self.returns) if self.returns else np.asarray([math.nan])
        return {
            "transitions": len(self),
            "episodes": len(self.returns),
            "return_mean": float(rets.mean()),
            "return_std": float(rets.std()),
            "return_max": float(rets.max()),
            "length_mean": float(np.mean(self.lengths)) if self.lengths else math.nan,
        }


def _bounds(env: Any, env_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The task's action bounds; SAC and these datasets are for Box actions only."""
    import gymnasium as gym

    if not isinstance(env.action_space, gym.spaces.Box):
        raise SystemExit(f"--env {env_id}: actions are {env.action_space}; a Box action space is needed")
    return (
        np.asarray(env.action_space.low, dtype=np.float64),
        np.asarray(env.action_space.high, dtype=np.float64),
    )


def _policy_logp(model: Any, obs: np.ndarray, scaled_action: np.ndarray, half_log: float) -> float:
    """log pi(a|s) of one action in the environment's action space: SB3's squashed-Gaussian density of the
    scaled action in [-1, 1]^k, less the log of the rescaling into the space's bounds."""
    import torch

    actor = model.actor
    with torch.no_grad():
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=model.device).reshape(1, -1)
        mean, log_std, _ = actor.get_action_dist_params(obs_t)
        dist = actor.action_dist.proba_distribution(mean, log_std)
        act_t = torch.as_tensor(scaled_action, dtype=torch.float32, device=model.device).reshape(1, -1)
        return float(dist.log_prob(act_t).item()) - half_log


def train(args: argparse.Namespace) -> dict[str, Any]:
    import gymnasium as gym
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(args.threads)
    env = gym.make(args.env)
    low, high = _bounds(env, args.env)
    model = SAC(
        "MlpPolicy", env, learning_starts=args.learning_starts, seed=args.seed, device=args.device, verbose=0
    )
    rec = Recorder(low, high)
    started = time.time()
    curve: list[list[float]] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            loc = self.locals
            obs = self.model._last_obs[0]
            info = loc["infos"][0]
            done = bool(loc["dones"][0])
            truncated = bool(info.get("TimeLimit.truncated", False))
            terminated = done and not truncated
            next_obs = info["terminal_observation"] if done else loc["new_obs"][0]
            scaled = loc["buffer_actions"][0]
            # the action was chosen before num_timesteps counted it: uniform during the warm-up
            if self.num_timesteps - 1 < args.learning_starts:
                logp = rec.uniform_logp
            else:
                logp = _policy_logp(self.model, obs, scaled, rec.half_log)
            rec.add(obs, loc["actions"][0], float(loc["rewards"][0]), terminated, truncated, next_obs, logp)
            if self.num_timesteps % args.report_every == 0:
                last = rec.returns[-10:]
                elapsed = time.time() - started
                mean = float(np.mean(last)) if last else math.nan
                curve.append([self.num_timesteps, elapsed, mean])
                print(
                    f"{args.env} {self.num_timesteps} steps {elapsed:.0f}s "
                    f"{self.num_timesteps / elapsed:.0f} steps/s, last 10 episodes {mean:.1f}",
                    flush=True,
                )
            return self.num_timesteps < args.steps and time.time() - started < args.max_seconds

    model.learn(args.steps, callback=Record())
    elapsed = time.time() - started
    out = Path(args.out)
    task = stem(args.env)
    h5 = write_d4rl_hdf5(
        rec.columns(),
        out / f"{task}-medium-replay.hdf5",
        {"env_id": args.env, "behavior": f"SB3 SAC replay, {model.num_timesteps} steps, seed {args.seed}"},
    )
    model.save(out / f"{task}-sac.zip")
    result = {
        "env": args.env,
        "device": args.device,
        "threads": args.threads,
        "seed": args.seed,
        "learning_starts": args.learning_starts,
        "env_steps": int(model.num_timesteps),
        "train_s": elapsed,
        "steps_per_s": model.num_timesteps / elapsed,
        "medium_replay": {"path": str(h5), **rec.summary()},
        "curve": curve,
    }
    (out / f"{task}-sac.json").write_text(json.dumps(result, indent=1))
    return result


def rollout(args: argparse.Namespace) -> dict[str, Any]:
    import gymnasium as gym
    import torch
    from stable_baselines3 import SAC

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    task = stem(args.env)
    model = SAC.load(args.model or out / f"{task}-sac.zip", device=args.device)
    env = gym.make(args.env)
    low, high = _bounds(env, args.env)
    rec = Recorder(low, high)
    started = time.time()
    episode = 0
    while len(rec) < args.transitions:
        obs, _ = env.reset(seed=args.seed + episode)
        done = False
        while not done:
            scaled, _ = model.predict(obs, deterministic=args.deterministic)
            scaled = np.clip(np.asarray(scaled, dtype=np.float64), -1.0, 1.0)
            action = low + (scaled + 1.0) * (high - low) / 2.0
            logp = math.nan if args.deterministic else _policy_logp(model, obs, scaled, rec.half_log)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
            rec.add(obs, action, float(reward), terminated, truncated, next_obs, logp)
            obs = next_obs
        episode += 1
        if episode % 10 == 0:
            print(f"{args.env} rollout: {episode} episodes, {len(rec)} transitions", flush=True)
    name = "expert-like" if args.deterministic else "medium"
    columns = rec.columns()
    if args.deterministic:
        del columns["infos/action_log_probs"]
    h5 = write_d4rl_hdf5(
        columns,
        out / f"{task}-{args.name or name}.hdf5",
        {
            "env_id": args.env,
            "behavior": f"SB3 SAC policy {model.num_timesteps} steps, sampled, seed {args.seed}",
        },
    )
    result = {
        "env": args.env,
        "policy_env_steps": int(model.num_timesteps),
        "seconds": time.time() - started,
        "dataset": {"path": str(h5), **rec.summary()},
    }
    (out / f"{task}-{args.name or name}.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "rollout"):
        p = sub.add_parser(name)
        p.add_argument(
            "--env", required=True, help="a Gymnasium MuJoCo task, e.g. Hopper-v5 or HalfCheetah-v5"
        )
        p.add_argument("--out", required=True, help="folder for the datasets, the policy and a summary")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument("--threads", type=int, default=1, help="torch threads")
    t = sub.choices["train"]
    t.add_argument("--steps", type=int, default=100_000, help="environment steps (one gradient step each)")
    t.add_argument("--max-seconds", type=float, default=math.inf, help="stop training after this long")
    t.add_argument("--learning-starts", type=int, default=10_000, help="uniform random steps first")
    t.add_argument("--report-every", type=int, default=5_000)
    r = sub.choices["rollout"]
    r.add_argument("--model", default=None, help="the SAC policy (default: OUT/<env>-sac.zip)")
    r.add_argument("--transitions", type=int, default=100_000, help="at least this many (whole episodes)")
    r.add_argument("--deterministic", action="store_true", help="play the mean action (no log-densities)")
    r.add_argument("--name", default=None, help="dataset name (default: medium)")
    args = parser.parse_args()
    if args.command == "train" and args.steps <= args.learning_starts:
        parser.error(f"--steps ({args.steps}) must exceed --learning-starts ({args.learning_starts})")
    result = train(args) if args.command == "train" else rollout(args)
    print("RESULT " + json.dumps(result, allow_nan=True))


if __name__ == "__main__":
    main()
