"""The reward feedback service and the scheduled loop: their objects, their config checks, and their
rendered command lines run on this machine against the layout serving writes."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import localrun
import pytest
import yaml
from rlops_contracts.metrics import JOB_FEEDBACK, PORT_FEEDBACK, PORT_TS_INFERENCE
from rlops_delivery import config as loop_config
from rlops_delivery import loop as delivery_loop
from rlops_infra import config as cfg
from rlops_infra import delivery, feedback, loop, policy, program, validate
from rlops_infra.files import ROOT, RepoFiles
from rlops_infra.k8s import DATA_MOUNT, MODELS_MOUNT, REGISTRY_DIR
from rlops_infra.render import Recorded, Render, read_stack_file, run_mocked, stack_file

STACKS = ("dev", "staging", "prod")
FILES = RepoFiles.load()
SERVER = "ghcr.io/rlops/rlops-server:0.1.0"
TRAINER = "ghcr.io/rlops/rlops-trainer:0.1.0"
PROMETHEUS = "http://kps-prometheus.monitoring.svc:9090"


def mocked(fn) -> list[Recorded]:
    return run_mocked(fn, "unit", {}, set())


def by_kind(recorded: list[Recorded]) -> dict[str, list[Recorded]]:
    out: dict[str, list[Recorded]] = {}
    for r in recorded:
        out.setdefault(r.inputs.get("kind", r.type), []).append(r)
    return out


def _feedback_args(**over: Any) -> feedback.FeedbackArgs:
    base: dict[str, Any] = dict(
        feedback=cfg.Feedback(replicas=2),
        namespace="rlops",
        server_image=SERVER,
        data_claim="rlops-data",
        logs="logs",
        token="t0ken-value",
        client_namespaces=("product",),
        monitoring_namespace="monitoring",
        monitor_labels={"release": "kps"},
    )
    return feedback.FeedbackArgs(**{**base, **over})


# --- the feedback service ----------------------------------------------------------------------------


def test_feedback_service_objects() -> None:
    rec = by_kind(mocked(lambda: feedback.Feedback("feedback", _feedback_args())))
    assert set(rec) == {
        "Secret",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "rlops:infra:Feedback",
    }
    (secret,) = rec["Secret"]
    assert secret.secret, "the token Secret is not a Pulumi secret"
    assert secret.inputs["stringData"] == {feedback.TOKEN_KEY: "t0ken-value"}
    (dep,) = [r.inputs for r in rec["Deployment"]]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == SERVER
    words, flags = localrun.split(container["command"])
    assert words == ["rlops", "feedback", "serve"]
    assert flags == {
        "--dir": f"{DATA_MOUNT}/logs",
        "--host": "0.0.0.0",
        "--port": str(PORT_FEEDBACK),
        "--token-file": f"{feedback.TOKEN_DIR}/{feedback.TOKEN_KEY}",
    }
    # The token arrives as a file from the Secret, never as an environment variable.
    assert "t0ken-value" not in json.dumps(dep)
    assert all("valueFrom" not in e for e in container["env"])
    (token_volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert token_volume["secret"]["secretName"] == secret.inputs["metadata"]["name"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": "rlops-data", "readOnly": False}
    assert pod["topologySpreadConstraints"]
    (svc,) = [r.inputs for r in rec["Service"]]
    assert svc["spec"]["ports"] == [{"name": "http", "port": PORT_FEEDBACK, "targetPort": "http"}]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    (monitor,) = [r.inputs for r in rec["ServiceMonitor"]]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert policy.scrape_job(endpoint) == JOB_FEEDBACK
    assert endpoint["port"] == "http"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (np,) = [r.inputs for r in rec["NetworkPolicy"]]
    (rule,) = np["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": PORT_FEEDBACK}]
    assert rule["from"] == [
        {"podSelector": {}},
        {
            "namespaceSelector": {
                "matchExpressions": [
                    {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["product"]}
                ]
            }
        },
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
    ]
    (pdb,) = [r.inputs for r in rec["PodDisruptionBudget"]]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": dep["spec"]["selector"]}


def test_one_feedback_pod_has_no_disruption_budget_and_no_monitor_without_prometheus() -> None:
    args = _feedback_args(
        feedback=cfg.Feedback(replicas=1),
        monitor_labels=None,
        monitoring_namespace=None,
        client_namespaces=(),
    )
    rec = by_kind(mocked(lambda: feedback.Feedback("feedback", args)))
    assert "PodDisruptionBudget" not in rec
    assert "ServiceMonitor" not in rec
    (np,) = [r.inputs for r in rec["NetworkPolicy"]]
    assert np["spec"]["ingress"][0]["from"] == [{"podSelector": {}}]
    (dep,) = [r.inputs for r in rec["Deployment"]]
    assert "topologySpreadConstraints" not in dep["spec"]["template"]["spec"]


@pytest.mark.parametrize("stack", STACKS)
def test_feedback_is_scraped_as_rlops_feedback_and_admits_the_inference_clients(
    renders: dict[str, Render], stack: str
) -> None:
    r = renders[stack]
    values, _ = read_stack_file(stack_file(stack))
    monitor = r.find("ServiceMonitor", feedback.NAME)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert policy.scrape_job(endpoint) == JOB_FEEDBACK == "rlops-feedback"
    service = r.find("Service", feedback.NAME)
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    dep = r.find("Deployment", feedback.NAME)
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert dep["spec"]["replicas"] == values["rlops:feedback"]["replicas"]
    has_pdb = any(
        o["kind"] == "PodDisruptionBudget" and o["metadata"]["name"] == feedback.NAME for o in r.objects()
    )
    assert has_pdb == (values["rlops:feedback"]["replicas"] >= 2)
    # Whoever may call inference may post the rewards of its decisions; Prometheus scrapes.
    serving_policy = next(
        o
        for o in r.objects()
        if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].startswith("torchserve")
    )
    inference_peers = [
        peer
        for rule in serving_policy["spec"]["ingress"]
        if {"protocol": "TCP", "port": PORT_TS_INFERENCE} in rule["ports"]
        for peer in rule["from"]
    ]
    (rule,) = r.find("NetworkPolicy", feedback.NAME)["spec"]["ingress"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    assert rule["from"] == [*inference_peers, monitoring]


def test_the_feedback_token_is_a_pulumi_secret(renders: dict[str, Render]) -> None:
    r = renders["prod"]
    (token,) = [
        rec for rec in r.kubernetes() if rec.inputs["kind"] == "Secret" and rec.name == "feedback-secret"
    ]
    assert token.secret
    value = token.inputs["stringData"][feedback.TOKEN_KEY]
    assert value == "placeholder-feedbackToken"
    assert not [rec.name for rec in r.kubernetes() if rec is not token and value in json.dumps(rec.inputs)]


@pytest.mark.parametrize("stack", STACKS)
def test_serving_feedback_gate_and_loop_share_one_log_root(renders: dict[str, Render], stack: str) -> None:
    """Serving writes decisions/, the feedback service rewards/ under one root; the OPE gate and the
    loop read that root, as `rlops feedback join` reads the local .rlops/logs."""
    r = renders[stack]
    values, _ = read_stack_file(stack_file(stack))
    root = f"{DATA_MOUNT}/{values['rlops:storage'].get('logs', 'logs')}"
    work = next(o for o in r.objects() if o["kind"] in ("Deployment", "Rollout") and "torchserve-" in str(o))
    (torchserve,) = [c for c in work["spec"]["template"]["spec"]["containers"] if c["name"] == "torchserve"]
    env = {e["name"]: e.get("value") for e in torchserve["env"]}
    assert env["RLOPS_DECISION_LOG_DIR"] == root
    _, fb = localrun.split(
        r.find("Deployment", feedback.NAME)["spec"]["template"]["spec"]["containers"][0]["command"]
    )
    assert fb["--dir"] == root
    _, lp = localrun.split(_loop_container(r)["command"])
    assert lp["--logs"] == root
    ope = r.find("AnalysisTemplate", delivery.OPE_TEMPLATE)
    logs_arg = next(a["value"] for a in ope["spec"]["args"] if a["name"] == "logs")
    assert f"{DATA_MOUNT}/{logs_arg}" == root


def test_the_rendered_feedback_command_runs_and_the_join_reads_both_logs(
    renders: dict[str, Render], tmp_path: Path
) -> None:
    """``rlops feedback serve`` as rendered: the token is required, rewards land in rewards/ of the log root,
    beside decisions/ written where serving's decision log goes, and the reward join reads both."""
    from rlops_server.decision_log import DECISIONS_STREAM, DecisionLog
    from rlops_server.join import join

    r = renders["dev"]
    (container,) = r.find("Deployment", feedback.NAME)["spec"]["template"]["spec"]["containers"]
    _, flags = localrun.split(container["command"])
    token = "s3cret-feedback"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    port = localrun.free_port()
    root = Path(localrun.local_path(tmp_path, str(flags["--dir"])))
    moved = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--dir": str(root),
        "--token-file": str(tmp_path / "token"),
    }
    # What the handler does with the rendered RLOPS_DECISION_LOG_DIR (the same root).
    decisions = DecisionLog(root, stream=DECISIONS_STREAM)
    for step in range(3):
        decisions.write(
            {
                "decision_id": f"e1-{step}", "time": time.time(), "policy": "cartpole", "version": 1,
                "episode_id": "e1", "step": step, "observation": [0.1 * step] * 4, "action": step % 2,
                "propensity": 0.5, "temperature": 1.0, "epsilon": 0.0, "action_mask": None, "fallback": False,
            }
        )  # fmt: skip
    assert decisions.close()
    rewards = {
        "rewards": [
            {"decision_id": f"e1-{step}", "reward": 1.0, "terminated": step == 2,
             "next_observation": [0.5] * 4 if step == 2 else None, "policy": "cartpole", "version": 1}
            for step in range(3)
        ]
    }  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with localrun.serving(localrun.here(container["command"], moved), f"{base}/healthz"):
        assert localrun.post_json(f"{base}/rewards", rewards, None)[0] == 401
        assert localrun.post_json(f"{base}/rewards", rewards, "wrong")[0] == 401
        assert localrun.post_json(f"{base}/rewards", rewards, token) == (202, {"accepted": 3})
        metrics = localrun.get_text(f"{base}/metrics")
        assert 'rlops_rewards_received_total{policy="cartpole",version="1"} 3.0' in metrics
    # Stopped with SIGTERM, as the kubelet stops a pod: the queued rewards were written and sealed.
    assert sorted(p.parent.parent.name for p in root.rglob("*.jsonl")) == ["decisions", "rewards"]
    stats = join(root, root, tmp_path / "joined.parquet", policy="cartpole", env_id="CartPole-v1", obs_dim=4,
                 n_actions=2)  # fmt: skip
    assert (stats.decisions, stats.rewards, stats.transitions, stats.episodes) == (3, 3, 3, 1)


