"""The stack config model: every stack file is valid; bad ones fail before any resource exists, with
messages that name the key and what is accepted."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pulumi
import pytest
from rlops_infra import config as cfg
from rlops_infra import program
from rlops_infra.render import Mocks, run_mocked
from rlops_infra.render import main as render_main

Values = dict[str, Any]


def problems(values: Values, keys: set[str]) -> list[str]:
    try:
        program.plan(values, keys)
    except cfg.ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize("stack", ["dev", "staging", "prod"])
def test_stack_files_are_valid(stack_values, stack: str) -> None:
    values, keys = stack_values(stack)
    p = program.plan(values, keys)
    assert p.config.environment == stack


def _set(section: str, path: str, value: Any) -> Callable[[Values], None]:
    def mutate(values: Values) -> None:
        node = values[f"rlops:{section}"]
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


BAD: list[tuple[str, str, Callable[[Values], None], list[str]]] = [
    (
        "prod",
        "unknown section key",
        _set("serving", "replcas", 3),
        ["rlops:serving.replcas: unknown key", "replicas"],
    ),
    (
        "dev",
        "unknown environment",
        lambda v: v.update({"rlops:environment": "qa"}),
        ["rlops:environment", "'dev'", "'prod'"],
    ),
    (
        "prod",
        "prod with one pod",
        lambda v: v["rlops:serving"].update(autoscaling={"enabled": False}, replicas=1, pdb_min_available=0),
        ["rlops:serving.replicas", "at least 2"],
    ),
    (
        "prod",
        "prod without a PDB",
        _set("serving", "pdb_min_available", 0),
        ["rlops:serving.pdb_min_available", "PodDisruptionBudget"],
    ),
    (
        "prod",
        "pdb blocks drains",
        _set("serving", "pdb_min_available", 3),
        ["pdb_min_available (3)", "fewest pods (3)"],
    ),
    (
        "dev",
        "GPU without GPU nodes",
        _set("serving", "resources.gpus", 1),
        ["rlops:cluster.gpu_node_groups", "rlops:serving.resources.gpus=1"],
    ),
    (
        "prod",
        "more GPUs than a node has",
        _set("training", "jobs.0.resources.gpus", 4),
        ["rlops:training.jobs[0].resources.gpus", "largest GPU node has 1"],
    ),
    (
        "prod",
        "latest image",
        _set("images", "trainer", "ghcr.io/rlops/rlops-trainer:latest"),
        ["rlops:images.trainer", "never 'latest'"],
    ),
    (
        "prod",
        "untagged image",
        _set("images", "server", "ghcr.io/rlops/rlops-server"),
        ["rlops:images.server", "no tag"],
    ),
    (
        "staging",
        "single-node model volume",
        _set("storage", "models.access_mode", "ReadWriteOnce"),
        ["rlops:storage.models.access_mode", "ReadWriteMany"],
    ),
    (
        "prod",
        "bad access mode",
        _set("storage", "data.access_mode", "ReadWriteSome"),
        ["rlops:storage.data.access_mode", "'ReadWriteOnce'", "'ReadWriteMany'"],
    ),
    (
        "prod",
        "steps not ending at 100",
        _set("delivery", "steps", [10, 50]),
        ["rlops:delivery.steps", "end at 100"],
    ),
    (
        "prod",
        "steps not increasing",
        _set("delivery", "steps", [50, 10, 100]),
        ["rlops:delivery.steps", "increasing"],
    ),
    (
        "prod",
        "canary without a champion",
        _set("serving", "previous_version", None),
        ["rlops:serving.previous_version"],
    ),
    (
        "prod",
        "eks without its section",
        _set("cluster", "eks", None),
        ["rlops:cluster", "needs an 'eks' section"],
    ),
    (
        "dev",
        "kubeconfig with eks section",
        _set("cluster", "eks", {"region": "us-west-2"}),
        ["'eks' section applies to provider 'eks' only"],
    ),
    (
        "prod",
        "node group sizes",
        _set("cluster", "gpu_node_groups.0.desired_size", 99),
        ["min_size <= desired_size <= max_size"],
    ),
    (
        "prod",
        "data path escapes",
        _set("training", "jobs.0.data", "datasets/../../etc/passwd"),
        ["rlops:training.jobs[0].data", "leaves its folder"],
    ),
    (
        "prod",
        "unknown algorithm",
        _set("training", "jobs.0.algorithm", "dqn"),
        ["rlops:training.jobs[0].algorithm", "'bc'", "'cql'", "'iql'"],
    ),
    (
        "prod",
        "chart range",
        _set("monitoring", "chart_version", "^88.0.0"),
        ["rlops:monitoring.chart_version"],
    ),
    (
        "prod",
        "receiver without credential",
        _set("alerting", "receivers", [{"name": "pager", "type": "slack"}]),
        ["needs 'secret'"],
    ),
    (
        "prod",
        "prod pages no one",
        _set("alerting", "receivers", [{"name": "pagerduty", "type": "none"}]),
        ["prod pages no one", "'pagerduty'"],
    ),
    (
        "prod",
        "unmapped credential file",
        lambda v: (
            v["rlops:alerting"].update(
                secrets={"slack-webhook-url": "slackWebhookUrl", "actions-token": "actionsToken"}
            ),
            v.pop("rlops:pagerdutyRoutingKey"),
        ),
        ["rlops:alerting.secrets", "pagerduty-routing-key"],
    ),
]


def test_actions_webhook_follows_the_stack_namespace_and_pod_size(stack_values) -> None:
    values, keys = stack_values("staging")
    values["rlops:tenancy"] = {**values["rlops:tenancy"], "namespace": "ml"}
    p = program.plan(values, keys)
    assert p.alertmanager is not None
    (receiver,) = [r for r in p.alertmanager["receivers"] if r["name"] == "rlops-actions"]
    assert receiver["webhook_configs"][0]["url"] == "http://rlops-actions.ml.svc.cluster.local:9095/alerts"
    actions = program.actions_hook(p)
    assert actions is not None
    # staging: one worker on two cores, so scale-up may start a second.
    assert (p.config.serving.workers, p.config.serving.resources.cpu, actions.max_workers) == (1, "2", 2)
    assert actions.token == values[f"rlops:{p.config.alerting.secrets['actions-token']}"]
    # Without Alertmanager nothing posts actions: no webhook.
    values["rlops:monitoring"] = {**values["rlops:monitoring"], "enabled": False}
    values["rlops:delivery"] = {**values["rlops:delivery"], "enabled": False}
    values["rlops:serving"] = {**values["rlops:serving"], "autoscaling": {"enabled": False}}
    assert program.actions_hook(program.plan(values, keys)) is None


@pytest.mark.parametrize(("stack", "what", "mutate", "expected"), BAD, ids=[b[1] for b in BAD])
def test_bad_config_names_key_and_accepted(stack_values, stack, what, mutate, expected) -> None:
    values, keys = stack_values(stack)
    values = copy.deepcopy(values)
    mutate(values)
    found = problems(values, keys)
    text = "\n".join(found)
    assert found, f"{what}: accepted"
    for piece in expected:
        assert piece in text, f"{what}: {piece!r} not in\n{text}"


def test_every_problem_is_listed_at_once(stack_values) -> None:
    values, keys = stack_values("prod")
    values = copy.deepcopy(values)
    values["rlops:serving"].update(autoscaling={"enabled": False}, replicas=1, pdb_min_available=0)
    values["rlops:serving"]["resources"]["gpus"] = 5
    found = problems(values, keys)
    assert any("rlops:serving.replicas" in p for p in found)
    assert any("rlops:serving.pdb_min_available" in p for p in found)
    assert any("rlops:serving.resources.gpus" in p for p in found)


def test_plaintext_secret_is_refused(stack_values) -> None:
    values, keys = stack_values("prod")
    keys = keys - {"rlops:pagerdutyRoutingKey"}
    found = problems(values, keys)
    assert any(
        p.startswith("rlops:pagerdutyRoutingKey: holds a plaintext value")
        and "--secret pagerdutyRoutingKey" in p
        for p in found
    ), found


def test_missing_secret_says_how_to_set_it(stack_values) -> None:
    values, keys = stack_values("prod")
    del values["rlops:grafanaAdminPassword"]
    found = problems(values, keys)
    assert any(
        "rlops:grafanaAdminPassword: missing secret" in p and "pulumi config set --secret" in p for p in found
    )


def test_unknown_top_level_key_is_refused(stack_values) -> None:
    values, keys = stack_values("dev")
    values["rlops:slackUrl"] = "https://hooks.example/abc"
    found = problems(values, keys)
    assert any(p.startswith("rlops:slackUrl: unknown key") for p in found), found


def test_structured_config_as_pulumi_passes_it(stack_values) -> None:
    """Pulumi hands objects to the program as JSON text; the model reads them the same."""
    values, keys = stack_values("prod")
    as_text = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    assert program.plan(as_text, keys).config == program.plan(values, keys).config


def test_program_reads_pulumi_environment(monkeypatch, stack_values) -> None:
    """Under the Pulumi CLI config and secret keys arrive in the environment."""
    values, keys = stack_values("prod")
    env = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(env))
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", json.dumps(sorted(keys - {"rlops:actionsToken"})))
    read, secret_keys = program.read_pulumi_config()
    found = problems(read, secret_keys)
    assert found == [
        "rlops:actionsToken: holds a plaintext value; secrets are set with "
        "`pulumi config set --secret actionsToken <value>` "
        "(referenced by rlops:alerting.secrets.actions-token)"
    ]


def test_bad_config_creates_nothing(stack_values) -> None:
    """The program validates before any resource exists: a bad stack registers no resource at all."""
    values, keys = stack_values("prod")
    values = copy.deepcopy(values)
    values["rlops:serving"]["replicas"] = 0

    mocks = Mocks()
    with pytest.raises(pulumi.RunError, match=r"rlops:serving.replicas"):
        run_mocked(program.main, "prod", values, keys, mocks)
    assert mocks.recorded == []


def test_render_command_reports_bad_stack_file(tmp_path, capsys) -> None:
    (tmp_path / "Pulumi.broken.yaml").write_text(
        "config:\n  rlops:environment: prod\n  rlops:cluster:\n    provider: gke\n", encoding="utf-8"
    )
    assert render_main(["--stack", "broken", "--stacks-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "rlops:cluster.provider" in err
    assert "'eks'" in err
    assert "'kubeconfig'" in err
    assert "rlops:images: required key is missing" in err
