"""``rlops registry``: publish policy directories as versions, inspect them, promote and roll back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rlops_contracts import CHAMPION
from rlops_contracts.card import ArtifactError
from rlops_contracts.registry import DEFAULT_REGISTRY, REGISTRY_ENV

from rlops_trainer.commands import fail as _fail
from rlops_trainer.commands import group
from rlops_trainer.registry import Registry, RegistryError

console = Console()

app = group(
    "registry",
    "Versioned policies with model cards; aliases champion and candidate; gated promotion and rollback.",
)


RegistryOption = Annotated[
    Path,
    typer.Option(
        "--registry",
        envvar=REGISTRY_ENV,
        help="Registry folder (a local folder or the mounted model volume).",
        file_okay=False,
    ),
]


class ReportError(ValueError):
    """An evaluation report that cannot be used for publishing."""


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except (ArtifactError, ReportError) as e:
        _fail(str(e))


# --------------------------------------------------------------------------------------------------
# Evaluation reports
# --------------------------------------------------------------------------------------------------


def report_entry(
    report_path: Path, policy_dir: Path, name: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The evaluation and gate decision for ``policy_dir`` from a report of ``rlops evaluate``.

    The report holds ``policies: [{ref, estimates, gate, ...}]``; the entry whose ``ref`` is this
    directory (or the policy name) is used. Its fields without ``gate``, plus the report's own
    top-level fields under ``report``, become the card's ``evaluation``.
    """
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ReportError(f"{report_path}: no such report file") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{report_path}: not valid JSON: {e}") from e
    policies = report.get("policies") if isinstance(report, dict) else None
    if not isinstance(policies, list) or not all(isinstance(p, dict) and "ref" in p for p in policies):
        raise ReportError(f"{report_path}: expected an object with 'policies': [{{'ref': ..., ...}}, ...]")
    target = policy_dir.resolve()

    def names_this_policy(entry: dict[str, Any]) -> bool:
        # The absolute path is exact; a ref typed as a relative path may be relative to where
        # evaluate ran or to the report itself.
        ref = entry["ref"]
        candidates = [Path(str(ref)).resolve(), (report_path.parent / str(ref)).resolve()]
        if entry.get("path"):
            candidates.append(Path(str(entry["path"])).resolve())
        return ref == name or target in candidates

    matches = [p for p in policies if names_this_policy(p)]
    if len(matches) != 1:
        refs = ", ".join(str(p["ref"]) for p in policies) or "none"
        what = "no entry" if not matches else f"{len(matches)} entries"
        raise ReportError(
            f"{report_path}: {what} for {policy_dir} or {name!r}; policies in the report: {refs}"
        )
    entry = dict(matches[0])
    gate = entry.pop("gate", None)
    entry["report"] = {k: v for k, v in report.items() if k != "policies"} | {"file": str(report_path)}
    return entry, gate


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, list | dict):
        return json.dumps(x)
    return str(x)


def _short(text: str) -> str:
    # Digests in a lineage line only need to be recognisable; the files table shows them whole.
    return text[:19] + "…" if text.startswith("sha256:") else text


