"""``rlops report``: the dashboards as one static HTML page, for people who would rather look than read.

It runs every query of every panel of the built dashboards (``dashboards/build/*.json``) against a real
Prometheus over a time window, exactly as Grafana would with the variables at "All", and draws each
panel as a chart (a PNG embedded in the page) with a table of its series below. The alerts Prometheus
holds (pending and firing) and the ones Alertmanager knows (active, silenced, inhibited) come first.
Panels whose queries return nothing say "no data"; a query Prometheus refuses is shown as an error.

Grafana's built-in variables are given the values Grafana would use: ``$__rate_interval`` is
max(step + scrape interval, 4 × scrape interval) with the largest scrape interval among Prometheus's
targets, ``$__interval`` the step and ``$__range`` the window.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlops_server.http import request_json

from rlops_stack import prometheus

DEFAULT_WINDOW_S = 3600.0
DEFAULT_SCRAPE_S = 15.0
"""Grafana's default scrape interval, used when Prometheus has no targets to ask."""
POINTS = 240
"""Points per series: the step is the window divided by this (at least one second)."""
MAX_POINTS = 11_000
"""Prometheus refuses range queries with more points per series than this."""
MAX_LINES = 12
"""Series drawn per chart; the table below it lists up to MAX_ROWS."""
MAX_ROWS = 60
SUPPORTED_PANELS = ("timeseries", "stat", "table")


class ReportError(ValueError):
    """A dashboard, a variable or an option cannot be used for the report; the message says which and why."""


# --- durations ------------------------------------------------------------------------------------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str, what: str = "duration") -> float:
    """``90s``, ``5m``, ``1h30m``, ``2d`` … in seconds (Prometheus's units)."""
    text = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match[1]) * _UNIT_S[match[2]]
        pos = match.end()
    if not text or pos != len(text) or total <= 0:
        raise ReportError(f"{what} {text!r}: expected a positive duration such as 30s, 15m, 1h or 1h30m")
    return total


def format_duration(seconds: float) -> str:
    """Seconds as a PromQL duration (whole seconds; at least 1s)."""
    s = max(1, round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


# --- the dashboards as the report reads them ---------------------------------------------------------------


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


# --- querying ------------------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    times: list[float]
    values: list[float]

    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    @property
    def last(self) -> float:
        finite = self.finite()
        return finite[-1] if finite else math.nan


@dataclass
class QueryResult:
    query: Query
    expr: str
    """The query as sent, variables filled in."""
    series: list[Series] = field(default_factory=list)
    error: str | None = None


@dataclass
class PanelResult:
    panel: Panel
    results: list[QueryResult]

    @property
    def has_data(self) -> bool:
        return any(r.series for r in self.results)

    @property
    def errors(self) -> list[str]:
        return [f"{r.query.ref_id}: {r.error}" for r in self.results if r.error]


@dataclass
class BoardResult:
    board: Board
    panels: list[PanelResult]


@dataclass
class AlertsView:
    prometheus: list[dict[str, Any]] = field(default_factory=list)
    alertmanager: list[dict[str, Any]] | None = None
    alertmanager_error: str | None = None


@dataclass
class Report:
    prometheus_url: str
    alertmanager_url: str | None
    start: float
    end: float
    step: float
    rate_interval: float
    boards: list[BoardResult]
    alerts: AlertsView

    @property
    def failed(self) -> list[str]:
        return [
            f"{b.board.uid} / {p.panel.title} / {e}" for b in self.boards for p in b.panels for e in p.errors
        ]

    @property
    def empty(self) -> list[str]:
        return [f"{b.board.uid} / {p.panel.title}" for b in self.boards for p in b.panels if not p.has_data]


def legend_name(legend: str, labels: dict[str, str]) -> str:
    """Grafana's legend format: ``{{label}}`` replaced by the series' label value."""
    if legend:
        return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), legend).strip()
    shown = {k: v for k, v in labels.items() if k != "__name__"}
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(shown.items()))
    return f"{labels.get('__name__', '')}{{{inner}}}" if inner or "__name__" in labels else "value"


def _series(raw: list[dict[str, Any]], legend: str, instant: bool) -> list[Series]:
    out = []
    for item in raw:
        labels = {str(k): str(v) for k, v in (item.get("metric") or {}).items()}
        points = [item["value"]] if instant else item.get("values") or []
        times = [float(t) for t, _ in points]
        values = [float(v) for _, v in points]
        out.append(Series(legend_name(legend, labels), labels, times, values))
    out.sort(key=lambda s: s.name)
    return out


