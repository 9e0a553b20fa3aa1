"""``rlops dashboards``: build the Grafana dashboards to JSON, and push them into a Grafana."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rlops_stack import dashboards, grafana
from rlops_stack.commands import fail, group
from rlops_stack.dashboards import BUILD_SUBDIR, DashboardError
from rlops_stack.grafana import TOKEN_ENV, GrafanaError

console = Console(soft_wrap=True)

app = group("dashboards", "Grafana dashboards as code: build them to JSON, push them into a Grafana.")

DirOption = Annotated[
    Path | None,
    typer.Option(
        "--dir",
        help="Dashboards folder (sources *.py, built JSON in build/); default: the repository's dashboards/.",
        file_okay=False,
    ),
]


def _source_dir(explicit: Path | None) -> Path:
    try:
        found = dashboards.dashboards_dir(explicit)
    except DashboardError as e:
        fail(str(e))
    return found


@app.command()
def build(
    directory: DirOption = None,
    check: Annotated[
        bool,
        typer.Option("--check", help="Write nothing; exit 1 if the built JSON differs from a fresh build."),
    ] = False,
) -> None:
    """Build every dashboard source to build/<uid>.json (same sources, same bytes)."""
    source = _source_dir(directory)
    try:
        if check:
            problems = dashboards.stale(source)
            for problem in problems:
                console.print(f"[red]stale:[/red] {problem}", highlight=False)
            if problems:
                console.print("run: rlops dashboards build", highlight=False)
                raise typer.Exit(1)
            console.print(f"{source / BUILD_SUBDIR} is up to date", highlight=False)
            return
        result = dashboards.build(source)
    except DashboardError as e:
        fail(str(e))
    for path in result.written:
        console.print(f"wrote {path}", highlight=False)
    for path in result.unchanged:
        console.print(f"[dim]unchanged {path}", highlight=False)
    for path in result.removed:
        console.print(f"removed {path} (no source defines it any more)", highlight=False)


@app.command()
def push(
    url: Annotated[
        str,
        typer.Option(
            "--url", envvar="RLOPS_GRAFANA_URL", help="Grafana's address, e.g. https://grafana.example.com"
        ),
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help="Service account token (Editor role); or user:password in --url.",
            show_default=False,
        ),
    ] = None,
    folder: Annotated[
        str,
        typer.Option("--folder", help="Folder title, created if missing; '' for the General folder."),
    ] = "rlops",
    uid: Annotated[
        list[str] | None, typer.Option("--uid", help="Push only this dashboard (repeatable); default: all.")
    ] = None,
    directory: DirOption = None,
    message: Annotated[str, typer.Option("--message", help="Version message Grafana records.")] = (
        "rlops dashboards push"
    ),
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per request.")] = 10.0,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Do not verify Grafana's TLS certificate.")
    ] = False,
) -> None:
    """Create or replace the built dashboards in a Grafana (matched by uid, so pushing again updates them)."""
    source = _source_dir(directory)
    try:
        problems = dashboards.stale(source)
        if problems:
            fail(f"the built dashboards differ from their sources ({'; '.join(problems)}); rebuild them")
        boards = dashboards.load_built(source / BUILD_SUBDIR)
    except DashboardError as e:
        fail(str(e))
    if uid:
        known = [b["uid"] for b in boards]
        unknown = sorted(set(uid) - set(known))
        if unknown:
            fail(f"--uid {', '.join(unknown)}: no such dashboard; built: {', '.join(known)}")
        boards = [b for b in boards if b["uid"] in uid]
    try:
        results = grafana.push(
            boards, url, token, folder=folder or None, message=message, timeout=timeout, verify=not insecure
        )
    except GrafanaError as e:
        fail(str(e))
    table = Table(
        title=f"Dashboards in {url}" + (f" (folder {folder})" if folder else ""), title_justify="left"
    )
    for column in ("uid", "title", "version", "url"):
        table.add_column(column)
    for r in results:
        table.add_row(r.uid, r.title, "-" if r.version is None else str(r.version), r.url)
    console.print(table)