# --- the loop -----------------------------------------------------------------------------------------


def _loop_args(**over: Any) -> loop.LoopArgs:
    assert FILES.analysis is not None
    base: dict[str, Any] = dict(
        loop=cfg.Loop(
            enabled=True,
            schedule="15 */4 * * *",
            algorithm="iql",
            train={"steps": 500, "hidden": [64, 64]},
            min_new_transitions=200,
            reward_wait="2m",
            gate=cfg.LoopGate(margin=0.1, bootstrap=50),
            backoff_limit=2,
            starting_deadline_seconds=300,
            successful_jobs_history_limit=2,
            failed_jobs_history_limit=5,
        ),
        policy="cartpole",
        namespace="rlops",
        trainer_image=TRAINER,
        data_claim="rlops-data",
        models_claim="rlops-models",
        logs="logs",
        analysis=FILES.analysis.text,
        prometheus_url=PROMETHEUS,
    )
    return loop.LoopArgs(**{**base, **over})


def _loop_container(r: Render) -> dict[str, Any]:
    job = r.find("CronJob", loop.NAME)
    (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return container


def test_loop_cronjob_runs_one_iteration_at_a_time() -> None:
    rec = by_kind(mocked(lambda: loop.Loop("loop", _loop_args())))
    (job,) = [r.inputs for r in rec["CronJob"]]
    spec = job["spec"]
    assert spec["schedule"] == "15 */4 * * *"
    assert spec["timeZone"] == "Etc/UTC"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] == 300
    assert (spec["successfulJobsHistoryLimit"], spec["failedJobsHistoryLimit"]) == (2, 5)
    job_spec = spec["jobTemplate"]["spec"]
    assert job_spec["backoffLimit"] == 2
    (rule,) = job_spec["podFailurePolicy"]["rules"]
    assert rule == {
        "action": "FailJob",
        "onExitCodes": {"containerName": "loop", "operator": "In", "values": [2]},
    }
    pod = job_spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never", "podFailurePolicy needs restartPolicy Never"
    assert "tolerations" not in pod
    (container,) = pod["containers"]
    assert container["name"] == rule["onExitCodes"]["containerName"]
    assert container["image"] == TRAINER
    assert container["command"] == [
        "rlops", "loop", "run-once",
        "--config", "/etc/rlops-loop/loop.yaml",
        "--logs", f"{DATA_MOUNT}/logs",
        "--registry", REGISTRY_DIR,
        "--state-dir", f"{DATA_MOUNT}/loop",
        "--analysis", "/etc/rlops-loop/analysis.yaml",
        "--canary", "none",
        "--prometheus-url", PROMETHEUS,
        "--json",
    ]  # fmt: skip
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[DATA_MOUNT]["readOnly"] is False
    assert mounts[MODELS_MOUNT]["readOnly"] is False, "the loop publishes into the registry"
    assert mounts[loop.CONFIG_DIR]["readOnly"] is True
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"rlops-data", "rlops-models"}
    (cm,) = [r.inputs for r in rec["ConfigMap"]]
    (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["data"][loop.ANALYSIS_FILE] == (ROOT / "alerts/canary/analysis.yaml").read_text(
        encoding="utf-8"
    )
    parsed = loop_config.parse_config(yaml.safe_load(cm["data"][loop.CONFIG_FILE]), "loop.yaml")
    assert (parsed.policy, parsed.algorithm, parsed.min_new_transitions) == ("cartpole", "iql", 200)
    assert parsed.train == {"steps": 500, "hidden": [64, 64]}
    assert parsed.reward_wait_s == 120.0
    assert (parsed.gate.margin, parsed.gate.n_bootstrap) == (0.1, 50)
    # Unset keys keep the loop's own defaults.
    assert parsed.max_decision_files == loop_config.LoopConfig("x").max_decision_files
    assert parsed.gate.confidence == loop_config.OPESettings().confidence


def test_loop_on_a_gpu_goes_to_gpu_nodes_and_without_prometheus_names_none() -> None:
    gpu = cfg.Loop(enabled=True, resources=cfg.Resources(cpu="8", memory="32Gi", gpus=1))
    rec = by_kind(mocked(lambda: loop.Loop("loop", _loop_args(loop=gpu, prometheus_url=None))))
    (job,) = [r.inputs for r in rec["CronJob"]]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--prometheus-url" not in pod["containers"][0]["command"]
    (cm,) = [r.inputs for r in rec["ConfigMap"]]
    assert yaml.safe_load(cm["data"][loop.CONFIG_FILE]) == {"policy": "cartpole"}


@pytest.mark.parametrize("stack", STACKS)
def test_rendered_loop_follows_the_stack(renders: dict[str, Render], stack: str) -> None:
    r = renders[stack]
    values, _ = read_stack_file(stack_file(stack))
    section = values["rlops:loop"]
    job = r.find("CronJob", loop.NAME)
    assert job["spec"]["schedule"] == section["schedule"]
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    container = _loop_container(r)
    assert container["image"] == values["rlops:images"]["trainer"]
    _, flags = localrun.split(container["command"])
    assert flags["--prometheus-url"] == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    assert flags["--registry"] == REGISTRY_DIR
    text = r.find("ConfigMap", loop.NAME)["data"][loop.CONFIG_FILE]
    doc = yaml.safe_load(text)
    assert doc["policy"] == values["rlops:serving"]["policy"]
    assert {k: v for k, v in doc.items() if k != "policy"} == {
        k: section[k] for k in loop.CONFIG_KEYS if k in section
    }
    loop_config.parse_config(doc, "loop.yaml")


def test_every_loop_config_key_of_the_stack_is_one_the_loop_takes() -> None:
    """The stack's loop keys and the loop config's keys are the same sets, both ways: a key renamed in
    rlops_delivery.loop fails here, not on a cluster."""
    every = cfg.Loop(
        enabled=True,
        algorithm="cql",
        train={"steps": 10},
        min_new_transitions=5,
        reward_wait="30s",
        max_decision_files=3,
        gate=cfg.LoopGate(
            estimator="fqe", margin=0.5, relative=True, against="upper", gamma=0.9, confidence=0.9,
            bootstrap=20, fqe_steps=30, fqe_models=2, seed=4,
        ),
    )  # fmt: skip
    doc = loop.loop_config(every, "cartpole")
    assert set(doc) == {"policy", *loop.CONFIG_KEYS}
    assert set(doc["gate"]) == set(cfg.LoopGate.model_fields)
    parsed = loop_config.parse_config(doc, "loop.yaml")
    assert (parsed.gate.n_bootstrap, parsed.gate.fqe_models, parsed.gate.against) == (20, 2, "upper")
    assert (parsed.max_decision_files, parsed.reward_wait_s) == (3, 30.0)

    def accepted(raw: dict[str, Any]) -> set[str]:
        with pytest.raises(loop_config.LoopError) as caught:
            loop_config.parse_config({"policy": "cartpole", **raw}, "loop.yaml")
        (listed,) = re.findall(r"accepted: (.*)$", str(caught.value))
        return set(listed.split(", "))

    # The local canary's settings are the one exception: the cluster's canary is Argo Rollouts.
    assert accepted({"zz": 1}) == {"policy", "canary", *loop.CONFIG_KEYS}
    assert accepted({"gate": {"zz": 1}}) == set(cfg.LoopGate.model_fields)


def test_the_rendered_loop_command_runs_and_waits_without_new_data(
    renders: dict[str, Render], tmp_path: Path
) -> None:
    """``rlops loop run-once`` as rendered takes every flag and the generated config; with no served logs
    yet it records nothing and exits 0 (the next scheduled run looks again)."""
    r = renders["dev"]
    container = _loop_container(r)
    _, flags = localrun.split(container["command"])
    cm = r.find("ConfigMap", loop.NAME)["data"]
    etc = Path(localrun.local_path(tmp_path, loop.CONFIG_DIR))
    etc.mkdir(parents=True)
    for name, text in cm.items():
        (etc / name).write_text(text, encoding="utf-8")
    paths = ("--config", "--logs", "--registry", "--state-dir", "--analysis")
    moved = {flag: localrun.local_path(tmp_path, str(flags[flag])) for flag in paths}
    Path(moved["--logs"]).mkdir(parents=True)
    done = subprocess.run(
        localrun.here(container["command"], moved), capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout[done.stdout.index("{") :])
    assert answer["outcome"] == "waiting"
    assert not Path(moved["--state-dir"]).exists(), "waiting records nothing"


def test_schema_and_policy_checks_reach_the_cronjob_and_the_feedback_service(
    renders: dict[str, Render],
) -> None:
    """The render-wide checks see the loop's pod inside the CronJob and the feedback Deployment: breaking
    them is found, naming the object."""
    r = copy.deepcopy(renders["prod"])
    for rec in r.resources:
        obj = rec.inputs
        name = obj.get("metadata", {}).get("name")
        if obj.get("kind") == "CronJob" and name == loop.NAME:
            pod = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            del pod["tolerations"]
            pod["containers"][0]["image"] = "ghcr.io/rlops/rlops-trainer:latest"
            pod["containers"][0]["securityContext"]["runAsNonRoot"] = False
            del pod["containers"][0]["resources"]["requests"]
        if obj.get("kind") == "Deployment" and name == feedback.NAME:
            del obj["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
        if obj.get("kind") == "ServiceMonitor" and name == feedback.NAME:
            obj["spec"]["endpoints"][0]["relabelings"][0]["replacement"] = "rlops-feedback-svc"
    found = policy.all_findings(r, {"release": "kube-prometheus-stack"})
    cron = f"CronJob/rlops/{loop.NAME}"
    assert any(cron in f and "does not tolerate" in f for f in found["gpu placement"])
    assert any(cron in f for f in found["pinned images"])
    assert any(cron in f and "runAsNonRoot" in f for f in found["hardened"])
    assert any(cron in f and "no requests" in f for f in found["resources"])
    assert found["serving probes"] == [
        f"Deployment/rlops/{feedback.NAME} container feedback: no livenessProbe"
    ]
    assert any("rlops-feedback-svc" in f for f in found["monitor jobs"])
    job = copy.deepcopy(renders["prod"].find("CronJob", loop.NAME))
    job["spec"]["startingDeadlineSeconds"] = "ten minutes"
    job["spec"]["jobTemplate"]["spec"]["backofLimit"] = 1
    errors = json.dumps(validate.validate_all([job], None))
    assert "startingDeadlineSeconds" in errors
    assert "backofLimit" in errors


# --- config ------------------------------------------------------------------------------------------


def _problems(values: dict[str, Any], keys: set[str]) -> list[str]:
    try:
        program.plan(values, keys)
    except cfg.ConfigError as exc:
        return exc.problems
    return []


BAD: list[tuple[str, tuple[str, str, Any], list[str]]] = [
    ("hour out of range", ("loop", "schedule", "0 25 * * *"), ["rlops:loop.schedule", "hour '25'", "0-23"]),
    ("four cron fields", ("loop", "schedule", "0 * * *"), ["rlops:loop.schedule", "five fields"]),
    ("backwards range", ("loop", "schedule", "0 9-5 * * *"), ["rlops:loop.schedule", "backwards"]),
    ("bad month name", ("loop", "schedule", "0 0 1 JANUARY *"), ["rlops:loop.schedule", "month"]),
    ("unknown algorithm", ("loop", "algorithm", "ppo"), ["rlops:loop.algorithm", "'cql'", "'iql'"]),
    ("unknown train field", ("loop", "train", {"stepz": 10}), ["rlops:loop", "unknown field 'stepz'"]),
    ("bad train value", ("loop", "train", {"steps": "many"}), ["rlops:loop", "'many'", "steps"]),
    ("negative margin", ("loop", "gate", {"margin": -1}), ["rlops:loop.gate.margin", "greater than"]),
    ("unknown gate key", ("loop", "gate", {"margn": 1}), ["rlops:loop.gate.margn: unknown key", "margin"]),
    ("unknown estimator", ("loop", "gate", {"estimator": "magic"}), ["rlops:loop", "estimator 'magic'"]),
    ("bad reward wait", ("loop", "reward_wait", "soon"), ["rlops:loop.reward_wait"]),
    ("local canary", ("loop", "canary", {"steps": "10,100"}), ["rlops:loop", "Argo", "rlops:delivery"]),
    ("unknown loop key", ("loop", "scheduel", "@daily"), ["rlops:loop.scheduel: unknown key", "schedule"]),
    (
        "loop GPU without GPU nodes",
        ("loop", "resources", {"cpu": "2", "memory": "4Gi", "gpus": 1}),
        ["rlops:cluster.gpu_node_groups", "rlops:loop.resources.gpus=1"],
    ),
    ("loop without feedback", ("feedback", "enabled", False), ["rlops:loop.enabled", "feedback"]),
    (
        "feedback on a GPU",
        ("feedback", "resources", {"cpu": "1", "memory": "1Gi", "gpus": 1}),
        ["rlops:feedback.resources", "no GPU"],
    ),
    ("no feedback pods", ("feedback", "replicas", 0), ["rlops:feedback.replicas"]),
    ("log root escapes", ("storage", "logs", "logs/../../etc"), ["rlops:storage.logs", "leaves its folder"]),
]


@pytest.mark.parametrize(("what", "change", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_feedback_and_loop_config_is_refused_naming_the_key(
    stack_values, what: str, change: tuple[str, str, Any], expected: list[str]
) -> None:
    values, keys = stack_values("dev")
    section, key, value = change
    values[f"rlops:{section}"] = {**values[f"rlops:{section}"], key: value}
    text = "\n".join(_problems(values, keys))
    assert text, f"{what}: accepted"
    for piece in expected:
        assert piece in text, f"{what}: {piece!r} not in\n{text}"


@pytest.mark.parametrize("schedule", ["*/30 * * * *", "0 3 * * MON-FRI", "5,35 0-6/2 1 JAN,jul ?", "@hourly"])
def test_cron_schedules_kubernetes_takes_are_accepted(schedule: str) -> None:
    assert cfg.check_cron(schedule) == schedule


def test_the_feedback_token_must_be_a_pulumi_secret(stack_values) -> None:
    values, keys = stack_values("prod")
    plaintext = _problems(values, keys - {"rlops:feedbackToken"})
    assert plaintext == [
        "rlops:feedbackToken: holds a plaintext value; secrets are set with "
        "`pulumi config set --secret feedbackToken <value>` (referenced by rlops:feedback.token)"
    ]
    del values["rlops:feedbackToken"]
    (missing,) = _problems(values, keys)
    assert missing.startswith("rlops:feedbackToken: missing secret (referenced by rlops:feedback.token)")
    # Without the service there is no token to set.
    values["rlops:feedback"] = {"enabled": False}
    values["rlops:loop"] = {**values["rlops:loop"], "enabled": False}
    p = program.plan(values, keys - {"rlops:feedbackToken"})
    assert "feedbackToken" not in p.secrets


# --- the loop in the cluster's layout, end to end ------------------------------------------------------

EPSILON = 0.4


def _poor_champion(registry: Path, work: Path) -> None:
    """Champion version 1 always pushes left: logs served by it leave room to learn better."""
    from rlops_delivery.drills import write_constant_policy_dir
    from rlops_trainer.algos.bc import BCConfig, train
    from rlops_trainer.collect import collect
    from rlops_trainer.export import write_policy_dir
    from rlops_trainer.registry import Registry
    from rlops_trainer.training import RunOptions

    data = collect("CartPole-v1", "random", 30, seed=0, progress=False)
    result = train(BCConfig(steps=30, batch_size=64), data, RunOptions(progress=False))
    base = write_policy_dir(result, data, work / "base", "cartpole")
    reg = Registry(registry)
    gate = {"promote": False, "incumbent_version": None, "reason": "the first version"}
    reg.publish(write_constant_policy_dir(base, work / "left", 0), "cartpole", gate=gate)
    reg.promote("cartpole", 1, require_gate=False, force_reason="a poor first champion")


def _serve_episodes(root: Path, registry: Path, feedback_url: str, token: str, episodes: int) -> None:
    """CartPole driven by the champion with exploration: decisions written as serving writes them (into the
    rendered decision-log root), rewards posted to the feedback service."""
    import gymnasium as gym
    import numpy as np
    import torch
    from rlops_server.decision_log import DECISIONS_STREAM, DecisionLog
    from rlops_trainer.registry import Registry

    module, _ = Registry(registry).load("cartpole", 1)
    decisions = DecisionLog(root, stream=DECISIONS_STREAM)
    rng = np.random.default_rng(0)
    env = gym.make("CartPole-v1")
    for e in range(episodes):
        obs, _ = env.reset(seed=e)
        rewards = []
        for step in range(500):
            with torch.no_grad():
                probs = module.action_probs(torch.as_tensor(obs, dtype=torch.float32)[None], 0.0, EPSILON)[0]
            p = probs.double().numpy()
            action = int(rng.choice(len(p), p=p / p.sum()))
            decision_id = f"e{e}-{step}"
            decisions.write(
                {
                    "decision_id": decision_id, "time": time.time(), "policy": "cartpole", "version": 1,
                    "episode_id": f"e{e}", "step": step, "observation": [float(x) for x in obs],
                    "action": action, "propensity": float(p[action]), "temperature": 0.0, "epsilon": EPSILON,
                    "action_mask": None, "fallback": False,
                }
            )  # fmt: skip
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(
                {
                    "decision_id": decision_id, "reward": float(reward), "terminated": bool(terminated),
                    "truncated": bool(truncated), "next_observation": [float(x) for x in obs],
                    "policy": "cartpole", "version": 1,
                }
            )  # fmt: skip
            if terminated or truncated:
                break
        status, answer = localrun.post_json(f"{feedback_url}/rewards", {"rewards": rewards}, token)
        assert status == 202, answer
    assert decisions.close()


@pytest.mark.slow
def test_the_cluster_loop_publishes_a_candidate_and_hands_its_canary_off(
    renders: dict[str, Render], tmp_path: Path
) -> None:
    """What infra/README.md says the scheduled loop does on a cluster, shown here with the rendered command
    lines and paths: rewards through the feedback service, decisions where serving writes them, then
    ``rlops loop run-once`` joins, retrains, gates and publishes the candidate, and ends the iteration there
    (``--canary none``: the canary is Argo's) with exit 0; the next run, with no new data, waits."""
    from rlops_server.decision_log import DECISIONS_STREAM, complete_files
    from rlops_trainer.registry import Registry

    r = renders["dev"]
    feedback_container = r.find("Deployment", feedback.NAME)["spec"]["template"]["spec"]["containers"][0]
    _, fb = localrun.split(feedback_container["command"])
    root = Path(localrun.local_path(tmp_path, str(fb["--dir"])))
    registry = Path(localrun.local_path(tmp_path, REGISTRY_DIR))
    _poor_champion(registry, tmp_path / "work")
    token = "s3cret-feedback"
    (tmp_path / "token").write_text(token, encoding="utf-8")
    port = localrun.free_port()
    moved = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--dir": str(root),
        "--token-file": str(tmp_path / "token"),
    }
    url = f"http://127.0.0.1:{port}"
    with localrun.serving(localrun.here(feedback_container["command"], moved), f"{url}/healthz"):
        _serve_episodes(root, registry, url, token, episodes=80)

    container = _loop_container(r)
    _, flags = localrun.split(container["command"])
    paths = ("--config", "--logs", "--registry", "--state-dir", "--analysis")
    here = {flag: localrun.local_path(tmp_path, str(flags[flag])) for flag in paths}
    assert Path(here["--logs"]) == root
    assert Path(here["--registry"]) == registry
    # The rendered analysis file; a config from the same generator, sized for two cores.
    Path(here["--analysis"]).parent.mkdir(parents=True)
    Path(here["--analysis"]).write_text(r.find("ConfigMap", loop.NAME)["data"][loop.ANALYSIS_FILE], "utf-8")
    small = cfg.Loop(
        enabled=True,
        algorithm="cql",
        train={"steps": 1500, "alpha": 0.1, "hidden": [64, 64], "seed": 0},
        min_new_transitions=300,
        reward_wait="1ms",
        gate=cfg.LoopGate(estimator="fqe", fqe_steps=1500, fqe_models=1, bootstrap=100),
    )
    Path(here["--config"]).write_text(loop.config_text(small, "cartpole"), encoding="utf-8")
    argv = localrun.here(container["command"], here)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    first = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no TorchServe" not in first.stdout + first.stderr
    answer = json.loads(first.stdout[first.stdout.index("{\n") :])
    assert (answer["stage"], answer["outcome"], answer["version"]) == (
        delivery_loop.DONE,
        delivery_loop.HANDED_OFF,
        2,
    )
    assert "its canary is left to the platform" in answer["reason"]
    reg = Registry(registry)
    assert reg.versions("cartpole") == [1, 2]
    assert reg.aliases("cartpole") == {"champion": 1, "candidate": 2}
    card = reg.card("cartpole", 2)
    assert card["gate"]["promote"] is True
    assert card["lineage"][0]["loop"]["logs"] == str(root.resolve())
    state_file = Path(here["--state-dir"]) / "cartpole" / delivery_loop.STATE_FILE
    state = json.loads(state_file.read_text(encoding="utf-8"))
    (it,) = state["iterations"]
    assert it == answer
    decision_files = sorted(str(p.resolve()) for p in complete_files(root / DECISIONS_STREAM))
    assert decision_files
    assert sorted(state["consumed"]) == sorted(it["new_files"]) == decision_files

    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout[again.stdout.index("{\n") :])["outcome"] == "waiting"
    assert reg.versions("cartpole") == [1, 2]
    assert reg.aliases("cartpole") == {"champion": 1, "candidate": 2}
    assert json.loads(state_file.read_text(encoding="utf-8")) == state
