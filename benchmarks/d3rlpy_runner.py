"""Train one d3rlpy algorithm on an rlops Parquet dataset and print one JSON line.

Discrete datasets (an integer ``action`` column) train DiscreteCQL or DiscreteBC; continuous ones (a
list ``action`` column with a Box action space in the rlops metadata) train CQL, IQL, TD3+BC or BC,
with the action bounds given to d3rlpy's MinMaxActionScaler and observations standardised as rlops does.

This script runs inside the benchmark's own d3rlpy virtual environment (d3rlpy 2.8.1 pins
gymnasium 1.0.0, which cannot share an environment with Ray), so it imports nothing from rlops:
it reads the Parquet columns with pyarrow directly. ``benchmarks/offline.py`` starts it once per
(algorithm, seed).

Everything not set here keeps d3rlpy's default for that algorithm. Aligned with the rlops run:
gradient steps, batch size, hidden layer widths and the thread count; with ``--align`` also
learning rate, discount, target-network update interval and CQL alpha.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Set before torch starts its thread pools; offline.py also sets it in the child's environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pyarrow.parquet as pq
import torch

ALGORITHMS = ("cql", "bc", "iql", "td3bc")
CONTINUOUS_ONLY = ("iql", "td3bc")
NAMES = {
    (False, "cql"): "DiscreteCQL",
    (False, "bc"): "DiscreteBC",
    (True, "cql"): "CQL",
    (True, "iql"): "IQL",
    (True, "td3bc"): "TD3PlusBC",
    (True, "bc"): "BC",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True, help="rlops Parquet dataset")
    p.add_argument("--algo", choices=ALGORITHMS, required=True, help="cql, bc, iql, td3bc (Box only)")
    p.add_argument("--seed", type=int, required=True, help="seed for d3rlpy (python, numpy, torch)")
    p.add_argument("--steps", type=int, required=True, help="gradient steps")
    p.add_argument("--batch-size", type=int, required=True, help="transitions per gradient step")
    p.add_argument("--hidden", default="256,256", help="hidden layer widths, comma separated")
    p.add_argument("--align", action="store_true", help="also set lr, gamma, target update, alpha")
    p.add_argument("--lr", type=float, default=None, help="learning rate (only with --align)")
    p.add_argument("--gamma", type=float, default=None, help="discount (only with --align)")
    p.add_argument("--target-update", type=int, default=None, help="target sync interval (--align)")
    p.add_argument("--alpha", type=float, default=None, help="CQL penalty weight (only with --align)")
    p.add_argument("--eval-episodes", type=int, default=20, help="greedy rollouts in CartPole-v1")
    p.add_argument("--eval-seed", type=int, default=0, help="episode i is reset with eval_seed + i")
    p.add_argument("--env-id", default="CartPole-v1", help="Gymnasium environment for the rollouts")
    p.add_argument("--export", type=Path, default=None, help="write d3rlpy's TorchScript policy here")
    args = p.parse_args(argv)
    if not args.dataset.is_file():
        p.error(f"--dataset {args.dataset}: no such file (an rlops Parquet dataset is expected)")
    if args.steps < 1 or args.batch_size < 1 or args.eval_episodes < 0:
        p.error("--steps and --batch-size must be >= 1 and --eval-episodes >= 0")
    try:
        args.hidden_units = [int(w) for w in args.hidden.split(",")]
    except ValueError:
        p.error(f"--hidden must be comma-separated integers like 256,256, got {args.hidden!r}")
    return args


def read_dataset(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """The rlops columns d3rlpy needs, as numpy arrays (rows grouped by episode, ordered by step), and the
    Box action space from the rlops metadata (None for discrete data)."""
    table = pq.read_table(path)
    missing = {"observation", "action", "reward", "terminated", "truncated"} - set(table.column_names)
    if missing:
        raise SystemExit(f"{path}: missing columns {sorted(missing)}")
    n = table.num_rows
    obs_col = table.column("observation").combine_chunks()
    observations = np.asarray(obs_col.flatten(), dtype=np.float32).reshape(n, -1)
    terminated = np.asarray(table.column("terminated"), dtype=bool)
    truncated = np.asarray(table.column("truncated"), dtype=bool)
    action_col = table.column("action").combine_chunks()
    box = None
    if hasattr(action_col, "flatten"):
        actions = np.asarray(action_col.flatten(), dtype=np.float32).reshape(n, -1)
        meta = json.loads((table.schema.metadata or {}).get(b"rlops", b"{}"))
        box = meta.get("action_space")
        if not box or box.get("type") != "Box":
            raise SystemExit(f"{path}: a list action column needs a Box action_space in the rlops metadata")
    else:
        actions = np.asarray(action_col, dtype=np.int64)
    return {
        "observations": observations,
        "actions": actions,
        "rewards": np.asarray(table.column("reward"), dtype=np.float32),
        "terminals": terminated.astype(np.float32),
        # d3rlpy refuses rows that are both terminal and timeout; a terminal row already ends the
        # episode and stops bootstrapping, so it wins.
        "timeouts": (truncated & ~terminated).astype(np.float32),
    }, box


def make_continuous(args: argparse.Namespace, d3rlpy: Any, box: dict[str, Any]) -> Any:
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=args.hidden_units)
    settings: dict[str, Any] = {
        "batch_size": args.batch_size,
        "actor_encoder_factory": encoder,
        "critic_encoder_factory": encoder,
        "observation_scaler": d3rlpy.preprocessing.StandardObservationScaler(),
        "action_scaler": d3rlpy.preprocessing.MinMaxActionScaler(
            minimum=np.asarray(box["low"], dtype=np.float32),
            maximum=np.asarray(box["high"], dtype=np.float32),
        ),
    }
    if args.align:
        aligned = {"actor_learning_rate": args.lr, "critic_learning_rate": args.lr, "gamma": args.gamma}
        settings |= {k: v for k, v in aligned.items() if v is not None}
    if args.algo == "cql":
        if args.align and args.alpha is not None:
            settings["conservative_weight"] = args.alpha
        return d3rlpy.algos.CQLConfig(**settings)
    if args.algo == "iql":
        return d3rlpy.algos.IQLConfig(**settings, value_encoder_factory=encoder)
    if args.algo == "td3bc":
        return d3rlpy.algos.TD3PlusBCConfig(**settings)
    bc = {k: v for k, v in settings.items() if k not in ("actor_encoder_factory", "critic_encoder_factory")}
    if "actor_learning_rate" in bc:
        bc["learning_rate"] = bc.pop("actor_learning_rate")
        bc.pop("critic_learning_rate")
    bc.pop("gamma", None)
    return d3rlpy.algos.BCConfig(**bc, encoder_factory=encoder, policy_type="deterministic")


def make_algo(
    args: argparse.Namespace, d3rlpy: Any, box: dict[str, Any] | None
) -> tuple[Any, dict[str, Any]]:
    if box is not None:
        config = make_continuous(args, d3rlpy, box)
        # The scalers are fitted on the dataset later, so d3rlpy cannot serialise them yet: show their names.
        shown = {}
        for key in config.__dataclass_fields__:
            value = getattr(config, key)
            if isinstance(value, int | float | str | bool):
                shown[key] = value
            elif key.endswith("_scaler") and value is not None:
                shown[key] = type(value).__name__
        shown["hidden_units"] = args.hidden_units
        return config.create(device="cpu:0"), shown
    if args.algo in CONTINUOUS_ONLY:
        raise SystemExit(f"--algo {args.algo} needs a continuous (Box) dataset; this one is discrete")
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=args.hidden_units)
    settings: dict[str, Any] = {"batch_size": args.batch_size, "encoder_factory": encoder}
    if args.align:
        aligned = {"learning_rate": args.lr}
        if args.algo == "cql":
            aligned |= {
                "gamma": args.gamma,
                "target_update_interval": args.target_update,
                "alpha": args.alpha,
            }
        settings |= {k: v for k, v in aligned.items() if v is not None}
    if args.algo == "cql":
        config = d3rlpy.algos.DiscreteCQLConfig(**settings)
    else:
        config = d3rlpy.algos.DiscreteBCConfig(**settings)
    shown = {k: v for k, v in config.serialize_to_dict().items() if k not in ("encoder_factory",)}
    shown["hidden_units"] = args.hidden_units
    return config.create(device="cpu:0"), shown


def rollout(policy: Any, env_id: str, episodes: int, seed: int, continuous: bool) -> list[float]:
    if episodes == 0:  # the caller rolls the exported policy out itself (this venv may lack the env)
        return []
    import gymnasium as gym

    env = gym.make(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            predicted = policy.predict(np.asarray(obs, dtype=np.float32)[None])[0]
            action = np.asarray(predicted, dtype=np.float32) if continuous else int(predicted)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)

    # d3rlpy and structlog print to stdout; stdout is reserved for the one JSON result line.
    with contextlib.redirect_stdout(sys.stderr):
        import d3rlpy

        columns, box = read_dataset(args.dataset)
        d3rlpy.seed(args.seed)
        space = d3rlpy.ActionSpace.CONTINUOUS if box is not None else d3rlpy.ActionSpace.DISCRETE
        dataset = d3rlpy.dataset.MDPDataset(**columns, action_space=space)
        algo, config = make_algo(args, d3rlpy, box)
        algo.build_with_dataset(dataset)

        marks: list[float] = []

        def on_step(_algo: Any, _epoch: int, total_step: int) -> None:
            if total_step == 1 or total_step == args.steps:
                marks.append(time.perf_counter())

        start = time.perf_counter()
        algo.fit(
            dataset,
            n_steps=args.steps,
            n_steps_per_epoch=args.steps,
            logger_adapter=d3rlpy.logging.NoopAdapterFactory(),
            show_progress=False,
            evaluators=None,
            callback=on_step,
        )
        fit_s = time.perf_counter() - start
        # The steady-state rate between the first and the last step leaves out fit()'s setup.
        loop_rate = (args.steps - 1) / (marks[-1] - marks[0]) if len(marks) == 2 else math.nan

        returns = rollout(algo, args.env_id, args.eval_episodes, args.eval_seed, box is not None)
        if args.export is not None:
            args.export.parent.mkdir(parents=True, exist_ok=True)
            algo.save_policy(str(args.export))

    result = {
        "library": "d3rlpy",
        "version": d3rlpy.__version__,
        "algorithm": NAMES[(box is not None, args.algo)],
        "seed": args.seed,
        "steps": args.steps,
        "fit_wall_s": fit_s,
        "steps_per_s": args.steps / fit_s,
        "loop_steps_per_s": loop_rate,
        "n_transitions_sampled_from": int(dataset.transition_count),
        "eval_returns": returns,
        "eval_mean_return": float(np.mean(returns)) if returns else math.nan,
        "torch_threads": torch.get_num_threads(),
        "config": config,
        "export": str(args.export) if args.export is not None else None,
    }
    print(json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
