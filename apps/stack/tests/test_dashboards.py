"""Dashboards as code: the committed JSON is a fresh build, and every query reads real metric names.

The queries are checked without a Prometheus here: promtool parses each of them (variables filled in as
the report fills them), and every metric name they read must be one an rlops exporter, TorchServe or a
recording rule of alerts/ produces. test_dashboards_live.py runs them against a real one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rlops_contracts import metrics
from rlops_stack import dashboards
from rlops_stack.boards import read_board, substitute
from rlops_stack.commands.dashboards import app
from rlops_stack.dashboards import DashboardError
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[3]
SOURCES = REPO / "dashboards"
BUILT = SOURCES / "build"
UIDS = {"rlops-training", "rlops-serving", "rlops-policy-health", "rlops-slo"}

PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan", "e",
}  # fmt: skip


def built() -> list[dict[str, Any]]:
    return dashboards.load_built(BUILT)


def all_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr with the report's variable values) of every panel query."""
    out = []
    for raw in built():
        board = read_board(raw)
        values = {**board.variables, "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
        for panel in board.panels:
            for q in panel.queries:
                out.append((board.uid, panel.title, substitute(q.expr, values, board.uid)))
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (labels, strings, ranges, grouping and functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match[0]
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        if re.fullmatch(r"\d*\.?\d*e?\d*", word):
            continue
        names.add(word)
    return names


def known_metrics() -> set[str]:
    """Names rlops exporters and TorchServe export (rlops_contracts.metrics), and alerts/ recording rules."""
    exported = {
        v
        for k, v in vars(metrics).items()
        if k.isupper() and isinstance(v, str) and not k.startswith(("PORT", "JOB"))
    }
    exported |= {f"{metrics.INFERENCE_LATENCY}_{s}" for s in ("bucket", "count", "sum")}
    recorded = set()
    for path in sorted((REPO / "alerts" / "rules").glob("*.yaml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            recorded |= {r["record"] for r in group["rules"] if "record" in r}
    return exported | recorded | {"up"}


def test_the_committed_build_is_a_fresh_build() -> None:
    assert dashboards.stale(SOURCES) == [], "run: rlops dashboards build"


def test_the_four_dashboards_with_stable_uids() -> None:
    boards = built()
    assert {b["uid"] for b in boards} == UIDS
    for b in boards:
        text = json.dumps(b, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        assert (BUILT / f"{b['uid']}.json").read_text(encoding="utf-8") == text


def test_every_dashboard_selects_its_data_source_through_a_variable() -> None:
    for b in built():
        variables = b["templating"]["list"]
        assert variables[0] == {
            **variables[0],
            "name": "datasource",
            "type": "datasource",
            "query": "prometheus",
        }
        for panel in b["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


@pytest.mark.parametrize(
    ("uid", "names"),
    [
        ("rlops-serving", ["policy", "version"]),
        ("rlops-policy-health", ["policy", "version"]),
        ("rlops-training", ["policy", "run"]),
        ("rlops-slo", ["policy"]),
    ],
)
def test_label_variables_default_to_all(uid: str, names: list[str]) -> None:
    board = next(b for b in built() if b["uid"] == uid)
    variables = [v for v in board["templating"]["list"] if v["type"] == "query"]
    assert [v["name"] for v in variables] == names
    for v in variables:
        assert (v["includeAll"], v["multi"], v["allValue"]) == (True, True, ".*")
        assert v["datasource"]["uid"] == "${datasource}"
        assert v["query"].startswith("label_values(")


def test_panel_ids_are_unique_and_the_grid_is_24_wide() -> None:
    for b in built():
        ids = [p["id"] for p in b["panels"]]
        assert ids == list(range(1, len(ids) + 1)), b["uid"]
        for p in b["panels"]:
            pos = p["gridPos"]
            assert pos["x"] >= 0, (b["uid"], p.get("title"))
            assert pos["x"] + pos["w"] <= 24, (b["uid"], p.get("title"))
            if p["type"] != "row":
                assert p["description"], (b["uid"], p["title"])


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run make system"
    rules = [
        {"record": f"dashboard:check_{i}", "expr": expr}
        for i, (_uid, _title, expr) in enumerate(all_queries())
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}), encoding="utf-8")
    proc = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_every_metric_a_query_reads_is_exported_or_recorded() -> None:
    known = known_metrics()
    unknown = {
        f"{uid} / {title}: {name}"
        for uid, title, expr in all_queries()
        for name in metric_names(expr)
        if name not in known
    }
    assert unknown == set()


def test_metric_names_finds_selected_metrics_only() -> None:
    expr = (
        'sum by (policy, le) (rate(rlops_x_bucket{le="0.1", job=~"a|b"}[5m])) / ignoring (le) group_left '
        "max(up) * 1e-4 - time() + clamp_min(policy:rec:ratio_rate5m, 0.5) or vector(0)"
    )
    assert metric_names(expr) == {"rlops_x_bucket", "up", "policy:rec:ratio_rate5m"}


def test_alert_dashboard_links_name_a_dashboard_and_its_variables() -> None:
    variables = {b["uid"]: {v["name"] for v in b["templating"]["list"]} for b in built()}
    checked = 0
    for path in sorted((REPO / "alerts" / "rules").glob("*.yaml")):
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                url = (rule.get("annotations") or {}).get("dashboard_url")
                if not url:
                    continue
                match = re.match(r"^/d/([^/?]+)/[^?]*(?:\?(.*))?$", url)
                assert match, f"{path.name} {rule['alert']}: {url}"
                if not match[1].startswith("rlops-"):
                    continue  # e.g. a GPU exporter's own dashboard
                assert match[1] in variables, f"{path.name} {rule['alert']}: no dashboard {match[1]}"
                for param in (match[2] or "").split("&"):
                    if param.startswith("var-"):
                        assert param[4:].split("=")[0] in variables[match[1]], f"{rule['alert']}: {param}"
                checked += 1
    assert checked > 0


def test_slo_budgets_match_the_alerts() -> None:
    text = (REPO / "alerts" / "rules" / "slo.yaml").read_text(encoding="utf-8")
    source = (SOURCES / "rlops_slo.py").read_text(encoding="utf-8")
    # The 1x burn-rate alerts compare the 3-day error ratio with the budget itself.
    availability = re.search(r"job:rlops_serving_errors:ratio_rate3d > ([0-9.]+)", text)
    latency = re.search(r"policy:rlops_latency_slo_misses:ratio_rate3d > ([0-9.]+)", text)
    assert availability
    assert latency
    assert f"AVAILABILITY_BUDGET = {float(availability[1])}" in source
    assert f"LATENCY_BUDGET = {float(latency[1])}" in source


# --- building -----------------------------------------------------------------------------------------


def copy_sources(tmp_path: Path) -> Path:
    out = tmp_path / "dashboards"
    out.mkdir()
    for path in SOURCES.glob("*.py"):
        shutil.copy(path, out / path.name)
    return out


def test_build_writes_the_same_bytes_twice_and_removes_orphans(tmp_path: Path) -> None:
    source = copy_sources(tmp_path)
    first = dashboards.build(source)
    assert sorted(p.name for p in first.written) == sorted(f"{u}.json" for u in UIDS)
    texts = {p.name: p.read_bytes() for p in (source / "build").glob("*.json")}
    orphan = source / "build" / "rlops-gone.json"
    orphan.write_text("{}", encoding="utf-8")
    second = dashboards.build(source)
    assert second.written == []
    assert len(second.unchanged) == len(UIDS)
    assert second.removed == [orphan]
    assert {p.name: p.read_bytes() for p in (source / "build").glob("*.json")} == texts
    assert not list((source / "build").glob(".*"))


def test_a_broken_source_leaves_the_built_files_alone(tmp_path: Path) -> None:
    source = copy_sources(tmp_path)
    dashboards.build(source)
    before = {p.name: p.read_bytes() for p in (source / "build").glob("*.json")}
    (source / "rlops_slo.py").write_text("def dashboard(:\n", encoding="utf-8")
    with pytest.raises(DashboardError, match=r"rlops_slo\.py: cannot be imported: SyntaxError"):
        dashboards.build(source)
    assert {p.name: p.read_bytes() for p in (source / "build").glob("*.json")} == before


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("X = 1\n", r"defines no function dashboard\(\)"),
        ("def dashboard():\n    return {}\n", "returned dict, not a builders.dashboard.Dashboard"),
        (
            "from rlops_stack.dashboards import make_dashboard\n"
            "def dashboard():\n    return make_dashboard('grafana-x', 'T', 'd')\n",
            r"dashboard uid 'grafana-x' must match",
        ),
        (
            "from rlops_stack.dashboards import make_dashboard\n"
            "def dashboard():\n    return make_dashboard('rlops-other', 'T', 'd')\n",
            r"defines the dashboard 'rlops-other'; name the file rlops_other\.py",
        ),
        ("def dashboard():\n    raise RuntimeError('boom')\n", r"dashboard\(\) failed: RuntimeError: boom"),
    ],
)
def test_bad_sources_are_named_with_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "rlops_extra.py").write_text(text, encoding="utf-8")
    with pytest.raises(DashboardError, match=message) as info:
        dashboards.build_all(tmp_path)
    assert "rlops_extra.py" in str(info.value)


def test_two_sources_with_one_title_are_refused(tmp_path: Path) -> None:
    for name in ("rlops_a", "rlops_b"):
        (tmp_path / f"{name}.py").write_text(
            "from rlops_stack.dashboards import make_dashboard\n"
            f"def dashboard():\n    return make_dashboard('{name.replace('_', '-')}', 'Same', 'd')\n",
            encoding="utf-8",
        )
    with pytest.raises(DashboardError, match="both define the dashboard"):
        dashboards.build_all(tmp_path)


def test_load_built_names_a_file_that_is_not_a_dashboard(tmp_path: Path) -> None:
    (tmp_path / "rlops-x.json").write_text(json.dumps({"title": "no uid"}), encoding="utf-8")
    with pytest.raises(DashboardError, match=r"rlops-x\.json: not a Grafana dashboard"):
        dashboards.load_built(tmp_path)
    (tmp_path / "rlops-x.json").write_text("{", encoding="utf-8")
    with pytest.raises(DashboardError, match=r"rlops-x\.json: not readable as JSON"):
        dashboards.load_built(tmp_path)
    with pytest.raises(DashboardError, match="no built dashboards"):
        dashboards.load_built(tmp_path / "empty")


# --- the command ----------------------------------------------------------------------------------------


def test_build_command_check_reports_stale_files(tmp_path: Path) -> None:
    source = copy_sources(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["build", "--check", "--dir", str(source)])
    assert result.exit_code == 1
    assert "is missing" in result.output
    result = runner.invoke(app, ["build", "--dir", str(source)])
    assert result.exit_code == 0, result.output
    assert result.output.count("wrote ") == len(UIDS)
    result = runner.invoke(app, ["build", "--check", "--dir", str(source)])
    assert result.exit_code == 0, result.output
    assert "is up to date" in result.output
    path = source / "build" / "rlops-slo.json"
    path.write_text(path.read_text(encoding="utf-8").replace("SLOs", "SLIs"), encoding="utf-8")
    result = runner.invoke(app, ["build", "--check", "--dir", str(source)])
    assert result.exit_code == 1
    assert "rlops-slo.json differs from a build of rlops_slo.py" in result.output


def test_build_command_without_sources_says_where_it_looked(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["build", "--dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no dashboards folder" in result.output
    assert str(tmp_path) in result.output
