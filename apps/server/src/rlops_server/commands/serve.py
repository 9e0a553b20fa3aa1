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
from rlops_contracts.card import ArtifactError
from rlops_contracts.registry import DEFAULT_REGISTRY, REGISTRY_ENV, RegistryReader

from rlops_server import serving
from rlops_server.commands import fail as _fail
from rlops_server.commands import group
from rlops_server.commands.traffic import traffic
from rlops_server.plan import ADAPTIVE, DEFAULT_DECISION_LOG_DIR, DEFAULT_RUN_DIR, DELAY, ServePlan
from rlops_server.serving import ServeError
from rlops_server.settings import ServingSettings
from rlops_server.torchserve.archive import ArchiveError, build_archive
from rlops_server.torchserve.config import ModelSettings

console = Console()

app = group(
    "serve",
    "Serve registry policies on TorchServe: archives, start, stop, status.",
)


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
        help="How long a worker waits for a batch to fill: with --batcher adaptive only when two or more "
        "requests were already waiting; with --batcher delay whenever fewer requests are queued, which "
        "adds it to the latency at low load.",
    ),
]


class Batcher(StrEnum):
    adaptive = ADAPTIVE
    delay = DELAY


DEFAULT_BATCHER = Batcher(ServePlan.batcher)

BatcherOption = Annotated[
    Batcher,
    typer.Option(
        "--batcher",
        help="How a worker fills its batch: adaptive sends a request that finds a worker idle at once and "
        "fills a batch for up to --max-batch-delay-ms only when two or more requests were waiting; delay is "
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
    except (ArchiveError, ArtifactError, ServeError, ValueError) as e:
        _fail(str(e))


def _only_policy(registry: Path) -> str:
    names = RegistryReader(registry).names()
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
            help="Size at which each of the server's logs (RUN_DIR/logs) rolls over into a numbered archive.",
        ),
    ] = ServePlan.log_max_bytes,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait until it is ready.")
    ] = 120.0,
) -> None:
    """Start TorchServe with the champion (default version) and the candidate, if set, of one policy."""
    with _user_errors():
        plan = ServePlan(
            policy=name or _only_policy(registry),
            registry=registry,
            run_dir=run_dir,
            host=host,
            port=port,
            management_port=management_port,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            grpc_port=grpc_port,
            workers=workers,
            batch_size=batch_size,
            max_batch_delay_ms=max_batch_delay_ms,
            batcher=batcher.value,
            max_batch_observations=max_batch_observations,
            decision_log_dir=None if no_decision_log else decision_log_dir,
            access_log=access_log,
            log_max_bytes=log_max_bytes,
            timeout_s=timeout,
        )
        started = serving.start(plan)
    versions = ", ".join(f"{v.version} ({v.alias})" for v in started.versions)
    console.print(
        f"serving {plan.policy} versions {versions} at {started.inference_url}/predictions/{plan.policy}",
        highlight=False,
    )
    console.print(
        f"metrics: {started.metrics_url}; stop with: rlops serve stop --run-dir {run_dir}", highlight=False
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
        console.print(serving.stop(run_dir, timeout_s=timeout), highlight=False)


@app.command()
def status(
    run_dir: RunDirOption = DEFAULT_RUN_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Health, served versions and their workers, and the URLs of the running server."""
    with _user_errors():
        report = serving.status(run_dir)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
        return
    console.print(
        f"{'healthy' if report.healthy else 'UNHEALTHY'}  {report.backend}  pid {report.pid}  "
        f"inference {report.inference_url}  metrics {report.metrics_url}",
        highlight=False,
    )
    table = Table(
        "model", "version", "alias", "default", "workers ready", "batch size", "batcher", "max delay ms"
    )
    for v in report.versions:
        table.add_row(
            v.name,
            v.version,
            v.alias or "",
            "yes" if v.default else "",
            f"{v.ready_workers}/{v.workers}",
            str(v.batch_size),
            v.batcher or "",
            str(v.max_batch_delay_ms) if v.batcher == DELAY else "",
        )
    console.print(table)


# ``rlops serve traffic`` drives an environment with the served policy (rlops_server.commands.traffic).
app.command("traffic")(traffic)