def scrape_interval(url: str) -> float:
    """The largest scrape interval among Prometheus's active targets (Grafana's default without any)."""
    intervals = [
        parse_duration(t["scrapeInterval"], "scrape interval")
        for t in prometheus.targets(url)
        if isinstance(t.get("scrapeInterval"), str)
    ]
    return max(intervals, default=DEFAULT_SCRAPE_S)


def rate_interval(step: float, scrape: float) -> float:
    return max(step + scrape, 4 * scrape)


def run_panel(
    url: str, panel: Panel, values: dict[str, str], start: float, end: float, step: float, where: str
) -> PanelResult:
    results = []
    for q in panel.queries:
        expr = substitute(q.expr, values, f"{where}, panel {panel.title!r}, query {q.ref_id}")
        result = QueryResult(q, expr)
        try:
            if q.instant:
                result.series = _series(prometheus.query(url, expr, at=end), q.legend, instant=True)
            else:
                result.series = _series(
                    prometheus.query_range(url, expr, start, end, step), q.legend, instant=False
                )
        except prometheus.PrometheusError as e:
            result.error = str(e)
        results.append(result)
    return PanelResult(panel, results)


def alertmanager_alerts(url: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Alerts Alertmanager holds now (active, silenced and inhibited) from its v2 API."""
    full = f"{url.rstrip('/')}/api/v2/alerts"
    try:
        status, body = request_json("GET", full, timeout=timeout)
    except OSError as e:
        raise ReportError(f"Alertmanager at {url} cannot be reached ({e})") from None
    if status != 200 or not isinstance(body, list):
        raise ReportError(f"Alertmanager at {url} answered {status} to /api/v2/alerts: {str(body)[:300]}")
    return body


def collect(
    prometheus_url: str,
    boards: Sequence[dict[str, Any]],
    *,
    window_s: float = DEFAULT_WINDOW_S,
    end: float | None = None,
    step_s: float | None = None,
    overrides: dict[str, str] | None = None,
    alertmanager_url: str | None = None,
) -> Report:
    """Run every panel's queries of ``boards`` (built dashboard JSON) over the window ending at ``end``."""
    if not window_s > 0:
        raise ReportError(f"the window must be positive, got {window_s!r} s")
    end = dt.datetime.now(dt.UTC).timestamp() if end is None else end
    start = end - window_s
    step = step_s if step_s is not None else max(1.0, math.ceil(window_s / POINTS))
    if not step > 0:
        raise ReportError(f"the step must be positive, got {step!r} s")
    if window_s / step > MAX_POINTS:
        raise ReportError(
            f"a {format_duration(window_s)} window at a {format_duration(step)} step is "
            f"{window_s / step:.0f} points per series; Prometheus answers at most {MAX_POINTS}: "
            "use a longer --step"
        )
    read = [read_board(b) for b in boards]
    given = overrides or {}
    rate = rate_interval(step, scrape_interval(prometheus_url))
    builtins = {
        "__rate_interval": format_duration(rate),
        "__interval": format_duration(step),
        "__range": format_duration(window_s),
    }
    board_results = []
    for board in read:
        values = {**board.variables, **{k: v for k, v in given.items() if k in board.variables}, **builtins}
        panels = [
            run_panel(prometheus_url, p, values, start, end, step, f"dashboard {board.uid}")
            for p in board.panels
        ]
        board_results.append(BoardResult(board, panels))
    view = AlertsView(prometheus=prometheus.alerts(prometheus_url))
    if alertmanager_url:
        try:
            view.alertmanager = alertmanager_alerts(alertmanager_url)
        except ReportError as e:
            view.alertmanager_error = str(e)
    return Report(prometheus_url, alertmanager_url, start, end, step, rate, board_results, view)


# --- rendering -----------------------------------------------------------------------------------------


def format_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if unit == "s":
        if abs(value) < 1:
            return f"{value * 1000:.3g} ms"
        return f"{value:.3g} s"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "reqps":
        return f"{value:.3g} req/s"
    if unit == "ops":
        return f"{value:.3g}/s"
    if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"


def _axis_formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: format_value(v, unit))


