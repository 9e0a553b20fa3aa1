"""``rlops report``: the dashboards as one static HTML page, for people who would rather look than read.

It runs every query of every panel of the built dashboards (``dashboards/build/*.json``, read by
:mod:`rlops_stack.boards`) against a real Prometheus over a time window, exactly as Grafana would with
the variables at "All"; :mod:`rlops_stack.report_page` draws each panel as a chart (a PNG embedded in
the page) with a table of its series below. The alerts Prometheus
holds (pending and firing) and the ones Alertmanager knows (active, silenced, inhibited) come first.
Panels whose queries return nothing say "no data"; a query Prometheus refuses is shown as an error.

Grafana's built-in variables are given the values Grafana would use: ``$__rate_interval`` is
max(step + scrape interval, 4 × scrape interval) with the largest scrape interval among Prometheus's
targets, ``$__interval`` the step and ``$__range`` the window.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlops_server.http import request_json

from rlops_stack import prometheus
from rlops_stack.boards import Board, Panel, Query, ReportError, read_board, substitute

DEFAULT_WINDOW_S = 3600.0
DEFAULT_SCRAPE_S = 15.0
"""Grafana's default scrape interval, used when Prometheus has no targets to ask."""
POINTS = 240
"""Points per series: the step is the window divided by this (at least one second)."""
MAX_POINTS = 11_000
"""Prometheus refuses range queries with more points per series than this."""


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
