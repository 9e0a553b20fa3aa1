"""``rlops train``: learn a policy offline from a dataset or online on Ray; write it as a policy directory."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rlops_contracts.metrics import PORT_TRAINER_METRICS

from rlops_trainer.algos import ALGORITHMS, CONTINUOUS_ALGORITHMS, NAMES, TrainFn, implementation
from rlops_trainer.commands import err_console, group
from rlops_trainer.commands import fail as _fail
from rlops_trainer.hyperparams import apply_overrides, config_fields, type_name
from rlops_trainer.online.config import ALGORITHMS as ONLINE_ALGORITHMS
from rlops_trainer.training import RunOptions, TrainResult, resolve_device

if TYPE_CHECKING:
    from rlops_trainer.datasets import DatasetMeta
    from rlops_trainer.online.run import OnlineResult
    from rlops_trainer.telemetry import TrainingTelemetry

console = Console()

app = group(
    "train",
    "Learn a policy offline from a dataset (BC, CQL, IQL; TD3+BC for Box actions) or online on Ray (PPO, "
    "APPO, DQN; SAC for Box actions) and write it as a policy directory.",
)


# --------------------------------------------------------------------------------------------------
# --set key=value


# --------------------------------------------------------------------------------------------------
# Output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _summary(result: TrainResult, out: Path, policy_dir: Path, steps_done: int) -> Table:
    table = Table(title=f"{result.algorithm} training", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("algorithm", result.algorithm)
    table.add_row("steps", f"{result.steps:,}")
    rate = result.final_metrics.get("steps_per_s", 0.0) if steps_done else 0.0
    table.add_row("steps/s", f"{rate:,.0f}" if rate else "-")
    table.add_row("wall time", f"{result.wall_time_s:.1f} s")
    table.add_row("device", result.device)
    if result.policy.score_kind == "action":
        table.add_row("selection", f"std {result.selection.std}")
    else:
        table.add_row(
            "selection", f"temperature {result.selection.temperature}, epsilon {result.selection.epsilon}"
        )
    for key, value in result.final_metrics.items():
        if key != "steps_per_s":
            table.add_row(key, _fmt(value))
    if result.metrics_path is not None:
        table.add_row("metrics", str(result.metrics_path))
    table.add_row("checkpoints", str(out / "checkpoints"))
    table.add_row("policy", str(policy_dir))
    return table


# --------------------------------------------------------------------------------------------------
# Commands


_HELP = {
    "data": "Dataset file (Parquet, as written by `rlops data`).",
    "out": "Run directory: metrics.jsonl, checkpoints/ and policy/ go here.",
    "steps": "Gradient steps (overrides the config).",
    "seed": "Random seed (overrides the config).",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N.",
    "resume": "Continue from the latest checkpoint in --out.",
    "ray_workers": "Train data-parallel on Ray Train with this many workers; 0 trains in this process.",
    "set": "Override a config field, key=value (repeatable); `rlops train config ALGO` lists them (the "
    "fields differ between the Discrete and the Box implementation).",
    "name": "Policy name in the model card (default: the algorithm).",
    "checkpoint_every": "Gradient steps between checkpoints; 0 writes one only at the end.",
    "log_every": "Gradient steps between metric records.",
    "progress": "Show a progress bar.",
    "metrics_port": (
        f"Serve training metrics for Prometheus on this port (0: off; default {PORT_TRAINER_METRICS}, "
        "skipped with a warning when taken)."
    ),
}


def _dataset_meta(path: Path) -> DatasetMeta | None:
    """The metadata of a dataset file (or of a directory's first part file) without reading its rows;
    None when it cannot be read here (loading the dataset then says why)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlops_trainer.datasets import METADATA_KEY, meta_from_json

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files:
        return None
    try:
        metadata = pq.read_schema(files[0]).metadata or {}
        return meta_from_json(metadata[METADATA_KEY], path=str(files[0]))
    except (pa.ArrowException, OSError, KeyError, ValueError):
        return None


def _pick(algorithm: str, data: Path) -> tuple[type[Any], TrainFn]:
    """The implementation for the dataset's action space: Box datasets train the continuous one. Without
    readable metadata, the Discrete one where it exists (the flags are checked against it)."""
    meta = _dataset_meta(data) if data.exists() else None
    continuous = meta.is_continuous if meta is not None else algorithm not in ALGORITHMS
    try:
        return implementation(algorithm, continuous)
    except ValueError as exc:
        _fail(f"--data {data}: {exc}")


def _first_line(train_fn: TrainFn, default: str) -> str:
    return (inspect.getdoc(inspect.getmodule(train_fn)) or default).splitlines()[0]


def _train_command(algorithm: str) -> Callable[..., None]:
    def command(
        data: Annotated[Path, typer.Option("--data", help=_HELP["data"])],
        out: Annotated[Path, typer.Option("--out", help=_HELP["out"])],
        steps: Annotated[int | None, typer.Option("--steps", help=_HELP["steps"])] = None,
        seed: Annotated[int | None, typer.Option("--seed", help=_HELP["seed"])] = None,
        device: Annotated[str, typer.Option("--device", help=_HELP["device"])] = "auto",
        resume: Annotated[bool, typer.Option("--resume", help=_HELP["resume"])] = False,
        ray_workers: Annotated[int, typer.Option("--ray-workers", help=_HELP["ray_workers"])] = 0,
        overrides: Annotated[list[str] | None, typer.Option("--set", help=_HELP["set"])] = None,
        name: Annotated[str | None, typer.Option("--name", help=_HELP["name"])] = None,
        checkpoint_every: Annotated[
            int, typer.Option("--checkpoint-every", help=_HELP["checkpoint_every"])
        ] = 5000,
        log_every: Annotated[int, typer.Option("--log-every", help=_HELP["log_every"])] = 100,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help=_HELP["progress"])] = True,
        metrics_port: Annotated[
            int | None, typer.Option("--metrics-port", help=_HELP["metrics_port"], show_default=False)
        ] = None,
    ) -> None:
        from rlops_contracts.card import NAME_RE

        from rlops_trainer.datasets import load

        config_cls, train_fn = _pick(algorithm, data)
        try:
            cfg = apply_overrides(config_cls(), overrides or [])
            flags = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
            cfg = dataclasses.replace(cfg, **flags)
        except ValueError as exc:
            _fail(str(exc))
        if ray_workers < 0:
            _fail(f"--ray-workers must be >= 0, got {ray_workers}")
        if log_every < 1:
            _fail(f"--log-every must be >= 1, got {log_every}")
        if checkpoint_every < 0:
            _fail(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
        policy_name = name or algorithm
        if not NAME_RE.match(policy_name):
            _fail(
                f"--name {policy_name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        try:
            resolve_device(device)
        except ValueError as exc:
            _fail(f"--device: {exc}")
        if not data.exists():
            _fail(f"--data {data}: no such file")
        try:
            dataset = load(data)
        except ValueError as exc:
            # DatasetError names the file, the column and the row itself.
            _fail(str(exc))
        tel = _offline_telemetry(
            metrics_port, run=out.resolve().name, algorithm=algorithm, policy=policy_name
        )
        run = RunOptions(
            out_dir=out,
            device=device,
            resume=resume,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            progress=progress,
            on_record=tel.record if tel is not None else None,
        )
        start_step = _checkpoint_step(out) if resume else 0
        try:
            if ray_workers:
                from rlops_trainer.distributed import train_distributed

                with console.status(f"{algorithm}: training with {ray_workers} Ray Train workers"):
                    result = train_distributed(algorithm, cfg, dataset, data, run, ray_workers)
            else:
                result = train_fn(cfg, dataset, run)
        except (ValueError, FloatingPointError) as exc:
            _fail(str(exc))
        except RuntimeError as exc:
            # A failed Ray Train run: the message carries the workers' error.
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from exc
        finally:
            if tel is not None:
                tel.close()

        from rlops_trainer.export import ExportError, write_policy_dir

        try:
            policy_dir = write_policy_dir(result, dataset, out / "policy", policy_name)
        except ExportError as exc:
            err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
            raise typer.Exit(1) from exc
        console.print(_summary(result, out, policy_dir, result.steps - start_step))

    summaries = [
        f"{kind} actions: {_first_line(table[algorithm][1], algorithm)}"
        for kind, table in (("Discrete", ALGORITHMS), ("Box", CONTINUOUS_ALGORITHMS))
        if algorithm in table
    ]
    command.__doc__ = (
        " ".join(summaries) + " The dataset's action space picks the implementation. Writes metrics, "
        f"checkpoints and a policy directory (policy.pt and model-card.json) under --out. "
        f"`rlops train config {algorithm}` lists the hyperparameters."
    )
    return command


def _offline_telemetry(
    port: int | None, *, run: str, algorithm: str, policy: str
) -> TrainingTelemetry | None:
    """The metrics endpoint of an offline run: a taken default port warns, a chosen one is an error."""
    from rlops_trainer.telemetry import TelemetryError, start

    try:
        return start(
            run=run, algorithm=algorithm, policy=policy, port=PORT_TRAINER_METRICS if port is None else port
        )
    except TelemetryError as exc:
        if port is not None:
            _fail(f"--metrics-port: {exc}")
        err_console.print(f"[yellow]warning:[/yellow] training metrics are not served: {escape(str(exc))}")
        return None


def _checkpoint_step(out: Path) -> int:
    from rlops_trainer.checkpoints import latest_checkpoint

    latest = latest_checkpoint(out)
    return int(latest.stem.split("-")[1]) if latest is not None else 0


for _algorithm in NAMES:
    app.command(name=_algorithm)(_train_command(_algorithm))


_ONLINE_ALGORITHMS = tuple(a.lower() for a in ONLINE_ALGORITHMS)


def _show_online_config(algorithm: str) -> None:
    from rlops_trainer.online import config as online_config

    sections: list[tuple[str, Any]] = [("training", online_config.TRAINING[algorithm.upper()])]
    sections += [
        (name, f.annotation)
        for name, f in online_config.OnlineConfig.model_fields.items()
        if name != "training"
        and isinstance(f.annotation, type)
        and issubclass(f.annotation, online_config.Section)
    ]
    top = online_config.fields(online_config.OnlineConfig)
    tables = [("(top level)", top), *((name, online_config.fields(cls)) for name, cls in sections)]
    for name, rows in tables:
        table = Table(title=f"{algorithm} online config: {name}", title_justify="left")
        for column in ("key", "type", "default", "meaning"):
            table.add_column(column, style="bold" if column == "key" else None)
        for key, kind, default, doc in rows:
            table.add_row(key, kind, _fmt(default), doc)
        console.print(table)


_ACTIONS = ("all", "discrete", "box")


@app.command("config")
def show_config(
    algorithm: Annotated[
        str,
        typer.Argument(
            help=f"One of: {', '.join(NAMES)} (offline), {', '.join(_ONLINE_ALGORITHMS)} (online)."
        ),
    ],
    actions: Annotated[
        str,
        typer.Option(
            "--actions",
            help="Offline: the implementation for this kind of action space (all, discrete or box); "
            "`rlops train ALGO` picks it from the dataset.",
        ),
    ] = "all",
) -> None:
    """Print an algorithm's hyperparameters with their defaults and meaning.

    Offline algorithms take them with --set key=value; online ones (ppo, appo, dqn, sac) in the config file.
    An offline algorithm has one config per kind of action space (Discrete, Box); all are shown unless
    --actions picks one.
    """
    if algorithm.lower() in _ONLINE_ALGORITHMS:
        _show_online_config(algorithm.lower())
        return
    if algorithm not in NAMES:
        _fail(f"unknown algorithm '{algorithm}'; accepted: {', '.join((*NAMES, *_ONLINE_ALGORITHMS))}")
    if actions not in _ACTIONS:
        _fail(f"--actions {actions!r}: accepted: {', '.join(_ACTIONS)}")
    kinds = [
        (kind, table[algorithm][0])
        for kind, table in (("discrete", ALGORITHMS), ("box", CONTINUOUS_ALGORITHMS))
        if algorithm in table and actions in ("all", kind)
    ]
    if not kinds:
        other = "Box" if actions == "discrete" else "Discrete"
        _fail(f"{algorithm} trains on {other} actions only; --actions {actions} has no config for it")
    for kind, config_cls in kinds:
        title = f"{algorithm} config ({'Discrete' if kind == 'discrete' else 'Box'} actions)"
        table = Table(title=title, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("type")
        table.add_column("default", justify="right")
        table.add_column("meaning")
        for field in config_fields(config_cls):
            table.add_row(field.name, type_name(field.type), _fmt(field.default), field.doc)
        console.print(table)


# --------------------------------------------------------------------------------------------------
# Online training (Ray, RLlib)


_ONLINE_HELP = {
    "config": "Config file (YAML): algorithm, env, resources, training, stop, … (docs/online-training.md).",
    "out": "Run directory: config.yaml, metrics.jsonl, checkpoints/, reference.parquet and policy/.",
    "address": "Join this Ray cluster (auto, HOST:6379 or ray://HOST:10001) instead of starting a local Ray.",
    "resume": "Continue from the newest checkpoint in --out.",
    "set": "Override a config key, key.path=value (repeatable), e.g. --set training.lr=3e-4.",
    "registry": "Also publish the policy directory into this registry (as `rlops registry publish` does). "
    "If the policy has a champion there, its return in the run's environment is exported first as the "
    "run's baseline (rlops_train_baseline_return).",
    "export": "Write the policy directory at the end.",
}


def _online_summary(result: OnlineResult) -> Table:
    cfg = result.config
    table = Table(title=f"{cfg.algorithm} on {cfg.env}", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    m = result.train_result.final_metrics if result.train_result else result.final_metrics
    rows: list[tuple[str, str]] = [
        ("stopped by", result.stopped_by),
        (
            "iterations",
            f"{result.iterations:,}"
            + (f" (resumed at {result.start_iteration})" if result.start_iteration else ""),
        ),
        ("env steps", f"{result.env_steps:,}"),
        ("training time", f"{result.train_time_s:.1f} s (start-up {result.setup_time_s:.1f} s)"),
        ("env steps/s", f"{result.env_steps / max(result.train_time_s, 1e-9):,.0f}"),
    ]
    for key in ("episode_return_mean", "episode_length_mean", "reference_return_mean", "entropy", "loss"):
        if key in m:
            rows.append((key, _fmt(m[key])))
    if result.baseline_return is not None:
        rows.append(("baseline return (champion)", _fmt(result.baseline_return)))
    rows += [("metrics", str(result.metrics_path)), ("checkpoint", str(result.checkpoint))]
    if result.metrics_port is not None:
        rows.append(("metrics endpoint", f"port {result.metrics_port} (closed)"))
    if result.policy_dir is not None:
        rows.append(("policy", str(result.policy_dir)))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _champion_dir(registry: Path, name: str) -> Path | None:
    """The policy directory of ``name``'s champion in ``registry``, or None when it has none yet."""
    from rlops_contracts import CHAMPION

    from rlops_trainer.registry import Registry, RegistryError

    reg = Registry(registry)
    try:
        if name not in reg.names() or CHAMPION not in reg.aliases(name):
            return None
        return reg.resolve(name, CHAMPION)
    except RegistryError as exc:
        _fail(str(exc))


@app.command("online")
def online(
    config: Annotated[Path, typer.Option("--config", help=_ONLINE_HELP["config"], dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", help=_ONLINE_HELP["out"], file_okay=False)],
    address: Annotated[str | None, typer.Option("--address", help=_ONLINE_HELP["address"])] = None,
    resume: Annotated[bool, typer.Option("--resume", help=_ONLINE_HELP["resume"])] = False,
    overrides: Annotated[list[str] | None, typer.Option("--set", help=_ONLINE_HELP["set"])] = None,
    registry: Annotated[
        Path | None, typer.Option("--registry", help=_ONLINE_HELP["registry"], file_okay=False)
    ] = None,
    export: Annotated[bool, typer.Option("--export/--no-export", help=_ONLINE_HELP["export"])] = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help=_HELP["progress"])] = True,
) -> None:
    """Train online with RLlib on Ray (PPO, APPO or DQN for Discrete actions, SAC for Box actions), locally
    or on a cluster (--address).

    Checkpoints every checkpoint.every iterations (--resume continues from the newest), serves training
    metrics for Prometheus, and writes the policy as policy.pt and model-card.json under --out/policy,
    exactly as the offline trainer does. `rlops train config ppo` lists the keys.
    """
    from rlops_trainer.online.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))
    if not export and registry is not None:
        _fail("--registry publishes the exported policy: it cannot be combined with --no-export")

    from rlops_trainer.export import ExportError
    from rlops_trainer.online.run import OnlineRun, OnlineTrainingError, train_online

    baseline = _champion_dir(registry, cfg.policy_name) if registry is not None else None
    run = OnlineRun(
        out_dir=out, resume=resume, address=address, progress=progress, export=export, baseline=baseline
    )
    try:
        result = train_online(cfg, run)
    except ConfigError as exc:
        _fail(f"{config}: {exc}")
    except (OnlineTrainingError, ExportError) as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from exc
    console.print(_online_summary(result))
    if registry is not None and result.policy_dir is not None:
        from rlops_trainer.registry import Registry, RegistryError

        try:
            reg = Registry(registry)
            version = reg.publish(result.policy_dir, cfg.policy_name)
        except RegistryError as exc:
            _fail(str(exc))
        console.print(
            f"published [bold]{escape(cfg.policy_name)}[/bold] version {version} → "
            f"{escape(str(reg.resolve(cfg.policy_name, version)))} (candidate)"
        )
