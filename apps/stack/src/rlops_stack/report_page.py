"""The report page: every panel of ``rlops report`` as a chart and a table, alerts first, in one HTML file."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import re
from collections.abc import Sequence
from typing import Any

from rlops_stack.boards import Panel
from rlops_stack.report import AlertsView, PanelResult, QueryResult, Report, format_duration

MAX_LINES = 12
"""Series drawn per chart; the table below it lists up to MAX_ROWS."""
MAX_ROWS = 60


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
