"""The scale path: the same learners and gradient step, data-parallel on Ray Train.

Ray Data reads the Parquet dataset and splits it between the workers; each worker turns its shard
into tensors on its device once and samples minibatches from it, exactly as the single-process loop
does. The learner is wrapped in DistributedDataParallel by ``ray.train.torch.prepare_model``, so
``loss.backward()`` in :func:`rlops_trainer.training.gradient_step` all-reduces the gradients and
every worker applies the same update. ``cfg.batch_size`` is the global batch: each of N workers
draws ``batch_size // N`` transitions per step.

Rank 0 writes ``metrics.jsonl`` and checkpoints in the same format and place as the single-process
loop (so either path can resume the other's run) and reports metrics and checkpoints to Ray Train.
On resume, weights, optimiser and step come from the checkpoint and each worker's minibatch stream
is re-seeded from (seed, rank, step).

Box datasets are refused here: the continuous learners train in one process (see
:func:`train_distributed`).

Metrics are the documented ones of :mod:`rlops_trainer.training`, averaged over the workers, plus
``world_size`` (workers that trained), ``rows_total`` (rows of all shards together) and, in the
reports to Ray, ``replica_divergence`` (max - min over workers of the sum of all weights: 0 while
DistributedDataParallel keeps the replicas identical).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from rlops_trainer.checkpoints import load_checkpoint, restore, resume_checkpoint, save_checkpoint
from rlops_trainer.datasets import COLUMNS, Transitions
from rlops_trainer.hyperparams import LoopConfig
from rlops_trainer.training import (
    METRICS_FILE,
    MetricWindow,
    RunOptions,
    TensorData,
    TrainResult,
    build_policy,
    check_data,
    check_finite,
    gradient_step,
    metric_names,
    observation_stats,
    seed_everything,
    served_selection,
    start_metrics,
)

CHECKPOINT_FILE = "state.pt"


def _column(table: pa.Table, name: str, rows: int) -> np.ndarray:
    col = table.column(name).combine_chunks()
    if (
        pa.types.is_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
        or pa.types.is_large_list(col.type)
    ):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(rows, -1)
    if name == "behavior_logp":
        col = col.fill_null(float("nan"))
    return col.to_numpy(zero_copy_only=False)


def shard_to_transitions(tables: list[pa.Table], meta: Any) -> Transitions:
    """The rows Ray Data handed this worker, as Transitions (column types as in the dataset contract)."""
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ValueError("this worker's dataset shard is empty: use fewer workers or a larger dataset")
    rows = table.num_rows
    dtypes = {
        "episode_id": np.int64,
        "step": np.int64,
        "observation": np.float32,
        "action": np.int64,
        "reward": np.float32,
        "next_observation": np.float32,
        "terminated": np.bool_,
        "truncated": np.bool_,
        "behavior_logp": np.float32,
    }
    arrays: dict[str, Any] = {c: np.asarray(_column(table, c, rows), dtype=dtypes[c]) for c in COLUMNS}
    return Transitions(**arrays, meta=meta)


def _stream_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def _worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from rlops_trainer.algos import LEARNERS

    torch.set_num_threads(config["threads"])
    algorithm: str = config["algorithm"]
    cfg: LoopConfig = config["cfg"]
    run: RunOptions = config["run"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    shard = ray.train.get_dataset_shard("train")
    local = shard_to_transitions(
        list(shard.iter_batches(batch_format="pyarrow", batch_size=None)), config["meta"]
    )
    tensors = TensorData(local, np.array(config["obs_mean"]), np.array(config["obs_std"]), device)
    # Collectives run on the device: NCCL (GPU) cannot reduce CPU tensors.
    rows = torch.tensor([float(tensors.n)], device=device)
    if world > 1:
        dist.all_reduce(rows)

    seed_everything(cfg.seed)
    learner = LEARNERS[algorithm](cfg, tensors.obs_dim, config["n_actions"]).to(device)
    model = ray.train.torch.prepare_model(learner, move_to_device=device)
    optimizer = learner.make_optimizer()
    generator = torch.Generator(device=device)
    generator.manual_seed(_stream_seed(cfg.seed, rank, 0))
    names = metric_names(learner, tensors.probe())
    window = MetricWindow(names, device)
    local_batch = cfg.batch_size // world

    out_dir: Path | None = run.out_dir
    step = 0
    # After a worker failure Ray restarts this function with the last reported checkpoint.
    reported = ray.train.get_checkpoint()
    state_path: Path | None = config["resume_from"]
    staged: tempfile.TemporaryDirectory[str] | None = None
    if reported is not None:
        staged = tempfile.TemporaryDirectory()
        state_path = Path(reported.to_directory(staged.name)) / CHECKPOINT_FILE
    if state_path is not None:
        state = load_checkpoint(
            state_path, algorithm=algorithm, config=config["config"], fingerprint=config["fingerprint"]
        )
        step = restore(state, learner, optimizer, None, window)
        generator.manual_seed(_stream_seed(cfg.seed, rank, step))
    if staged is not None:
        staged.cleanup()

    metrics_path = out_dir / METRICS_FILE if out_dir is not None else None
    if rank == 0 and metrics_path is not None:
        start_metrics(metrics_path, step)

    def replica_divergence() -> float:
        """max - min over workers of the sum of all weights: 0 while DDP keeps the replicas identical."""
        with torch.no_grad():
            total = torch.stack([p.double().sum() for p in learner.parameters()]).sum().reshape(1)
        if world == 1:
            return 0.0
        high, low = total.clone(), total.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float((high - low).item())

    def checkpoint(record: dict[str, float]) -> None:
        record = {**record, "replica_divergence": replica_divergence()}
        # Every worker reports (report is a barrier); only rank 0 has a checkpoint to hand over.
        if rank != 0:
            ray.train.report(record)
            return
        with tempfile.TemporaryDirectory() as tmp:
            kwargs: dict[str, Any] = {
                "algorithm": algorithm,
                "config": config["config"],
                "fingerprint": config["fingerprint"],
                "step": step,
                "learner": learner,
                "optimizer": optimizer,
                "generator": generator,
                "window": window,
            }
            written = save_checkpoint(Path(tmp), **kwargs)
            if out_dir is not None:
                save_checkpoint(out_dir, **kwargs)
            folder = Path(tmp) / "ray"
            folder.mkdir()
            shutil.copyfile(written, folder / CHECKPOINT_FILE)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    learner.train()
    start = time.perf_counter()
    last_time, last_step = start, step
    record: dict[str, float] = {}
    while step < cfg.steps:
        batch = tensors.sample(local_batch, generator)
        window.add(gradient_step(model, learner, optimizer, batch, step, cfg.max_grad_norm))
        step += 1
        if step % run.log_every == 0 or step == cfg.steps:
            totals = window.total.clone()
            if world > 1:
                dist.all_reduce(totals)
            now = time.perf_counter()
            means = (totals / (max(window.count, 1) * world)).tolist()
            window.reset()
            record = {
                "step": step,
                "time_s": round(now - start, 4),
                "steps_per_s": (step - last_step) / max(now - last_time, 1e-9),
                **dict(zip(names, means, strict=True)),
                "world_size": world,
                "rows_total": float(rows.item()),
            }
            last_time, last_step = now, step
            check_finite(algorithm, record, step)
            if rank == 0 and metrics_path is not None:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if (run.checkpoint_every and step % run.checkpoint_every == 0) or step == cfg.steps:
            checkpoint({**record, "step": step})
    if not record:
        checkpoint({"step": step, "world_size": world, "rows_total": float(rows.item())})


def train_distributed(
    algorithm: str,
    cfg: Any,
    data: Transitions,
    data_path: Path,
    run: RunOptions,
    num_workers: int,
    *,
    use_gpu: bool | None = None,
    cpus_per_worker: float | None = None,
    max_failures: int = 0,
) -> TrainResult:
    """Train ``algorithm`` with ``num_workers`` data-parallel Ray Train workers.

    ``data`` is the loaded dataset at ``data_path`` (for its fingerprint and observation statistics);
    the workers read ``data_path`` themselves with Ray Data. ``use_gpu=None`` uses GPUs when the Ray
    cluster has at least one per worker. ``cpus_per_worker=None`` gives each worker one CPU but leaves
    at least one CPU of the cluster to Ray Data's read tasks (without it, reading waits forever).
    Starts a local Ray instance unless one is already running.
    """
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from rlops_trainer.algos import ALGORITHMS, LEARNERS

    if data.meta.is_continuous:
        # The staged actor-critic learners (TD3+BC, CQL) step their losses outside the DDP wrapper, so
        # their gradients would not be all-reduced and the replicas would drift apart.
        raise ValueError(
            f"{algorithm}: the Ray Train path takes Discrete datasets; this one has a Box action space. "
            "Train it in one process (--ray-workers 0)"
        )
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm '{algorithm}'; accepted: {', '.join(sorted(ALGORITHMS))}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if cfg.batch_size < num_workers:
        raise ValueError(
            f"batch_size {cfg.batch_size} is the global batch: it must be >= num_workers ({num_workers})"
        )
    check_data(data)
    if run.log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {run.log_every}")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    resources = ray.cluster_resources()
    if use_gpu is None:
        use_gpu = resources.get("GPU", 0) >= num_workers
    if cpus_per_worker is None:
        cpus_per_worker = min(1.0, max(0.1, (resources.get("CPU", 1.0) - 1.0) / num_workers))

    obs_mean, obs_std = observation_stats(data)
    config = dataclasses.asdict(cfg)
    fingerprint = data.fingerprint()
    out_dir = run.out_dir.resolve() if run.out_dir is not None else None
    resume_from = resume_checkpoint(dataclasses.replace(run, out_dir=out_dir))
    first_step = 0
    if resume_from is not None:
        # Fail here, not inside every worker, when the checkpoint belongs to another run.
        state = load_checkpoint(resume_from, algorithm=algorithm, config=config, fingerprint=fingerprint)
        first_step = int(state["step"])
    scratch = None if out_dir is not None else tempfile.TemporaryDirectory(prefix="rlops-ray-")
    storage = out_dir / "ray" if out_dir is not None else Path(scratch.name)  # type: ignore[union-attr]
    loop_config = {
        "algorithm": algorithm,
        "cfg": cfg,
        "config": config,
        # The record hook stays in the driver: it may hold a server socket, which cannot be pickled.
        "run": dataclasses.replace(run, out_dir=out_dir, progress=False, on_record=None),
        "meta": data.meta,
        "n_actions": data.meta.n_actions,
        "obs_mean": obs_mean,
        "obs_std": obs_std,
        "fingerprint": fingerprint,
        "resume_from": resume_from,
        "threads": max(1, int(cpus_per_worker)),
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=f"rlops-{algorithm}",
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
        ),
        datasets={"train": ray.data.read_parquet(str(Path(data_path).resolve()))},
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
        wall = time.perf_counter() - start
        if result.error is not None:
            raise RuntimeError(f"{algorithm}: Ray Train run failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError(f"{algorithm}: Ray Train run finished without a checkpoint")
        with tempfile.TemporaryDirectory() as tmp:
            state_file = Path(result.checkpoint.to_directory(tmp)) / CHECKPOINT_FILE
            state = torch.load(state_file, map_location="cpu", weights_only=True)
    finally:
        if scratch is not None:
            scratch.cleanup()
    learner = LEARNERS[algorithm](cfg, data.meta.obs_dim, data.meta.n_actions)
    learner.load_state_dict(state["learner"])
    reported = result.metrics or {}
    metrics = {k: float(v) for k, v in reported.items() if isinstance(v, int | float) and k != "time_s"}
    metrics.pop("step", None)
    if reported.get("time_s") and int(state["step"]) > first_step:
        # The training loop's own rate: the wall time also counts starting Ray and reading the data.
        metrics["steps_per_s"] = (int(state["step"]) - first_step) / float(reported["time_s"])
    return TrainResult(
        algorithm=algorithm,
        policy=build_policy(learner, obs_mean, obs_std, data),
        selection=served_selection(cfg, data),
        config=config,
        dataset_fingerprint=fingerprint,
        steps=int(state["step"]),
        wall_time_s=wall,
        final_metrics=metrics,
        metrics_path=(out_dir / METRICS_FILE) if out_dir is not None else None,
        device="cuda" if use_gpu else "cpu",
    )
