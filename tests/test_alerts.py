"""The alerts as the cluster and the local stack load them: promtool and amtool checks, the promtool unit
tests, and the completeness check (every alert has its tests, runbook, labels and annotations), which is
itself shown to fail on broken copies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from rlops_stack import local
from rlops_stack.rules import load_alerts, problems

ALERTS = Path(__file__).resolve().parents[1] / "alerts"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: run 'make system' "
            f"(Debian/Ubuntu: apt-get install {local.APT_PACKAGES[name]})"
        )
    return path


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_promtool_check_rules() -> None:
    files = sorted(str(p) for p in (ALERTS / "rules").glob("*.yaml"))
    assert files
    result = run(tool("promtool"), "check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests() -> None:
    files = sorted(str(p) for p in (ALERTS / "tests").glob("*.yaml"))
    assert files
    result = run(tool("promtool"), "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_amtool_check_config() -> None:
    result = run(tool("amtool"), "check-config", str(ALERTS / "alertmanager.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["severity=critical", "policy=cartpole"], "pagerduty"),
        (["severity=warning", "policy=cartpole"], "slack-tickets"),
        (["severity=info", "policy=cartpole"], "null"),
        (
            ["severity=warning", "action=scale_up", "policy=cartpole", "version=2"],
            "rlops-actions,slack-tickets",
        ),
        (["severity=critical", "action=rollback", "policy=cartpole", "version=2"], "rlops-actions,pagerduty"),
    ],
)
def test_routes_by_severity_and_action(labels: list[str], receivers: str) -> None:
    config = f"--config.file={ALERTS / 'alertmanager.yaml'}"
    result = run(tool("amtool"), "config", "routes", "test", config, "alertname=RlopsX", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


def test_critical_inhibits_warnings_of_its_policy_but_never_an_action() -> None:
    [rule] = yaml.safe_load((ALERTS / "alertmanager.yaml").read_text())["inhibit_rules"]
    assert rule["source_matchers"] == ['severity="critical"', 'policy=~".+"']
    assert rule["target_matchers"] == ['severity="warning"', 'action=""']
    assert rule["equal"] == ["policy"]


def test_every_alert_has_tests_runbook_labels_and_annotations() -> None:
    assert len(load_alerts(ALERTS)) >= 20
    assert problems(ALERTS) == []


def test_the_seed_actions_are_labelled_for_the_webhook() -> None:
    by_name = {a.name: a for a in load_alerts(ALERTS)}
    assert by_name["RlopsServingLatencyHigh"].labels["action"] == "scale_up"
    assert by_name["RlopsPolicyRewardBelowBaseline"].labels["action"] == "rollback"
    assert "> 0.1" in by_name["RlopsServingLatencyHigh"].expr
    assert "0.1 * abs(" in by_name["RlopsPolicyRewardBelowBaseline"].expr
    assert sorted(a.name for a in by_name.values() if "action" in a.labels) == [
        "RlopsPolicyRewardBelowBaseline",
        "RlopsServingLatencyHigh",
    ]


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    copy = tmp_path / "alerts"
    shutil.copytree(ALERTS, copy, ignore=shutil.ignore_patterns("canary"))
    return copy


def _edit_yaml(path: Path, edit) -> None:
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _rule(data: dict, name: str) -> dict:
    return next(r for g in data["groups"] for r in g["rules"] if r.get("alert") == name)


def test_completeness_fails_without_a_runbook(broken: Path) -> None:
    (broken / "runbooks" / "RlopsServingLatencyHigh.md").unlink()
    assert problems(broken) == ["RlopsServingLatencyHigh: no runbook runbooks/RlopsServingLatencyHigh.md"]


def test_completeness_fails_on_a_runbook_without_its_sections(broken: Path) -> None:
    path = broken / "runbooks" / "RlopsGpuMemoryNearlyFull.md"
    path.write_text(path.read_text().replace("## When to escalate", "## Escalation"))
    assert problems(broken) == [
        "runbooks/RlopsGpuMemoryNearlyFull.md: section '## When to escalate' is missing"
    ]
    text = (
        path.read_text().split("## What to do")[0]
        + "## What to do\n\nAsk someone.\n\n## When to escalate\n\nNo.\n"
    )
    path.write_text(text)
    assert problems(broken) == ["runbooks/RlopsGpuMemoryNearlyFull.md: 'What to do' names no rlops command"]


def test_completeness_fails_on_a_missing_annotation_or_label(broken: Path) -> None:
    def edit(data: dict) -> None:
        rule = _rule(data, "RlopsServingErrorRatioHigh")
        del rule["annotations"]["dashboard_url"]
        rule["labels"]["severity"] = "page"
        rule["annotations"]["description"] = "errors are high"

    _edit_yaml(broken / "rules" / "serving.yaml", edit)
    found = problems(broken)
    assert "serving.yaml: RlopsServingErrorRatioHigh: annotation dashboard_url is missing" in found
    assert (
        "serving.yaml: RlopsServingErrorRatioHigh: label severity must be one of critical, warning, info"
        in found
    )
    assert "serving.yaml: RlopsServingErrorRatioHigh: the description must show the value ($value)" in found


def test_completeness_fails_on_an_alert_without_tests(broken: Path) -> None:
    def edit(data: dict) -> None:
        new = dict(_rule(data, "RlopsServingErrorRatioHigh"), alert="RlopsServingSomethingNew")
        new["annotations"] = dict(
            new["annotations"],
            runbook_url="https://github.com/rlops/rlops/blob/main/alerts/runbooks/RlopsServingSomethingNew.md",
        )
        data["groups"][0]["rules"].append(new)

    _edit_yaml(broken / "rules" / "serving.yaml", edit)
    shutil.copy(
        broken / "runbooks" / "RlopsServingErrorRatioHigh.md",
        broken / "runbooks" / "RlopsServingSomethingNew.md",
    )
    path = broken / "runbooks" / "RlopsServingSomethingNew.md"
    path.write_text(path.read_text().replace("# RlopsServingErrorRatioHigh", "# RlopsServingSomethingNew", 1))
    assert problems(broken) == [
        "RlopsServingSomethingNew: no promtool test where it fires",
        "RlopsServingSomethingNew: no healthy case (a test where it never fires)",
    ]


def test_completeness_fails_without_the_evaluation_just_before_for_or_the_healthy_case(broken: Path) -> None:
    def edit(data: dict) -> None:
        for test in data["tests"]:
            test["alert_rule_test"] = [
                case
                for case in test["alert_rule_test"]
                if not (case["alertname"] == "RlopsTrainingStalled" and not case["exp_alerts"])
            ]

    _edit_yaml(broken / "tests" / "training.yaml", edit)
    assert problems(broken) == [
        "RlopsTrainingStalled: no test of the evaluation just before it fires "
        "(same test, one interval earlier)",
        "RlopsTrainingStalled: no healthy case (a test where it never fires)",
    ]


def test_completeness_fails_when_a_test_expects_fewer_annotations(broken: Path) -> None:
    def edit(data: dict) -> None:
        for test in data["tests"]:
            for case in test["alert_rule_test"]:
                if case["alertname"] == "RlopsGpuMemoryNearlyFull" and case["exp_alerts"]:
                    del case["exp_alerts"][0]["exp_annotations"]["runbook_url"]
                    del case["exp_alerts"][0]["exp_labels"]["severity"]

    _edit_yaml(broken / "tests" / "gpu.yaml", edit)
    assert problems(broken) == [
        "gpu.yaml test 'GPU memory nearly full': RlopsGpuMemoryNearlyFull at 12m "
        "must expect severity=warning",
        "gpu.yaml test 'GPU memory nearly full': RlopsGpuMemoryNearlyFull at 12m must expect exactly the "
        "annotations dashboard_url, description, runbook_url, summary",
    ]


def test_local_configs_pass_the_same_checks(tmp_path: Path) -> None:
    """The local stack's generated copies (test profile timing, local webhook) are valid too."""
    settings = local.StackSettings(alert_for=2, group_wait=1, group_interval=2, repeat_interval=60)
    text, silent, token_file = local.render_alertmanager(
        ALERTS / "alertmanager.yaml", settings, tmp_path / "secrets"
    )
    (tmp_path / "alertmanager.yml").write_text(text)
    result = run(tool("amtool"), "check-config", str(tmp_path / "alertmanager.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(text)
    hook = next(r for r in config["receivers"] if r["name"] == local.ACTIONS_RECEIVER)["webhook_configs"][0]
    assert hook["url"] == "http://127.0.0.1:9095/alerts"
    assert hook["http_config"]["authorization"]["credentials_file"] == str(token_file)
    assert token_file == tmp_path / "secrets" / "rlops-alertmanager" / "actions-token"
    assert set(silent) == {"pagerduty", "slack-tickets"}
    assert config["route"]["group_wait"] == "1s"
    assert config["route"]["routes"][0]["group_wait"] == "1s"
    rules = tmp_path / "rules.yaml"
    rules.write_text(local.render_rules(ALERTS / "rules" / "serving.yaml", alert_for=2))
    assert {
        r["for"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if "alert" in r
    } == {"2s"}
    result = run(tool("promtool"), "check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
