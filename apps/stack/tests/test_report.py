"""``rlops report`` against a small fake of Prometheus's HTTP API (unit tests; the live test uses a real one).

The fake answers targets, range and instant queries and alerts, records each query it was sent, returns
nothing for training metrics (an empty panel) and refuses queries that name ``broken_metric``.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import typer
from rlops_stack import dashboards
from rlops_stack.boards import ReportError, parse_overrides, read_board, substitute
from rlops_stack.commands.report import report as report_command
from rlops_stack.dashboards import Column, Q, label_variable, make_dashboard, row, stat, table, timeseries
from rlops_stack.report import collect, format_duration, legend_name, parse_duration
from rlops_stack.report_page import format_value, render_html
from typer.testing import CliRunner

T0 = 1_700_000_000.0


@dataclass
class FakePrometheus:
    scrape_interval: str = "5s"
    queries: list[dict[str, str]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, Any]:
        if path == "/api/v1/targets":
            targets = [
                {"labels": {"job": "torchserve"}, "scrapeInterval": self.scrape_interval, "health": "up"}
            ]
            return 200, {"status": "success", "data": {"activeTargets": targets}}
        if path == "/api/v1/alerts":
            return 200, {"status": "success", "data": {"alerts": self.alerts}}
        self.queries.append({"path": path, **params})
        expr = params["query"]
        if "broken_metric" in expr:
            return 400, {"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}
        if "rlops_train" in expr:
            return 200, {"status": "success", "data": {"resultType": "matrix", "result": []}}
        labels = [{"policy": "toy", "version": "1"}, {"policy": "toy", "version": "2"}]
        if path == "/api/v1/query":
            result = [
                {"metric": m, "value": [float(params["time"]), str(0.01 * (i + 1))]}
                for i, m in enumerate(labels)
            ]
            return 200, {"status": "success", "data": {"resultType": "vector", "result": result}}
        start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
        times = [start + k * step for k in range(int((end - start) // step) + 1)]
        result = [
            {"metric": m, "values": [[t, str(0.02 * (i + 1))] for t in times]} for i, m in enumerate(labels)
        ]
        return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}


def serve(fake: Any) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            status, body = fake.answer(parts.path, dict(urllib.parse.parse_qsl(parts.query)))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def prometheus() -> Iterator[tuple[FakePrometheus, str]]:
    fake = FakePrometheus()
    server, url = serve(fake)
    try:
        yield fake, url
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class FakeAlertmanager:
    alerts: list[dict[str, Any]]

    def answer(self, path: str, params: dict[str, str]) -> tuple[int, Any]:
        return (200, self.alerts) if path == "/api/v2/alerts" else (404, {})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def board_json() -> dict[str, Any]:
    made = (
        make_dashboard(
            "rlops-test", "rlops / Test", "A test board.", label_variable("policy", "Policy", "m", "policy")
        )
        .with_row(row("Now"))
        .with_panel(
            stat(
                "Requests", "Requests per second.", "reqps", Q('sum(rate(req{policy=~"$policy"}[5m]))', "rps")
            )
        )
        .with_panel(
            table(
                "Versions",
                "Side by side.",
                ["policy", "version"],
                Column("share", 'share{policy=~"$policy"}', "percentunit"),
                Column("latency", 'lat{policy=~"$policy"}', "s"),
            )
        )
        .with_row(row("Over time"))
        .with_panel(
            timeseries(
                "Latency",
                "Handler latency.",
                "s",
                Q('p99{policy=~"$policy"}[$__rate_interval]', "{{policy}} v{{version}}"),
                threshold=0.1,
            )
        )
        .with_panel(
            timeseries("Loss", "Training loss.", "none", Q('rlops_train_loss{policy=~"$policy"}', "{{run}}"))
        )
        .with_panel(timeseries("Broken", "A query Prometheus refuses.", "none", Q("broken_metric{", "x")))
    )
    return json.loads(dashboards.render(dashboards.number_panels(made.build())))


def test_queries_are_sent_with_variables_and_grafanas_intervals(
    prometheus: tuple[FakePrometheus, str],
) -> None:
    fake, url = prometheus
    result = collect(url, [board_json()], window_s=3600, end=T0)
    # step: 3600 s / 240 points = 15 s; rate interval: max(15 s + 5 s, 4 x 5 s) = 20 s.
    assert (result.step, result.rate_interval) == (15.0, 20.0)
    sent = {q["query"]: q for q in fake.queries}
    assert 'p99{policy=~".*"}[20s]' in sent
    latency = sent['p99{policy=~".*"}[20s]']
    assert (latency["path"], latency["start"], latency["end"], latency["step"]) == (
        "/api/v1/query_range",
        f"{T0 - 3600:.3f}",
        f"{T0:.3f}",
        "15",
    )
    assert sent['share{policy=~".*"}']["path"] == "/api/v1/query"
    assert sent['share{policy=~".*"}']["time"] == f"{T0:.3f}"
    fake.queries.clear()
    collect(url, [board_json()], window_s=600, end=T0, overrides={"policy": "toy"})
    assert 'p99{policy=~"toy"}[20s]' in {q["query"] for q in fake.queries}


def test_empty_and_failed_panels_are_named_and_shown(prometheus: tuple[FakePrometheus, str]) -> None:
    _, url = prometheus
    result = collect(url, [board_json()], window_s=3600, end=T0)
    assert result.empty == ["rlops-test / Loss", "rlops-test / Broken"]
    assert len(result.failed) == 1
    assert result.failed[0].startswith("rlops-test / Broken / A: Prometheus at")
    assert "parse error at char 3" in result.failed[0]
    page = render_html(result)
    assert page.count("<div class=nodata>no data</div>") == 2
    assert "query failed: A: Prometheus at" in page
    assert page.count('src="data:image/png;base64,') == 1
    assert "<h3>Now</h3>" in page
    assert "<h3>Over time</h3>" in page
    assert "5 panels, 2 without data, 1 failed queries" in page


def test_tables_stats_and_series_are_readable(prometheus: tuple[FakePrometheus, str]) -> None:
    _, url = prometheus
    page = render_html(collect(url, [board_json()], window_s=3600, end=T0))
    # Table panel: one row per label set, one column per query, each in its own unit.
    assert "<th>policy</th><th>version</th><th>share</th><th>latency</th>" in page
    assert "<td>toy</td><td>2</td><td class=num>2%</td><td class=num>20 ms</td>" in page
    # Stat panel: the last value, large.
    assert "<span class=big>0.04 req/s</span><span>rps</span>" in page
    # Time series: last, min, mean and max of every series under the chart.
    assert "<tr><td>toy v2</td><td class=num>40 ms</td><td class=num>40 ms</td>" in page


def test_alerts_from_prometheus_and_alertmanager_are_listed_escaped(
    prometheus: tuple[FakePrometheus, str],
) -> None:
    fake, url = prometheus
    fake.alerts = [
        {
            "labels": {
                "alertname": "RlopsServingLatencyHigh",
                "severity": "warning",
                "policy": "toy",
                "version": "2",
            },
            "annotations": {"summary": "p99 <above> 100 ms"},
            "state": "firing",
            "activeAt": "2023-11-14T22:13:20Z",
            "value": "1.5e-01",
        }
    ]
    am = FakeAlertmanager(
        [
            {
                "labels": {"alertname": "RlopsServingLatencyHigh", "severity": "warning"},
                "status": {"state": "active"},
                "receivers": [{"name": "rlops-actions"}, {"name": "slack-tickets"}],
                "startsAt": "2023-11-14T22:13:20Z",
            }
        ]
    )
    server, am_url = serve(am)
    try:
        result = collect(url, [board_json()], window_s=600, end=T0, alertmanager_url=am_url)
    finally:
        server.shutdown()
        server.server_close()
    page = render_html(result)
    assert "<tr class=firing><td>firing</td><td>RlopsServingLatencyHigh</td><td>warning</td>" in page
    assert "p99 &lt;above&gt; 100 ms" in page
    assert "<td>rlops-actions, slack-tickets</td>" in page
    assert "1 alerts firing" in page


def test_an_unreachable_alertmanager_is_reported_in_the_page(prometheus: tuple[FakePrometheus, str]) -> None:
    _, url = prometheus
    am_url = closed_port_url()
    result = collect(url, [board_json()], window_s=600, end=T0, alertmanager_url=am_url)
    assert result.alerts.alertmanager_error is not None
    assert f"Alertmanager at {am_url} cannot be reached" in result.alerts.alertmanager_error
    assert "No alert is pending or firing." in render_html(result)


def test_every_built_dashboard_is_one_the_report_reads() -> None:
    for raw in dashboards.load_built(Path(__file__).resolve().parents[3] / "dashboards" / "build"):
        board = read_board(raw)
        assert board.panels
        assert all(v == ".*" for v in board.variables.values())


def test_unsupported_panels_and_unknown_variables_are_named() -> None:
    raw = board_json()
    raw["panels"][1]["type"] = "piechart"
    with pytest.raises(ReportError, match=r"dashboard rlops-test, panel 'Requests': type 'piechart' is not"):
        read_board(raw)
    with pytest.raises(ReportError, match=r"query A: the query uses \$run"):
        substitute('x{run=~"$run"}', {"policy": ".*"}, "query A")
    assert (
        substitute("rate(x[${__rate_interval}]) * $k", {"__rate_interval": "1m", "k": "2"}, "q")
        == "rate(x[1m]) * 2"
    )


def test_var_options_name_known_variables() -> None:
    boards = [read_board(board_json())]
    assert parse_overrides(["policy=toy"], boards) == {"policy": "toy"}
    with pytest.raises(ReportError, match="expected NAME=VALUE"):
        parse_overrides(["policy"], boards)
    with pytest.raises(ReportError, match="no dashboard has a variable 'run'; known: policy"):
        parse_overrides(["run=a"], boards)


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("1h30m", 5400), ("2d", 172800), ("500ms", 0.5)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "1x", "h", "-5m", "1h 30m", "0s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ReportError, match="expected a positive duration"):
        parse_duration(text, "--window")


def test_format_duration_and_values() -> None:
    assert [format_duration(s) for s in (0.2, 20, 60, 90, 3600, 86400)] == [
        "1s",
        "20s",
        "1m",
        "90s",
        "1h",
        "1d",
    ]
    assert format_value(0.0123, "s") == "12.3 ms"
    assert format_value(2.5, "s") == "2.5 s"
    assert format_value(0.25, "percentunit") == "25%"
    assert format_value(float("nan"), "s") == "NaN"
    assert format_value(float("inf"), "none") == "∞"
    assert format_value(1.5e-5, "none") == "1.500e-05"


def test_legend_name() -> None:
    labels = {"__name__": "up", "job": "torchserve", "instance": "h:1"}
    assert legend_name("{{job}} {{ instance }}", labels) == "torchserve h:1"
    assert legend_name("", labels) == 'up{instance="h:1", job="torchserve"}'
    assert legend_name("", {}) == "value"


# --- the command ----------------------------------------------------------------------------------------


def command() -> typer.Typer:
    app = typer.Typer()
    app.command()(report_command)
    return app


def test_report_command_writes_the_page_and_fails_on_a_refused_query(
    prometheus: tuple[FakePrometheus, str], tmp_path: Path
) -> None:
    _, url = prometheus
    built = tmp_path / "build"
    built.mkdir()
    (built / "rlops-test.json").write_text(json.dumps(board_json()), encoding="utf-8")
    out = tmp_path / "report.html"
    args = ["--out", str(out), "--prometheus-url", url, "--no-alertmanager", "--dashboards", str(built)]
    result = CliRunner().invoke(command(), [*args, "--window", "30m", "--var", "policy=toy"])
    assert result.exit_code == 1, result.output
    assert f"wrote {out}" in result.output
    assert "5 panels from 1 dashboards, 2 without data, 1 failed queries" in result.output
    assert "no data: rlops-test / Loss" in result.output
    assert "query failed: rlops-test / Broken / A" in result.output
    assert "<h1>rlops report</h1>" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--window", "soon"], "--window 'soon': expected a positive duration"),
        (["--var", "run=x"], "no dashboard has a variable 'run'"),
        (["--dashboard", "rlops-nope"], "--dashboard rlops-nope: no such dashboard"),
        (["--window", "7d", "--step", "10s"], "is 60480 points per series; Prometheus answers at most 11000"),
    ],
)
def test_report_command_refuses_bad_options(tmp_path: Path, extra: list[str], message: str) -> None:
    built = tmp_path / "build"
    built.mkdir()
    (built / "rlops-test.json").write_text(json.dumps(board_json()), encoding="utf-8")
    result = CliRunner().invoke(
        command(), ["--dashboards", str(built), "--out", str(tmp_path / "r.html"), *extra]
    )
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "r.html").exists()


def test_report_command_says_when_prometheus_is_not_there(tmp_path: Path) -> None:
    built = tmp_path / "build"
    built.mkdir()
    (built / "rlops-test.json").write_text(json.dumps(board_json()), encoding="utf-8")
    url = closed_port_url()
    result = CliRunner().invoke(
        command(), ["--dashboards", str(built), "--prometheus-url", url, "--out", str(tmp_path / "r.html")]
    )
    assert result.exit_code == 2
    assert f"Prometheus at {url} cannot be reached" in result.output
    assert not (tmp_path / "r.html").exists()
