"""``rlops serve``: build archives and run a local TorchServe with the registry's champion and candidate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rlops_contracts import CANDIDATE, CHAMPION

from rlops_server import process
from rlops_server.archive import (
    DEFAULT_REGISTRY,
    REGISTRY_ENV,
    ArchiveError,
    build_archive,
    registry_aliases,
    registry_policies,
)
from rlops_server.commands import fail as _fail
from rlops_server.commands import group
from rlops_server.commands.traffic import traffic
from rlops_server.process import DEFAULT_RUN_DIR, ModelVersionState, ServeError
from rlops_server.runtime import ServingSettings
from rlops_server.tsconfig import (
    ADAPTIVE,
    DELAY,
    LOG_MAX_BYTES,
    METRICS_FILE,
    ModelSettings,
    ServedModel,
    ServerConfig,
)

console = Console()

app = group(
    "serve",
    "Serve registry policies on TorchServe: archives, start, stop, status.",
)


DEFAULT_DECISION_LOG_DIR = Path(".rlops/logs")
"""Log root shared with the reward service and the join: decisions go to <root>/decisions/."""

RegistryOption = Annotated[
    Path,
    typer.Option("--registry", envvar=REGISTRY_ENV, help="Registry folder.", file_okay=False),
]
RunDirOption = Annotated[
    Path,
    typer.Option(
        "--run-dir", help="Where the server keeps its config, archives, logs and state.", file_okay=False
    ),
]
BatchSizeOption = Annotated[
    int, typer.Option("--batch-size", min=1, max=4096, help="Most requests per worker batch.")
]
DelayOption = Annotated[
    int,
    typer.Option(
        "--max-batch-delay-ms",
        min=1,
        max=10_000,
        help="How long a worker waits for a batch to fill: with --batcher adaptive only when requests were "
        "already waiting; with --batcher delay whenever fewer requests are queued, which adds it to the "
        "latency at low load.",
    ),
]


class Batcher(StrEnum):
    adaptive = ADAPTIVE
    delay = DELAY


DEFAULT_BATCHER = Batcher(ModelSettings.batcher)

BatcherOption = Annotated[
    Batcher,
    typer.Option(
        "--batcher",
        help="How a worker fills its batch: adaptive sends a request that finds a worker idle at once and "
        "fills a batch for up to --max-batch-delay-ms only when requests were already waiting; delay is "
        "TorchServe's own, which waits up to --max-batch-delay-ms for every batch that is not full.",
    ),
]
WorkersOption = Annotated[int, typer.Option("--workers", min=1, max=64, help="Workers per policy version.")]
MaxObsOption = Annotated[
    int, typer.Option("--max-batch-observations", min=1, help="Most observations one request may carry.")
]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (ArchiveError, ServeError, ValueError) as e:
        _fail(str(e))


def _only_policy(registry: Path) -> str:
    names = registry_policies(registry)
    if len(names) != 1:
        listed = ", ".join(names) or "none"
        _fail(f"say which policy to serve with --name; registry {registry} holds: {listed}")
    return names[0]


@app.command()
def archive(
    name: Annotated[str, typer.Argument(help="Policy name in the registry.")],
    version: Annotated[str, typer.Argument(help="Version number or alias (champion, candidate).")],
    registry: RegistryOption = DEFAULT_REGISTRY,
    store: Annotated[
        Path, typer.Option("--store", help="Model store folder the .mar is written to.", file_okay=False)
    ] = DEFAULT_RUN_DIR / "model-store",
    batch_size: BatchSizeOption = ModelSettings.batch_size,
    max_batch_delay_ms: DelayOption = ModelSettings.max_batch_delay_ms,
    batcher: BatcherOption = DEFAULT_BATCHER,
    workers: WorkersOption = ModelSettings.min_workers,
    max_batch_observations: MaxObsOption = ServingSettings.max_batch_observations,
) -> None:
    """Build the TorchServe archive (.mar) of a registry version."""
    with _user_errors():
        built = build_archive(
            registry,
            name,
            version,
            store,
            model_settings=ModelSettings(
                batch_size=batch_size,
                max_batch_delay_ms=max_batch_delay_ms,
                min_workers=workers,
                max_workers=workers,
                batcher=batcher.value,
            ),
            serving=ServingSettings(max_batch_observations=max_batch_observations),
        )
    console.print(f"{built.name} version {built.version}: {built.path}", highlight=False, soft_wrap=True)


@app.command()
def start(
    name: Annotated[
        str | None, typer.Option("--name", help="Policy to serve (default: the only one).")
    ] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    host: Annotated[str, typer.Option("--host", help="Address the inference API listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Inference API port.")] = 8080,
    management_port: Annotated[
        int, typer.Option("--management-port", help="Management API port (127.0.0.1).")
    ] = 8081,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="Prometheus metrics port.")] = 8082,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="Address the metrics port listens on.")
    ] = "127.0.0.1",
    grpc_port: Annotated[
        int,
        typer.Option("--grpc-port", help="gRPC inference port; the gRPC management API uses the next one."),
    ] = 7070,
    workers: WorkersOption = ModelSettings.min_workers,
    batch_size: BatchSizeOption = ModelSettings.batch_size,
    max_batch_delay_ms: DelayOption = ModelSettings.max_batch_delay_ms,
    batcher: BatcherOption = DEFAULT_BATCHER,
    max_batch_observations: MaxObsOption = ServingSettings.max_batch_observations,
    decision_log_dir: Annotated[
        Path,
        typer.Option(
            "--decision-log-dir",
            help="Log root: decisions go to DIR/decisions/date=YYYY-MM-DD/*.jsonl.",
            file_okay=False,
        ),
    ] = DEFAULT_DECISION_LOG_DIR,
    no_decision_log: Annotated[bool, typer.Option("--no-decision-log", help="Do not log decisions.")] = False,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Have TorchServe log every request (costs latency).")
    ] = False,
    log_max_bytes: Annotated[
        int,
        typer.Option(
            "--log-max-bytes",
            min=1,
            help="Size at which each of TorchServe's logs (RUN_DIR/logs) rolls over into a numbered archive.",
        ),
    ] = LOG_MAX_BYTES,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait until it is ready.")
    ] = 120.0,
) -> None:
    """Start TorchServe with the champion (default version) and the candidate, if set, of one policy."""
    with _user_errors():
        name = name or _only_policy(registry)
        aliases = registry_aliases(registry, name)
        if CHAMPION not in aliases:
            _fail(
                f"policy {name!r} has no champion to serve; promote a version first (rlops registry "
                "promote). "
                f"Aliases: {', '.join(f'{a} → {v}' for a, v in sorted(aliases.items())) or 'none'}"
            )
        run_dir = run_dir.resolve()
        if process.running_state(run_dir) is not None:
            _fail(
                f"a server from {run_dir} is already running; stop it first "
                f"(rlops serve stop --run-dir {run_dir})"
            )
        settings = ModelSettings(
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            min_workers=workers,
            max_workers=workers,
            batcher=batcher.value,
        )
        serving = ServingSettings(max_batch_observations=max_batch_observations)
        store = run_dir / "model-store"
        served: list[ModelVersionState] = []
        models: list[ServedModel] = []
        wanted = [(CHAMPION, aliases[CHAMPION])]
        if aliases.get(CANDIDATE) not in (None, aliases[CHAMPION]):
            wanted.append((CANDIDATE, aliases[CANDIDATE]))
        for alias, version in wanted:
            built = build_archive(registry, name, version, store, model_settings=settings, serving=serving)
            served.append(ModelVersionState(name, str(version), alias, built.path.name, settings.batcher))
            models.append(ServedModel(name, str(version), built.path.name, settings))
        config = ServerConfig(
            model_store=store,
            metrics_config=run_dir / METRICS_FILE,
            models=tuple(models),
            inference_host=host,
            inference_port=port,
            management_port=management_port,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            grpc_inference_port=grpc_port,
            grpc_management_port=grpc_port + 1,
            default_workers_per_model=workers,
        )
        state = process.start(
            run_dir,
            config,
            served,
            decision_log_dir=None if no_decision_log else decision_log_dir,
            access_log=access_log,
            log_max_bytes=log_max_bytes,
            timeout_s=timeout,
        )
    versions = ", ".join(f"{m.version} ({m.alias})" for m in state.models)
    console.print(
        f"serving {name} versions {versions} at {state.inference_url}/predictions/{name}", highlight=False
    )
    console.print(
        f"metrics: {state.metrics_url}; stop with: rlops serve stop --run-dir {run_dir}", highlight=False
    )


@app.command()
def stop(
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait before killing.")
    ] = 30.0,
) -> None:
    """Stop the server started from the run directory (waits for workers to write their decisions)."""
    with _user_errors():
        console.print(process.stop(run_dir, timeout_s=timeout), highlight=False)


@app.command()
def status(
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Health, served versions and their workers, and the URLs of the running server."""
    with _user_errors():
        report = process.status(run_dir)
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(
        f"{'healthy' if report['healthy'] else 'UNHEALTHY'}  pid {report['pid']}  "
        f"inference {report['inference_url']}  metrics {report['metrics_url']}",
        highlight=False,
    )
    table = Table("model", "version", "alias", "workers ready", "batch size", "batcher", "max delay ms")
    for v in report["versions"]:
        table.add_row(
            v["name"],
            str(v["version"]),
            v["alias"] or "",
            f"{v['ready_workers']}/{v['workers']}",
            str(v["batch_size"]),
            v["batcher"],
            str(v["max_batch_delay_ms"]) if v["batcher"] == DELAY else "",
        )
    console.print(table)


# ``rlops serve traffic`` drives an environment with the served policy (rlops_server.commands.traffic).
app.command("traffic")(traffic)
