"""``rlops stack``: the local Prometheus, Alertmanager and actions webhook: up, down, status, webhook."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rlops_contracts.metrics import PORT_ACTIONS_WEBHOOK, PORT_ALERTMANAGER, PORT_PROMETHEUS

from rlops_stack import local
from rlops_stack.commands import fail, group
from rlops_stack.local import DEFAULT_ROOT, StackError, Target, WebhookSettings

console = Console()

app = group("stack", "The local monitoring stack: Prometheus, Alertmanager and the actions webhook.")

RootOption = Annotated[
    Path,
    typer.Option("--root", help="Where the stack keeps its configs, data, logs and state.", file_okay=False),
]
RegistryOption = Annotated[
    Path,
    typer.Option("--registry", envvar="RLOPS_REGISTRY", help="Registry a rollback acts on.", file_okay=False),
]
ServeRunDirOption = Annotated[
    Path,
    typer.Option(
        "--serve-run-dir", help="Run directory of the local TorchServe (rlops serve).", file_okay=False
    ),
]
MaxWorkersOption = Annotated[
    int, typer.Option("--max-workers", min=1, max=64, help="Scale-up stops at this many workers per version.")
]
ScaleStepOption = Annotated[
    int, typer.Option("--scale-step", min=1, max=64, help="Workers added per scale-up.")
]
CooldownOption = Annotated[
    float,
    typer.Option(
        "--cooldown", min=0, help="Seconds before the same action for the same policy version runs again."
    ),
]


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (StackError, ValueError) as e:
        fail(str(e))


@app.command()
def up(
    root: RootOption = DEFAULT_ROOT,
    scrape_interval: Annotated[
        float, typer.Option("--scrape-interval", help="Seconds between scrapes (the cluster uses 15).")
    ] = 15.0,
    evaluation_interval: Annotated[
        float, typer.Option("--evaluation-interval", help="Seconds between rule evaluations.")
    ] = 15.0,
    prometheus_port: Annotated[
        int, typer.Option("--prometheus-port", help="Prometheus port.")
    ] = PORT_PROMETHEUS,
    alertmanager_port: Annotated[
        int, typer.Option("--alertmanager-port", help="Alertmanager port.")
    ] = PORT_ALERTMANAGER,
    webhook_port: Annotated[
        int, typer.Option("--webhook-port", help="Actions webhook port.")
    ] = PORT_ACTIONS_WEBHOOK,
    target: Annotated[
        list[str] | None,
        typer.Option(
            "--target",
            help="Scrape target JOB=HOST:PORT (or JOB=HOST:PORT/PATH), repeatable; replaces the defaults "
            "(torchserve, rlops-feedback, rlops-trainer, rlops-actions on their default ports).",
        ),
    ] = None,
    alert_for: Annotated[
        float | None,
        typer.Option(
            "--alert-for",
            min=0,
            help="Test profile: every alert's for: becomes this many seconds in the generated rule copies.",
        ),
    ] = None,
    group_wait: Annotated[
        float | None, typer.Option("--group-wait", min=0, help="Replace Alertmanager's group_wait (seconds).")
    ] = None,
    group_interval: Annotated[
        float | None,
        typer.Option("--group-interval", min=0, help="Replace Alertmanager's group_interval (seconds)."),
    ] = None,
    repeat_interval: Annotated[
        float | None,
        typer.Option("--repeat-interval", min=0, help="Replace Alertmanager's repeat_interval (seconds)."),
    ] = None,
    no_webhook: Annotated[
        bool, typer.Option("--no-webhook", help="Do not start the actions webhook.")
    ] = False,
    registry: RegistryOption = WebhookSettings.registry,
    serve_run_dir: ServeRunDirOption = WebhookSettings.serve_run_dir,
    max_workers: MaxWorkersOption = WebhookSettings.max_workers,
    scale_step: ScaleStepOption = WebhookSettings.scale_step,
    cooldown: CooldownOption = WebhookSettings.cooldown_s,
    webhook_log_max_bytes: Annotated[
        int,
        typer.Option(
            "--webhook-log-max-bytes",
            min=1,
            help=f"Size at which the webhook's log (ROOT/logs/webhook.log) rolls over; {local.LOG_BACKUPS} "
            "earlier logs are kept.",
        ),
    ] = local.WEBHOOK_LOG_MAX_BYTES,
    alerts: Annotated[
        Path | None,
        typer.Option("--alerts-dir", help="The alerts/ folder (default: the repository's).", file_okay=False),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for each process.")
    ] = 60.0,
) -> None:
    """Start Prometheus, Alertmanager and the actions webhook, configured from alerts/."""
    with _user_errors():
        targets = [Target.parse(t) for t in target or []]
        state = local.up(
            root,
            scrape_interval=scrape_interval,
            evaluation_interval=evaluation_interval,
            prometheus_port=prometheus_port,
            alertmanager_port=alertmanager_port,
            webhook_port=webhook_port,
            targets=targets,
            alert_for=alert_for,
            group_wait=group_wait,
            group_interval=group_interval,
            repeat_interval=repeat_interval,
            webhook=None
            if no_webhook
            else WebhookSettings(registry, serve_run_dir, max_workers, scale_step, cooldown),
            webhook_log_max_bytes=webhook_log_max_bytes,
            alerts=alerts,
            timeout_s=timeout,
        )
    console.print(f"prometheus:   {state.prometheus_url}", highlight=False)
    console.print(f"alertmanager: {state.alertmanager_url}", highlight=False)
    if state.webhook_url:
        console.print(f"webhook:      {state.webhook_url}", highlight=False)
    for name, why in sorted(state.silent_receivers.items()):
        console.print(f"receiver {name} notifies nobody here: {why}", highlight=False, soft_wrap=True)
    console.print(f"stop with: rlops stack down --root {state.root}", highlight=False, soft_wrap=True)


@app.command()
def down(
    root: RootOption = DEFAULT_ROOT,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait before killing.")
    ] = 15.0,
) -> None:
    """Stop the stack started from the root folder."""
    with _user_errors():
        for line in local.down(root, timeout_s=timeout):
            console.print(line, highlight=False, soft_wrap=True)


@app.command()
def status(
    root: RootOption = DEFAULT_ROOT,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON.")] = False,
) -> None:
    """Processes, scrape targets and the alerts pending or firing now."""
    with _user_errors():
        report = local.status(root)
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table("component", "pid", "state", "url", title=f"stack {report['root']}")
    for c in report["components"]:
        state = "ready" if c["ready"] else "running, not ready" if c["running"] else "STOPPED"
        table.add_row(c["name"], str(c["pid"]), state, c["url"])
    console.print(table)
    targets = Table("job", "url", "health", "last error", title="scrape targets")
    for t in report["targets"]:
        targets.add_row(t["job"], t["url"], t["health"], t["error"])
    console.print(targets)
    alerts = Table("alert", "state", "severity", "policy", "version", "value", title="alerts")
    for a in sorted(report["alerts"], key=lambda a: (a["state"] != "firing", a["name"])):
        labels = a["labels"]
        alerts.add_row(
            a["name"], a["state"], a["severity"] or "", labels.get("policy", ""), labels.get("version", ""),
            str(a["value"] or ""),
        )  # fmt: skip
    console.print(alerts if report["alerts"] else "no alerts pending or firing")
    for name, why in sorted(report["silent_receivers"].items()):
        console.print(f"receiver {name} notifies nobody here: {why}", highlight=False, soft_wrap=True)
    if not report["healthy"]:
        raise typer.Exit(1)


@app.command()
def webhook(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = PORT_ACTIONS_WEBHOOK,
    registry: RegistryOption = WebhookSettings.registry,
    serve_run_dir: ServeRunDirOption = WebhookSettings.serve_run_dir,
    token_file: Annotated[
        Path | None,
        typer.Option(
            "--token-file", help="File holding the bearer token Alertmanager sends.", dir_okay=False
        ),
    ] = None,
    record: Annotated[
        Path | None,
        typer.Option(
            "--record", help="Actions record (JSON lines) to append every action to.", dir_okay=False
        ),
    ] = DEFAULT_ROOT / local.ACTIONS_RECORD,
    max_workers: MaxWorkersOption = WebhookSettings.max_workers,
    scale_step: ScaleStepOption = WebhookSettings.scale_step,
    cooldown: CooldownOption = WebhookSettings.cooldown_s,
    management_url: Annotated[
        str | None,
        typer.Option(
            "--management-url",
            help="TorchServe's management API (in a cluster); default: read from --serve-run-dir.",
        ),
    ] = None,
    management_token_file: Annotated[
        Path | None,
        typer.Option(
            "--management-token-file", help="File holding TorchServe's management key.", dir_okay=False
        ),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file", help="Log to this file (rolled over by size) instead of stderr.", dir_okay=False
        ),
    ] = None,
    log_max_bytes: Annotated[
        int, typer.Option("--log-max-bytes", min=1, help="Size at which --log-file rolls over.")
    ] = local.WEBHOOK_LOG_MAX_BYTES,
    log_backups: Annotated[
        int, typer.Option("--log-backups", min=1, help="Earlier log files kept (FILE.1 is the newest).")
    ] = local.LOG_BACKUPS,
) -> None:
    """Run the actions webhook in the foreground (rlops stack up starts it for you)."""
    from rlops_stack import webhook as hook

    with _user_errors():
        if management_token_file is not None and management_url is None:
            fail("--management-token-file needs --management-url")
        settings = WebhookSettings(
            registry, serve_run_dir, max_workers, scale_step, cooldown, management_url, management_token_file
        )
        token = hook.read_token(token_file)
        hook.read_token(management_token_file)
    hook.serve(
        settings,
        host=host,
        port=port,
        token=token,
        record_to=record,
        log_file=log_file,
        log_max_bytes=log_max_bytes,
        log_backups=log_backups,
    )


if __name__ == "__main__":
    app()
