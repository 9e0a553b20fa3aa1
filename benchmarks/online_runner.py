"""One run of the online benchmark in this process: rlops PPO or RLlib's default PPO on CartPole-v1.

    .venv/bin/python benchmarks/online_runner.py rlops --seed 0 --spawned-at <unix time> ...
    .venv/bin/python benchmarks/online_runner.py rllib --seed 0 --spawned-at <unix time> ...

``benchmarks/online.py`` starts one of these per (framework, seed), so that every run pays its own
imports and Ray start-up. Progress goes to stderr; the last stdout line is ``RESULT <json>`` with
absolute timestamps and one point per training iteration: ``[env steps, unix time, mean return of the
last WINDOW episodes or null, CPU seconds of this process]``. The run stops once that mean reaches the
target or a budget is spent.

* ``rlops``: ``rlops_trainer.online.run.train_online`` with ``configs/online/cartpole-ppo.yaml``
  (the shipped defaults), export off (it happens after the measured part).
* ``rllib``: ``PPOConfig().environment("CartPole-v1")`` with RLlib's defaults; only the seed, a
  callback that reports finished episodes (the same one rlops uses) and a local Ray are added.
"""

from __future__ import annotations

import time

STARTED = time.time()

import argparse  # noqa: E402 (the first line of the process is the clock)
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import deque  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "online" / "cartpole-ppo.yaml"


def run_rlops(args: argparse.Namespace, out: dict[str, Any]) -> None:
    from rlops_trainer.online.config import load_config
    from rlops_trainer.online.run import OnlineRun, train_online

    cfg = load_config(
        args.config,
        [
            f"seed={args.seed}",
            f"stop.env_steps={args.max_env_steps}",
            f"stop.time_s={args.max_seconds}",
            f"stop.target_return={args.target}",
            f"metrics.episode_window={args.window}",
            "metrics.port=0",
            "checkpoint.every=0",
            *args.set,
        ],
    )
    out["config"] = cfg.to_dict()

    def on_iteration(algo: Any, record: dict[str, float]) -> None:
        if "t_first_step" not in out:
            out["t_first_step"] = time.time() - record["time_s"]
            out["cpu_first_step"] = time.process_time() - record["time_s"]
        full = record["episodes"] >= args.window
        mean = record["episode_return_mean"] if full else None
        out["points"].append([record["env_steps"], time.time(), mean, time.process_time()])

    with tempfile.TemporaryDirectory(prefix="rlops-bench-") as tmp:
        result = train_online(
            cfg, OnlineRun(out_dir=Path(tmp), progress=False, export=False, on_iteration=on_iteration)
        )
    out["train_time_s"] = result.train_time_s
    out["env_steps"] = result.env_steps


def run_rllib(args: argparse.Namespace, out: dict[str, Any]) -> None:
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from rlops_trainer.online.rllib import EPISODES_KEY, EpisodeStats

    ray.init(include_dashboard=False, log_to_driver=False)
    config = PPOConfig().environment("CartPole-v1").callbacks(EpisodeStats).debugging(seed=args.seed)
    keys = ("num_env_runners", "num_envs_per_env_runner", "train_batch_size_per_learner", "minibatch_size")
    out["config"] = {
        k: getattr(config, k) for k in (*keys, "num_epochs", "lr", "vf_clip_param", "use_kl_loss")
    }
    algo = config.build_algo()
    window: deque[float] = deque(maxlen=args.window)
    first = time.time()
    out["t_first_step"] = first
    out["cpu_first_step"] = time.process_time()
    steps = 0.0
    try:
        while True:
            result = algo.train()
            episodes = result.get("env_runners", {}).get(EPISODES_KEY)
            if isinstance(episodes, list):
                window.extend(float(e[0]) for e in episodes)
            steps = float(result["num_env_steps_sampled_lifetime"])
            mean = sum(window) / len(window) if len(window) >= args.window else None
            now = time.time()
            out["points"].append([steps, now, mean, time.process_time()])
            print(f"rllib seed {args.seed}: {int(steps)} steps, mean return {mean}", file=sys.stderr)
            if (
                (mean is not None and mean >= args.target)
                or steps >= args.max_env_steps
                or now - first >= args.max_seconds
            ):
                break
    finally:
        algo.stop()
        ray.shutdown()
    out["train_time_s"] = out["points"][-1][1] - first if out["points"] else 0.0
    out["env_steps"] = steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("framework", choices=("rlops", "rllib"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spawned-at", type=float, default=STARTED, help="Unix time the parent started this process."
    )
    parser.add_argument("--target", type=float, default=475.0)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--max-env-steps", type=int, default=500_000)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--config", type=Path, default=CONFIG, help="rlops config (rlops only).")
    parser.add_argument(
        "--set", action="append", default=[], help="rlops config override key=value (repeatable)."
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "framework": args.framework,
        "seed": args.seed,
        "spawned_at": args.spawned_at,
        "points": [],
    }
    out["t_process"] = STARTED
    (run_rlops if args.framework == "rlops" else run_rllib)(args, out)
    out["t_end"] = time.time()
    print("RESULT " + json.dumps(out, allow_nan=False, default=str))


if __name__ == "__main__":
    main()