def chart_png(panel: Panel, results: Sequence[QueryResult]) -> bytes:
    """The panel's series as a line chart (PNG), at most MAX_LINES of them, local time on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    series = [s for r in results for s in r.series][:MAX_LINES]
    fig, ax = plt.subplots(figsize=(7.2, 3.0), dpi=100)
    palette = plt.get_cmap("tab10")
    ax.set_prop_cycle(color=[palette(i) for i in range(10)])
    try:
        for s in series:
            times = mdates.date2num([dt.datetime.fromtimestamp(t) for t in s.times])
            dashed = any(re.search(pattern, s.name) for pattern in panel.dashed)
            ax.plot(times, s.values, linewidth=1.2, label=s.name, linestyle="--" if dashed else "-")
        for i, level in enumerate(panel.thresholds):
            last = i == len(panel.thresholds) - 1
            ax.axhline(
                level,
                color="#d62728" if last else "#ff7f0e",
                linestyle="--",
                linewidth=1,
                label=f"threshold {format_value(level, panel.unit)}",
            )
        ax.yaxis.set_major_formatter(_axis_formatter(panel.unit))
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        if series:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _time(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _series_table(panel: Panel, results: Sequence[QueryResult]) -> str:
    rows = [s for r in results for s in r.series]
    head = "<tr><th>series</th><th>last</th><th>min</th><th>mean</th><th>max</th></tr>"
    body = []
    for s in rows[:MAX_ROWS]:
        finite = s.finite()
        stats = [s.last, min(finite), sum(finite) / len(finite), max(finite)] if finite else [math.nan] * 4
        cells = "".join(f"<td class=num>{_e(format_value(v, panel.unit))}</td>" for v in stats)
        body.append(f"<tr><td>{_e(s.name)}</td>{cells}</tr>")
    more = f"<p class=note>{len(rows) - MAX_ROWS} more series not listed.</p>" if len(rows) > MAX_ROWS else ""
    return f"<table>{head}{''.join(body)}</table>{more}"


def _instant_table(panel: Panel, results: Sequence[QueryResult]) -> str:
    """Table panels: one row per label set, one column per query (Grafana's merge)."""
    columns = [(r, panel.columns.get(r.query.ref_id, r.query.ref_id)) for r in results]
    keys: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    for r, _ in columns:
        for s in r.series:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "__name__"))
            keys.setdefault(key, {})[r.query.ref_id] = s.last
    label_names = sorted({k for key in keys for k, _ in key})
    head = "".join(f"<th>{_e(n)}</th>" for n in label_names) + "".join(
        f"<th>{_e(t)}</th>" for _, t in columns
    )
    body = []
    for key in sorted(keys):
        labels = dict(key)
        cells = "".join(f"<td>{_e(labels.get(n, ''))}</td>" for n in label_names)
        for r, _ in columns:
            v = keys[key].get(r.query.ref_id)
            unit = panel.column_units.get(r.query.ref_id, panel.unit)
            cells += f"<td class=num>{_e('-' if v is None else format_value(v, unit))}</td>"
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _stat_html(panel: Panel, results: Sequence[QueryResult]) -> str:
    """Stat panels: the last value of each series, large."""
    items = [
        f"<div class=stat><span class=big>{_e(format_value(s.last, panel.unit))}</span>"
        f"<span>{_e(s.name)}</span></div>"
        for r in results
        for s in r.series[:MAX_ROWS]
    ]
    return f"<div class=stats>{''.join(items)}</div>"


def _panel_html(result: PanelResult) -> str:
    panel = result.panel
    parts = [f"<section class=panel><h4>{_e(panel.title)}</h4>"]
    if panel.description:
        parts.append(f"<p class=desc>{_e(panel.description)}</p>")
    for error in result.errors:
        parts.append(f"<p class=error>query failed: {_e(error)}</p>")
    if not result.has_data:
        parts.append("<div class=nodata>no data</div>")
    elif panel.kind == "table":
        parts.append(_instant_table(panel, result.results))
    elif panel.kind == "stat":
        parts.append(_stat_html(panel, result.results))
    else:
        png = base64.b64encode(chart_png(panel, result.results)).decode()
        parts.append(f'<img alt="{_e(panel.title)}" src="data:image/png;base64,{png}">')
        parts.append(_series_table(panel, result.results))
    empty = [r.query.ref_id for r in result.results if not r.series and not r.error]
    if result.has_data and empty:
        parts.append(f"<p class=note>no data for query {', '.join(empty)}</p>")
    queries = "".join(
        f"<li><b>{_e(r.query.ref_id)}</b> <code>{_e(r.expr)}</code></li>" for r in result.results
    )
    parts.append(f"<details><summary>queries</summary><ul>{queries}</ul></details></section>")
    return "".join(parts)