def _kv_table(title: str, rows: dict[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("", style="bold", no_wrap=True)
    table.add_column("", overflow="fold")
    for key, value in rows.items():
        table.add_row(escape(key), escape(_fmt(value)))
    return table


def _ope_table(evaluation: dict[str, Any]) -> Table:
    table = Table(title="Off-policy evaluation", title_justify="left")
    for col in ("estimator", "value", "interval", "ESS", "notes"):
        table.add_column(col, justify="left" if col in ("estimator", "notes") else "right")
    estimates = evaluation.get("estimates") or []
    if isinstance(estimates, dict):  # keyed by estimator
        estimates = [{"estimator": k} | v for k, v in estimates.items() if isinstance(v, dict)]
    for e in estimates:
        interval = "-"
        if e.get("lower") is not None and e.get("upper") is not None:
            level = f" ({e['confidence']:.0%})" if isinstance(e.get("confidence"), float) else ""
            interval = f"[{_fmt(e['lower'])}, {_fmt(e['upper'])}]{level}"
        ess = _fmt(e.get("ess"))
        if isinstance(e.get("ess_fraction"), float):
            ess += f" ({e['ess_fraction']:.0%})"
        notes = "; ".join(e.get("warnings") or [])
        if e.get("ess_collapsed"):
            notes = "[yellow]ESS collapsed[/yellow]" + (f"; {escape(notes)}" if notes else "")
        else:
            notes = escape(notes)
        table.add_row(escape(str(e.get("estimator", "?"))), _fmt(e.get("value")), interval, ess, notes)
    return table


def _gate_panel(gate: dict[str, Any] | None) -> Panel:
    if gate is None:
        return Panel("no gate decision: published without an evaluation report", title="Gate", expand=False)
    verdict = "[green]promote[/green]" if gate["promote"] else "[red]do not promote[/red]"
    incumbent = gate["incumbent_version"]
    lines = [f"{verdict} against {'version ' + str(incumbent) if incumbent else 'no champion'}"]
    if gate.get("reason"):
        lines.append(escape(str(gate["reason"])))
    extra = {k: v for k, v in gate.items() if k not in ("promote", "incumbent_version", "reason")}
    lines += [f"[bold]{escape(k)}[/bold]: {escape(_fmt(v))}" for k, v in extra.items()]
    return Panel("\n".join(lines), title="Gate", expand=False)


def _lineage_table(card: dict[str, Any], history: list[dict[str, Any]]) -> Table:
    table = Table(title="Lineage", title_justify="left")
    for col in ("at", "event", "details"):
        table.add_column(col)
    rows = [
        (e["at"], e["event"], {k: v for k, v in e.items() if k not in ("at", "event")})
        for e in card["lineage"]
    ]
    version = card["version"]
    for h in history:
        if h.get("alias") == CHAMPION and version in (h.get("to"), h.get("from")):
            event = {"promote": "promoted", "rollback": "rolled_back"}.get(h["action"], h["action"])
            if h.get("from") == version:
                event = "replaced as champion" if h["action"] == "promote" else "rolled back from"
            details = {k: h.get(k) for k in ("from", "to", "who", "reason") if h.get(k) is not None}
            if h.get("forced"):
                details["forced"] = True
            rows.append((h["at"], event, details))
    for at, event, details in sorted(rows, key=lambda r: r[0]):
        text = ", ".join(f"{k}={_short(_fmt(v))}" for k, v in details.items())
        table.add_row(at, event, escape(text))
    return table


def render_card(card: dict[str, Any], aliases: dict[str, int], history: list[dict[str, Any]]) -> Group:
    """Rich rendering of a model card with the aliases that point at it and its alias history."""
    pointing = [a for a, v in sorted(aliases.items()) if v == card["version"]]
    ds, pol, tr = card["dataset"], card["policy"], card["training"]
    head = f"{card['name']} version {card['version']}" + (f"  ({', '.join(pointing)})" if pointing else "")
    summary = _kv_table(
        head,
        {
            "algorithm": card["algorithm"],
            "created": card["created_at"],
            "dataset": ds["fingerprint"],
            "environment": ds["env_id"],
            "transitions / episodes": f"{ds['n_transitions']:,} / {ds['n_episodes']:,}",
            "data source": ds["source"],
            "behaviour policy": ds["behavior_policy"],
            "scores": pol["score_kind"],
            "selection": "temperature {temperature:g}, epsilon {epsilon:g}".format(**pol["selection"]),
            "training": f"{tr['steps']:,} steps in {tr['wall_time_s']:.1f} s on {tr['device']}",
            "torch": pol["torch_version"],
        },
    )
    parts: list[Any] = [summary, _kv_table("Hyperparameters", card["hyperparameters"])]
    if tr["final_metrics"]:
        parts.append(_kv_table("Final training metrics", tr["final_metrics"]))
    if card["evaluation"] is not None:
        parts.append(_ope_table(card["evaluation"]))
    parts += [_gate_panel(card["gate"]), _lineage_table(card, history)]
    files = Table(title="Files", title_justify="left")
    files.add_column("file")
    files.add_column("sha256", overflow="fold")
    for fname, digest in card["files"].items():
        files.add_row(escape(fname), digest)
    parts.append(files)
    return Group(*parts)


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@app.command("list")
def list_(registry: RegistryOption = DEFAULT_REGISTRY) -> None:
    """List the policies with their versions and aliases."""
    with _user_errors():
        policies = Registry(registry).list()
    if not policies:
        console.print(f"registry {escape(str(registry))} has no policies yet (rlops registry publish …)")
        return
    table = Table(title=f"Registry {escape(str(registry))}", title_justify="left")
    for col in ("policy", "versions", "champion", "candidate", "other aliases"):
        table.add_column(col)
    for p in policies:
        others = ", ".join(
            f"{a} → {v}" for a, v in sorted(p.aliases.items()) if a not in ("champion", "candidate")
        )
        versions = ", ".join(map(str, p.versions)) if len(p.versions) <= 8 else f"1 … {p.versions[-1]}"
        table.add_row(
            escape(p.name),
            versions or "-",
            _fmt(p.aliases.get("champion")),
            _fmt(p.aliases.get("candidate")),
            escape(others) or "-",
        )
    console.print(table)


@app.command()
def show(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    ref: Annotated[
        str | None,
        typer.Argument(help="Version number or alias [default: champion, else the latest version]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the model card as JSON.")] = False,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Show a version's model card: dataset, training, OPE with intervals, gate, aliases, lineage, files."""
    with _user_errors():
        reg = Registry(registry)
        aliases = reg.aliases(name)
        if ref is None:
            versions = reg.versions(name)
            if not versions:
                raise RegistryError(f"policy {name!r} has no versions")
            ref = CHAMPION if CHAMPION in aliases else str(versions[-1])
        card = reg.card(name, ref)
        history = reg.history(name)
    if as_json:
        typer.echo(json.dumps(card, indent=2))
        return
    console.print(render_card(card, aliases, history))


@app.command()
def publish(
    policy_dir: Annotated[
        Path, typer.Argument(help="Policy directory written by rlops train (policy.pt + model-card.json).")
    ],
    name: Annotated[str, typer.Option("--name", help="Policy name in the registry.")],
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Evaluation report (JSON) of rlops evaluate; its estimates and gate decision for this "
            "policy go into the model card.",
            dir_okay=False,
        ),
    ] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Publish a policy directory as the next version of NAME and point 'candidate' at it."""
    with _user_errors():
        evaluation, gate = report_entry(report, policy_dir, name) if report else (None, None)
        reg = Registry(registry)
        version = reg.publish(policy_dir, name, evaluation=evaluation, gate=gate)
        path = reg.resolve(name, version)
    console.print(
        f"published [bold]{escape(name)}[/bold] version {version} → {escape(str(path))} (candidate)"
    )
    if gate is not None:
        verdict = "promote" if gate.get("promote") else "do not promote"
        console.print(f"gate: {verdict}: {escape(str(gate.get('reason', '')))}")


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    version: Annotated[str, typer.Argument(help="Version number or alias (e.g. candidate).")],
    force: Annotated[
        bool, typer.Option("--force", help="Promote even though the gate does not allow it (needs --reason).")
    ] = False,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why; recorded in the alias history.")
    ] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Make a version the champion, if its gate decision promotes it against the current champion."""
    if force and not (reason and reason.strip()):
        _fail("--force needs --reason: a forced promotion is recorded with its reason")
    with _user_errors():
        reg = Registry(registry)
        previous = reg.promote(name, version, require_gate=not force, force_reason=reason)
        champion = reg.aliases(name)[CHAMPION]
    was = f"version {previous}" if previous is not None else "none"
    console.print(f"[bold]{escape(name)}[/bold] champion is now version {champion} (was {was})")


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Policy name.")],
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded in the alias history.")],
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Point 'champion' back at the previous champion."""
    with _user_errors():
        reg = Registry(registry)
        current = reg.aliases(name).get(CHAMPION)
        target = reg.rollback(name, reason)
    console.print(
        f"[bold]{escape(name)}[/bold] champion rolled back from version {current} to version {target}"
    )
