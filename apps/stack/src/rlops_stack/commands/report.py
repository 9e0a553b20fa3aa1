"""``rlops report``: every dashboard panel's queries against a real Prometheus, as one static HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rlops_contracts.durable import replace_atomic
from rlops_contracts.metrics import PORT_ALERTMANAGER, PORT_PROMETHEUS

from rlops_stack import dashboards, local, prometheus
from rlops_stack.boards import ReportError, parse_overrides, read_board
from rlops_stack.commands import err_console, fail
from rlops_stack.dashboards import BUILD_SUBDIR, DashboardError
from rlops_stack.report import collect, parse_duration
from rlops_stack.report_page import render_html

console = Console(soft_wrap=True)


def report(
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.", dir_okay=False)] = Path(
        ".rlops/report/index.html"
    ),
    prometheus_url: Annotated[
        str | None,
        typer.Option(
            "--prometheus-url",
            help=f"Prometheus to query; default: the running local stack's, else http://127.0.0.1:{PORT_PROMETHEUS}.",
        ),
    ] = None,
    alertmanager_url: Annotated[
        str | None,
        typer.Option(
            "--alertmanager-url",
            help=f"Alertmanager to list alerts from; default: the local stack's, else http://127.0.0.1:{PORT_ALERTMANAGER}.",
        ),
    ] = None,
    no_alertmanager: Annotated[
        bool, typer.Option("--no-alertmanager", help="List Prometheus's alerts only.")
    ] = False,
    stack_root: Annotated[
        Path,
        typer.Option(
            "--stack-root", help="Root of the local stack whose URLs are the defaults.", file_okay=False
        ),
    ] = local.DEFAULT_ROOT,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dashboards",
            help="Folder of built dashboard JSON; default: build/ of the repository's dashboards/.",
            file_okay=False,
        ),
    ] = None,
    uid: Annotated[
        list[str] | None,
        typer.Option("--dashboard", help="Only this dashboard uid (repeatable); default: all."),
    ] = None,
    window: Annotated[
        str, typer.Option("--window", help="How far back the charts go (30m, 1h, 6h, 1d …).")
    ] = "1h",
    step: Annotated[
        str | None, typer.Option("--step", help="Resolution of the charts; default: the window / 240.")
    ] = None,
    var: Annotated[
        list[str] | None,
        typer.Option(
            "--var", help="NAME=VALUE for a dashboard variable (default: All), e.g. policy=cartpole."
        ),
    ] = None,
) -> None:
    """Run each dashboard panel's queries against Prometheus; write charts, tables and the active alerts."""
    try:
        window_s = parse_duration(window, "--window")
        step_s = parse_duration(step, "--step") if step is not None else None
        built = directory if directory is not None else dashboards.dashboards_dir() / BUILD_SUBDIR
        boards = dashboards.load_built(built)
        if uid:
            known = [b["uid"] for b in boards]
            unknown = sorted(set(uid) - set(known))
            if unknown:
                names = ", ".join(unknown)
                raise ReportError(
                    f"--dashboard {names}: no such dashboard in {built}; known: {', '.join(known)}"
                )
            boards = [b for b in boards if b["uid"] in uid]
        overrides = parse_overrides(var or [], [read_board(b) for b in boards])
    except (ReportError, DashboardError) as e:
        fail(str(e))

    state = None
    if prometheus_url is None or (alertmanager_url is None and not no_alertmanager):
        try:
            state = local.running_state(stack_root)
        except local.StackError as e:
            err_console.print(f"[yellow]warning:[/yellow] {e}", highlight=False)
    prom = prometheus_url or (state.prometheus_url if state else f"http://127.0.0.1:{PORT_PROMETHEUS}")
    am = (
        None
        if no_alertmanager
        else alertmanager_url
        or (state.alertmanager_url if state else f"http://127.0.0.1:{PORT_ALERTMANAGER}")
    )
    try:
        result = collect(
            prom, boards, window_s=window_s, step_s=step_s, overrides=overrides, alertmanager_url=am
        )
    except (ReportError, prometheus.PrometheusError) as e:
        fail(str(e))
    path = replace_atomic(out, render_html(result))

    panels = sum(len(b.panels) for b in result.boards)
    console.print(f"wrote {path}", highlight=False)
    console.print(
        f"{panels} panels from {len(result.boards)} dashboards, {len(result.empty)} without data, "
        f"{len(result.failed)} failed queries",
        highlight=False,
    )
    for name in result.empty:
        console.print(f"[dim]no data: {name}", highlight=False)
    firing = [a for a in result.alerts.prometheus if a.get("state") == "firing"]
    console.print(f"{len(firing)} alerts firing" + (":" if firing else ""), highlight=False)
    for a in firing:
        labels, notes = a.get("labels") or {}, a.get("annotations") or {}
        where = " ".join(f"{k}={labels[k]}" for k in ("policy", "version") if k in labels)
        name, severity = labels.get("alertname", "?"), labels.get("severity", "-")
        console.print(f"  [red]{name}[/red] ({severity}) {where} {notes.get('summary', '')}", highlight=False)
    if result.alerts.alertmanager_error:
        err_console.print(f"[yellow]warning:[/yellow] {result.alerts.alertmanager_error}", highlight=False)
    if result.failed:
        for name in result.failed:
            err_console.print(f"[red]query failed:[/red] {name}", highlight=False)
        raise typer.Exit(1)