def _since(value: str | None) -> str:
    if not value:
        return ""
    try:
        return _time(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return value


def _alerts_html(view: AlertsView, alertmanager_url: str | None) -> str:
    parts = ["<h2>Alerts</h2>", "<h3>Prometheus (pending and firing)</h3>"]
    if not view.prometheus:
        parts.append("<p class=ok>No alert is pending or firing.</p>")
    else:
        rows = []
        order = {"firing": 0, "pending": 1}
        for a in sorted(
            view.prometheus,
            key=lambda a: (order.get(a.get("state", ""), 2), a["labels"].get("alertname", "")),
        ):
            labels = a.get("labels") or {}
            notes = a.get("annotations") or {}
            rows.append(
                f"<tr class={_e(a.get('state', ''))}><td>{_e(a.get('state', ''))}</td>"
                f"<td>{_e(labels.get('alertname', ''))}</td>"
                f"<td>{_e(labels.get('severity', ''))}</td><td>{_e(labels.get('policy', ''))}</td>"
                f"<td>{_e(labels.get('version', ''))}</td><td>{_e(notes.get('summary', ''))}</td>"
                f"<td>{_e(_since(a.get('activeAt')))}</td><td class=num>{_e(a.get('value', ''))}</td></tr>"
            )
        parts.append(
            "<table><tr><th>state</th><th>alert</th><th>severity</th><th>policy</th><th>version</th>"
            f"<th>summary</th><th>active since</th><th>value</th></tr>{''.join(rows)}</table>"
        )
    if alertmanager_url:
        parts.append(f"<h3>Alertmanager ({_e(alertmanager_url)})</h3>")
        if view.alertmanager_error:
            parts.append(f"<p class=error>{_e(view.alertmanager_error)}</p>")
        elif not view.alertmanager:
            parts.append("<p class=ok>Alertmanager holds no alert.</p>")
        else:
            rows = []
            for a in view.alertmanager:
                labels = a.get("labels") or {}
                status = a.get("status") or {}
                receivers = ", ".join(r.get("name", "") for r in a.get("receivers") or [])
                rows.append(
                    f"<tr><td>{_e(status.get('state', ''))}</td><td>{_e(labels.get('alertname', ''))}</td>"
                    f"<td>{_e(labels.get('severity', ''))}</td><td>{_e(labels.get('policy', ''))}</td>"
                    f"<td>{_e(labels.get('version', ''))}</td><td>{_e(receivers)}</td>"
                    f"<td>{_e(_since(a.get('startsAt')))}</td></tr>"
                )
            parts.append(
                "<table><tr><th>state</th><th>alert</th><th>severity</th><th>policy</th><th>version</th>"
                f"<th>receivers</th><th>since</th></tr>{''.join(rows)}</table>"
            )
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1f2328;max-width:1500px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:36px}
h3{color:#57606a;margin-top:24px}
.meta{color:#57606a;font-size:13px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:16px}
.panel{border:1px solid #d0d7de;border-radius:6px;padding:10px 12px;background:#fff}
.panel h4{margin:0 0 4px} .desc{color:#57606a;font-size:12px;margin:0 0 8px}
img{max-width:100%}
table{border-collapse:collapse;font-size:12px;margin:6px 0;width:100%}
th,td{border-bottom:1px solid #eaeef2;padding:3px 6px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.firing td{background:#ffebe9} tr.pending td{background:#fff8c5}
.nodata{color:#8c959f;background:#f6f8fa;border:1px dashed #d0d7de;padding:28px;text-align:center}
.error{color:#cf222e;font-size:12px} .ok{color:#1a7f37} .note{color:#57606a;font-size:12px}
.stats{display:flex;flex-wrap:wrap;gap:18px}
.stat{display:flex;flex-direction:column} .stat span{font-size:12px;color:#57606a}
.stat .big{font-size:26px;color:#1f2328;font-variant-numeric:tabular-nums}
code{font-size:11px;word-break:break-all} details{margin-top:6px;font-size:12px}
"""


def render_html(report: Report) -> str:
    """The whole page: summary, alerts, then every dashboard's panels grouped by row."""
    panels = sum(len(b.panels) for b in report.boards)
    firing = sum(1 for a in report.alerts.prometheus if a.get("state") == "firing")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>rlops report {_e(_time(report.end))}</title><style>{CSS}</style></head><body>",
        "<h1>rlops report</h1>",
        f"<p class=meta>{_e(_time(report.start))} → {_e(_time(report.end))}"
        f" · step {_e(format_duration(report.step))}"
        f" · rate window {_e(format_duration(report.rate_interval))}"
        f" · Prometheus {_e(report.prometheus_url)}<br>"
        f"{panels} panels, {len(report.empty)} without data, {len(report.failed)} failed queries · "
        f"{firing} alerts firing</p>",
        _alerts_html(report.alerts, report.alertmanager_url),
    ]
    for b in report.boards:
        parts.append(f"<h2>{_e(b.board.title)}</h2>")
        if b.board.description:
            parts.append(f"<p class=desc>{_e(b.board.description)}</p>")
        section: str | None = None
        open_grid = False
        for p in b.panels:
            if p.panel.section != section:
                if open_grid:
                    parts.append("</div>")
                section = p.panel.section
                if section:
                    parts.append(f"<h3>{_e(section)}</h3>")
                parts.append("<div class=grid>")
                open_grid = True
            parts.append(_panel_html(p))
        if open_grid:
            parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
