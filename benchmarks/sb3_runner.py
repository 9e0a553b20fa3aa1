"""One Stable-Baselines3 PPO run of the online benchmark, in SB3's own environment (.venv-sb3).

    benchmarks/.venv-sb3/bin/python benchmarks/sb3_runner.py --seed 0 --spawned-at <unix time>

The hyperparameters are rl-zoo3's for CartPole-v1 (hyperparams/ppo.yml): 8 environments, n_steps 32,
batch_size 256, gae_lambda 0.8, gamma 0.98, n_epochs 20, ent_coef 0, learning rate and clip range
decaying linearly from 1e-3 and 0.2 over 1e5 steps, MlpPolicy. One torch thread, as every framework
here. The last stdout line is ``RESULT <json>``, the same format as ``online_runner.py``, with one point
per finished episode. Imports nothing from rlops.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402 (the first line of the process is the clock)
import json  # noqa: E402
from collections import deque  # noqa: E402
from typing import Any  # noqa: E402

ZOO_TIMESTEPS = 100_000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--spawned-at", type=float, default=STARTED)
    parser.add_argument("--target", type=float, default=475.0)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--max-env-steps", type=int, default=ZOO_TIMESTEPS)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args()

    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "framework": "sb3",
        "seed": args.seed,
        "spawned_at": args.spawned_at,
        "t_process": STARTED,
        "points": [],
    }

    def linear(start: float) -> Any:
        return lambda progress_remaining: progress_remaining * start

    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=args.seed,
        device="cpu",
        verbose=0,
    )
    out["config"] = {
        "n_envs": 8,
        "n_steps": 32,
        "batch_size": 256,
        "n_epochs": 20,
        "timesteps": ZOO_TIMESTEPS,
    }
    window: deque[float] = deque(maxlen=args.window)

    class Record(BaseCallback):
        def _on_training_start(self) -> None:
            out["t_first_step"] = time.time()
            out["cpu_first_step"] = time.process_time()

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    window.append(float(info["episode"]["r"]))
                    mean = sum(window) / len(window) if len(window) >= args.window else None
                    out["points"].append([float(self.num_timesteps), time.time(), mean, time.process_time()])
                    if mean is not None and mean >= args.target:
                        return False
            budget_spent = time.time() - out["t_first_step"] >= args.max_seconds
            return not (budget_spent or self.num_timesteps >= args.max_env_steps)

    # The zoo's horizon, so that the linear schedules decay as they do there; the callback stops early.
    model.learn(ZOO_TIMESTEPS, callback=Record())
    out["t_end"] = time.time()
    out["env_steps"] = float(model.num_timesteps)
    out["train_time_s"] = out["t_end"] - out["t_first_step"]
    print("RESULT " + json.dumps(out, allow_nan=False))


if __name__ == "__main__":
    main()
