"""The built dashboards as ``rlops report`` reads them: boards, panels, queries and their variables.

:func:`read_board` turns a dashboard's JSON (``dashboards/build/*.json``) into the panels and queries the
report runs, with each variable at the value Grafana would give it ("All" for a label variable);
:func:`substitute` fills a query's variables, :func:`parse_overrides` reads ``--var name=value``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_PANELS = ("timeseries", "stat", "table")


class ReportError(ValueError):
    """A dashboard, a variable or an option cannot be used for the report; the message says which and why."""


@dataclass(frozen=True)
class Query:
    ref_id: str
    expr: str
    legend: str
    instant: bool


@dataclass
class Panel:
    id: int
    title: str
    description: str
    kind: str
    unit: str
    queries: list[Query]
    columns: dict[str, str] = field(default_factory=dict)
    """Table panels: the column title of each query (by refId)."""
    column_units: dict[str, str] = field(default_factory=dict)
    """Table panels: the unit of each query's column (by refId), where it has its own."""
    thresholds: list[float] = field(default_factory=list)
    """Alert thresholds the dashboard draws as lines."""
    dashed: list[str] = field(default_factory=list)
    """Regular expressions of series names the dashboard draws dashed (reference lines)."""
    section: str = ""


@dataclass
class Board:
    uid: str
    title: str
    description: str
    variables: dict[str, str]
    """Every variable the queries may use, with the value the report gives it (the datasource is not one)."""
    panels: list[Panel]


def _variable_defaults(board: dict[str, Any]) -> dict[str, str]:
    uid = board.get("uid")
    values: dict[str, str] = {}
    for var in (board.get("templating") or {}).get("list") or []:
        name, kind = var.get("name"), var.get("type")
        if kind == "datasource":
            continue
        if kind == "query":
            if not var.get("includeAll") or var.get("allValue") is None:
                raise ReportError(
                    f"dashboard {uid}: variable {name!r} has no 'All' value for the report to use"
                )
            values[name] = str(var["allValue"])
        elif kind in ("interval", "custom", "constant", "textbox"):
            current = (var.get("current") or {}).get("value")
            if isinstance(current, list):
                current = current[0] if len(current) == 1 else None
            if not isinstance(current, str):
                raise ReportError(f"dashboard {uid}: variable {name!r} has no single current value")
            values[name] = current
        else:
            raise ReportError(
                f"dashboard {uid}: variable {name!r} of type {kind!r} is not supported by the report"
            )
    return values


def _thresholds(panel: dict[str, Any]) -> list[float]:
    defaults = (panel.get("fieldConfig") or {}).get("defaults") or {}
    style = ((defaults.get("custom") or {}).get("thresholdsStyle") or {}).get("mode")
    steps = (defaults.get("thresholds") or {}).get("steps") or []
    values = [float(s["value"]) for s in steps if isinstance(s.get("value"), int | float)]
    return values if style in ("line", "dashed", "line+area", "dashed+area") else []


def read_board(board: dict[str, Any]) -> Board:
    """The panels, queries and variables of one built dashboard."""
    uid = str(board.get("uid"))
    panels: list[Panel] = []
    section = ""
    for raw in board.get("panels") or []:
        kind = raw.get("type")
        if kind == "row":
            section = str(raw.get("title") or "")
            children = raw.get("panels") or []
        else:
            children = [raw]
        for p in children:
            kind = p.get("type")
            title = str(p.get("title") or "")
            if kind not in SUPPORTED_PANELS:
                raise ReportError(
                    f"dashboard {uid}, panel {title!r}: type {kind!r} is not one the report draws "
                    f"({', '.join(SUPPORTED_PANELS)})"
                )
            queries = [
                Query(
                    ref_id=str(t.get("refId") or ""),
                    expr=str(t.get("expr") or ""),
                    legend=str(t.get("legendFormat") or ""),
                    instant=bool(t.get("instant")) and not t.get("range"),
                )
                for t in p.get("targets") or []
                if not t.get("hide")
            ]
            if not queries or any(not q.expr for q in queries):
                raise ReportError(f"dashboard {uid}, panel {title!r}: every panel needs queries with an expr")
            columns, column_units, dashed = {}, {}, []
            for override in (p.get("fieldConfig") or {}).get("overrides") or []:
                matcher = override.get("matcher") or {}
                name = matcher.get("options")
                if matcher.get("id") == "byRegexp" and isinstance(name, str):
                    for prop in override.get("properties") or []:
                        if (
                            prop.get("id") == "custom.lineStyle"
                            and (prop.get("value") or {}).get("fill") == "dash"
                        ):
                            dashed.append(name)
                if isinstance(name, str) and name.startswith("Value #"):
                    ref = name.removeprefix("Value #")
                    for prop in override.get("properties") or []:
                        if prop.get("id") == "displayName":
                            columns[ref] = str(prop.get("value"))
                        elif prop.get("id") == "unit":
                            column_units[ref] = str(prop.get("value"))
            panels.append(
                Panel(
                    id=int(p.get("id") or 0),
                    title=title,
                    description=str(p.get("description") or ""),
                    kind=str(kind),
                    unit=str(((p.get("fieldConfig") or {}).get("defaults") or {}).get("unit") or ""),
                    queries=queries,
                    columns=columns,
                    column_units=column_units,
                    thresholds=_thresholds(p),
                    dashed=dashed,
                    section=section,
                )
            )
    return Board(
        uid,
        str(board.get("title") or uid),
        str(board.get("description") or ""),
        _variable_defaults(board),
        panels,
    )


_VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str, values: dict[str, str], where: str) -> str:
    """``expr`` with ``$name`` / ``${name}`` replaced from ``values``; an unknown variable is an error."""

    def one(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise ReportError(f"{where}: the query uses ${name}, which the dashboard does not define")
        return values[name]

    return _VAR_RE.sub(one, expr)


def parse_overrides(items: Iterable[str], boards: Sequence[Board]) -> dict[str, str]:
    """``--var NAME=VALUE`` options: the names must be variables of at least one of ``boards``."""
    known = sorted({name for b in boards for name in b.variables if not name.startswith("__")})
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ReportError(f"--var {item!r}: expected NAME=VALUE, e.g. policy=cartpole")
        if name not in known:
            raise ReportError(
                f"--var {item!r}: no dashboard has a variable {name!r}; known: {', '.join(known)}"
            )
        out[name] = value
    return out
