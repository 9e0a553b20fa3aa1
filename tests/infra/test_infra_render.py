"""Every stack rendered into Kubernetes objects: schema-valid, policy-clean, carrying the repository's
alert rules and dashboards unchanged, and differing between stacks only where the stack files do."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import localrun
import pytest
import yaml
from rlops_contracts.metrics import JOB_ACTIONS, JOB_TRAINER, PORT_TS_MANAGEMENT
from rlops_infra import monitoring, policy, serving, validate
from rlops_infra.files import ROOT, RepoFiles
from rlops_infra.k8s import MODELS_MOUNT, REGISTRY_DIR
from rlops_infra.monitoring import ALERTMANAGER_KEY, ALERTMANAGER_SECRET, DASHBOARD_LABEL
from rlops_infra.program import COMPONENT_SECTIONS
from rlops_infra.render import Render, read_stack_file, render, stack_file, with_placeholders

STACKS = ("dev", "staging", "prod")

FILES = RepoFiles.load()


def _sorted(objects: list[dict]) -> list[str]:
    return sorted(json.dumps(o, sort_keys=True) for o in objects)


@pytest.mark.parametrize("stack", STACKS)
def test_core_objects_match_the_kubernetes_schema(renders, stack) -> None:
    core = [o for o in renders[stack].objects() if validate.is_core(o)]
    assert core
    assert validate.validate_all(core, None) == {}


@pytest.mark.parametrize("stack", STACKS)
def test_custom_resources_match_the_pinned_crds(renders, stack) -> None:
    directory = validate.schemas_dir()
    if directory is None:
        pytest.skip(
            "pinned CRDs not found: set RLOPS_SCHEMAS_DIR "
            "(`python -m rlops_infra.crds --out DIR` in infra/ downloads them)"
        )
    custom = [o for o in renders[stack].objects() if not validate.is_core(o)]
    kinds = {o["kind"] for o in custom}
    assert {
        "RayCluster",
        "RayJob",
        "PrometheusRule",
        "ServiceMonitor",
        "PodMonitor",
        "Rollout",
        "AnalysisTemplate",
    } <= kinds
    assert validate.validate_all(custom, directory) == {}


def test_schema_checks_catch_unknown_fields(renders) -> None:
    r = renders["prod"]
    deployment_like = copy.deepcopy(r.find("Job", "cql-cartpole"))
    deployment_like["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert "resourcez" in json.dumps(validate.validate_all([deployment_like], None))
    directory = validate.schemas_dir()
    if directory is not None:
        cluster = copy.deepcopy(r.find("RayCluster", "rlops"))
        cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
        assert "rayStartParam" in json.dumps(validate.validate_all([cluster], directory))


@pytest.mark.parametrize("stack", STACKS)
def test_policies_hold(renders, stack) -> None:
    assert policy.all_findings(renders[stack], {"release": "kube-prometheus-stack"}) == {}


def test_policies_can_fail(renders) -> None:
    r = copy.deepcopy(renders["prod"])
    for rec in r.resources:
        obj = rec.inputs
        if obj.get("kind") == "RayCluster":
            head = obj["spec"]["headGroupSpec"]
            head["rayStartParams"]["num-cpus"] = "4"
            head["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
        if obj.get("kind") == "Job" and obj["metadata"]["name"] == "cql-cartpole":
            pod = obj["spec"]["template"]["spec"]
            del pod["tolerations"]
            pod["containers"][0]["image"] = "ghcr.io/rlops/rlops-trainer:latest"
            pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
            del pod["containers"][0]["resources"]["requests"]
        if obj.get("kind") == "Rollout":
            del obj["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        if obj.get("kind") == "ServiceMonitor":
            obj["metadata"]["labels"].pop("release")
            obj["spec"]["endpoints"][0].pop("relabelings")
    found = policy.all_findings(r, {"release": "kube-prometheus-stack"})
    expected = {"resources", "gpu placement", "ray head", "pinned images", "hardened", "serving probes"}
    assert set(found) == {*expected, "selector labels", "monitor jobs"}


@pytest.mark.parametrize("stack", STACKS)
def test_prometheus_rules_equal_the_alert_files(renders, stack) -> None:
    rules = [o for o in renders[stack].objects() if o["kind"] == "PrometheusRule"]
    assert len(rules) == len(FILES.rule_files) > 0
    by_source = {o["metadata"]["annotations"]["rlops.dev/source"]: o for o in rules}
    for rule_file in FILES.rule_files:
        on_disk = yaml.safe_load((ROOT / rule_file.path).read_text(encoding="utf-8"))
        assert by_source[str(rule_file.path)]["spec"] == {"groups": on_disk["groups"]}


@pytest.mark.parametrize("stack", STACKS)
def test_dashboard_configmaps_equal_the_built_json(renders, stack) -> None:
    maps = [
        o
        for o in renders[stack].objects()
        if o["kind"] == "ConfigMap" and DASHBOARD_LABEL in o["metadata"]["labels"]
    ]
    built = sorted((ROOT / "dashboards" / "build").glob("*.json"))
    assert len(maps) == len(built) > 0
    by_source = {o["metadata"]["annotations"]["rlops.dev/source"]: o for o in maps}
    for path in built:
        cm = by_source[str(path.relative_to(ROOT))]
        assert cm["metadata"]["labels"][DASHBOARD_LABEL] == "1"
        (text,) = cm["data"].values()
        assert text == path.read_text(encoding="utf-8")
        assert len(text.encode()) < 1_000_000, "a ConfigMap holds at most 1 MiB"


@pytest.mark.parametrize("stack", STACKS)
def test_alertmanager_config_is_valid(renders, stack, tmp_path) -> None:
    secret = renders[stack].find("Secret", ALERTMANAGER_SECRET)
    text = secret["stringData"][ALERTMANAGER_KEY]
    rendered = yaml.safe_load(text)
    on_disk = yaml.safe_load((ROOT / FILES.alertmanager_path).read_text(encoding="utf-8"))
    assert rendered["route"] == on_disk["route"]
    assert rendered.get("inhibit_rules") == on_disk.get("inhibit_rules")
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (make system installs prometheus-alertmanager)")
    (tmp_path / "alertmanager.yaml").write_text(text, encoding="utf-8")
    done = subprocess.run(
        [amtool, "check-config", str(tmp_path / "alertmanager.yaml")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_secrets_stay_secret(renders) -> None:
    r = renders["prod"]
    for rec in r.kubernetes():
        if rec.inputs["kind"] == "Secret":
            assert rec.secret, f"Secret {rec.inputs['metadata']['name']} is not a Pulumi secret"
        elif rec.inputs["kind"] != "Secret":
            assert "placeholder-" not in json.dumps(rec.inputs), rec.name
    for rel in r.releases():
        assert "placeholder-" not in json.dumps(rel.inputs)


def test_render_does_not_depend_on_the_stack_name(stack_values) -> None:
    """Only config decides what is created: prod's config rendered under another stack name is the same."""
    values, keys = stack_values("prod")
    as_prod = render("prod", values, keys, FILES)
    as_other = render("elsewhere", values, keys, FILES)

    def rows(r, stack: str) -> list[str]:
        # The EKS cluster's name and the cloud tags carry the stack name by design (one cluster per stack).
        texts = (json.dumps([x.type, x.name, x.inputs], sort_keys=True) for x in r.resources)
        return sorted(
            t.replace(f'"rlops.dev/stack": "{stack}"', '"rlops.dev/stack": "<stack>"')
            .replace(f"rlops-{stack}", "rlops-<stack>")
            .replace(f"urn:pulumi:{stack}::", "urn:pulumi:<stack>::")
            for t in texts
        )

    assert _sorted(as_prod.objects()) == _sorted(as_other.objects())
    assert rows(as_prod, "prod") == rows(as_other, "elsewhere")


def test_dev_and_prod_differ_only_where_their_files_do(renders) -> None:
    dev_values, _ = read_stack_file(stack_file("dev"))
    prod_values, _ = read_stack_file(stack_file("prod"))
    differing = {
        k.removeprefix("rlops:")
        for k in dev_values.keys() | prod_values.keys()
        if dev_values.get(k) != prod_values.get(k)
    }

    def by_component(stack: str) -> dict[str, list]:
        out: dict[str, list] = {}
        for rec in renders[stack].resources:
            out.setdefault(rec.component, []).append(
                json.dumps([rec.type, rec.name, rec.inputs], sort_keys=True)
            )
        return {k: sorted(v) for k, v in out.items()}

    dev, prod = by_component("dev"), by_component("prod")
    for component, sections in COMPONENT_SECTIONS.items():
        if differing.isdisjoint(sections):
            assert dev.get(component) == prod.get(component), f"{component} differs but {sections} are equal"
    # And where they are equal section by section, the objects are: the tenancy namespace is one example.
    assert renders["dev"].find("Namespace", "rlops") == renders["prod"].find("Namespace", "rlops")


def test_placeholder_secrets_are_marked_secret(stack_values) -> None:
    values, keys = read_stack_file(stack_file("prod"))
    filled, filled_keys = with_placeholders(values, keys)
    added = set(filled) - set(values)
    assert added
    assert added <= filled_keys


def _serving_pod(r: Render) -> dict:
    (work,) = [
        o
        for o in r.objects()
        if o["kind"] in ("Deployment", "Rollout") and o["metadata"]["name"].startswith("torchserve-")
    ]
    return work["spec"]["template"]


def _alertmanager_config(r: Render) -> dict:
    return yaml.safe_load(r.find("Secret", ALERTMANAGER_SECRET)["stringData"][ALERTMANAGER_KEY])


def _actions_hook(config: dict) -> dict:
    (receiver,) = [rec for rec in config["receivers"] if rec["name"] == JOB_ACTIONS]
    (hook,) = receiver["webhook_configs"]
    return hook


@pytest.mark.parametrize("stack", STACKS)
def test_actions_webhook_runs_beside_torchserve(renders, stack) -> None:
    r = renders[stack]
    values, _ = read_stack_file(stack_file(stack))
    pod = _serving_pod(r)["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    hook = containers["actions"]
    assert hook["image"] == values["rlops:images"]["server"]
    assert hook["command"][:3] == ["rlops", "stack", "webhook"]
    flags = dict(zip(hook["command"][3::2], hook["command"][4::2], strict=True))
    # TorchServe listens for management on loopback only, with token authorization off in the cluster.
    (config,) = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    text = r.find("ConfigMap", config)["data"]["config.properties"]
    props = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert (
        props["management_address"] == flags["--management-url"] == f"http://127.0.0.1:{PORT_TS_MANAGEMENT}"
    )
    assert props["disable_token_authorization"] == "true"
    assert "--management-token-file" not in flags
    assert flags["--host"] == "0.0.0.0"
    assert flags["--registry"] == REGISTRY_DIR
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert hook[probe]["httpGet"] == {"path": "/healthz", "port": "actions"}
    # Rollback rewrites the registry's aliases: the model volume is writable for the webhook only.
    (volume,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert volume["persistentVolumeClaim"]["readOnly"] is False
    models = {c: [m for m in containers[c]["volumeMounts"] if m["name"] == "models"] for c in containers}
    assert models["torchserve"] == [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}]
    assert models["actions"] == [{"name": "models", "mountPath": MODELS_MOUNT, "readOnly": False}]
    assert REGISTRY_DIR.startswith(MODELS_MOUNT + "/")
    (record,) = [m for m in hook["volumeMounts"] if flags["--record"].startswith(m["mountPath"] + "/")]
    assert record["readOnly"] is False
    # The token Alertmanager sends, from the same Pulumi secret as the file Alertmanager reads.
    token_path = flags["--token-file"]
    (token_mount,) = [m for m in hook["volumeMounts"] if token_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod["volumes"] if v["name"] == token_mount["name"]]
    secret = r.find("Secret", volume["secret"]["secretName"])
    key = token_path.removeprefix(token_mount["mountPath"] + "/")
    token_file = monitoring.actions_token_file(_alertmanager_config(r))
    assert token_file is not None
    credentials = r.find("Secret", monitoring.SECRETS_NAME)["stringData"]
    assert secret["stringData"][key] == credentials[token_file]


@pytest.mark.parametrize("stack", STACKS)
def test_alertmanager_posts_actions_to_the_webhook_service(renders, stack) -> None:
    r = renders[stack]
    hook = _actions_hook(_alertmanager_config(r))
    # The URL alerts/alertmanager.yaml names is the one deployed: every stack runs in namespace rlops.
    assert hook["url"] == _actions_hook(FILES.alertmanager)["url"]
    url = urlparse(hook["url"])
    name, namespace = url.hostname.split(".")[:2]
    service = r.find("Service", name)
    assert service["metadata"]["namespace"] == namespace
    assert url.hostname == f"{name}.{namespace}.svc.cluster.local"
    assert url.path == "/alerts"
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    template = _serving_pod(r)
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    (actions,) = [c for c in template["spec"]["containers"] if c["name"] == "actions"]
    assert port["targetPort"] in {p["name"] for p in actions["ports"]}
    assert (
        str(url.port) == dict(zip(actions["command"][3::2], actions["command"][4::2], strict=True))["--port"]
    )
    # Alertmanager reads the token from the Secret the chart mounts, and the policy lets it through.
    credentials = hook["http_config"]["authorization"]["credentials_file"]
    assert credentials.startswith(monitoring.SECRETS_DIR)
    assert (
        credentials.removeprefix(monitoring.SECRETS_DIR)
        in r.find("Secret", monitoring.SECRETS_NAME)["stringData"]
    )
    values = r.release("kube-prometheus-stack").inputs["values"]
    assert monitoring.SECRETS_NAME in values["alertmanager"]["alertmanagerSpec"]["secrets"]
    admitted = [
        rule
        for o in r.objects()
        if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == namespace
        for rule in o["spec"]["ingress"]
        if any(p["port"] == url.port for p in rule["ports"])
    ]
    assert [rule["from"] for rule in admitted] == [
        [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    ]


@pytest.mark.parametrize("stack", STACKS)
def test_monitors_scrape_the_jobs_the_rules_select(renders, stack) -> None:
    r = renders[stack]
    jobs = {policy.scrape_job(ep) for _, ep in policy.monitor_endpoints(r)}
    exprs = " ".join(
        str(rule.get("expr", "")) for f in FILES.rule_files for group in f.groups for rule in group["rules"]
    )
    selected = set(re.findall(r'\bjob\s*=\s*"([^"]+)"', exprs))
    assert selected
    assert selected <= jobs
    monitor = r.find("ServiceMonitor", serving.ACTIONS_SERVICE)
    (endpoint,) = monitor["spec"]["endpoints"]
    assert policy.scrape_job(endpoint) == JOB_ACTIONS
    service = r.find("Service", serving.ACTIONS_SERVICE)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    trainer = r.find("PodMonitor", JOB_TRAINER)
    (endpoint,) = trainer["spec"]["podMetricsEndpoints"]
    assert policy.scrape_job(endpoint) == JOB_TRAINER
    selector = trainer["spec"]["selector"]["matchLabels"]
    pods = [spec for _, spec in _trainer_pods(r)]
    assert len(pods) == len(read_stack_file(stack_file(stack))[0]["rlops:training"]["jobs"])
    for labels, spec in _trainer_pods(r):
        assert selector.items() <= labels.items()
        ports = {p["name"] for p in spec["containers"][0].get("ports", [])}
        assert endpoint["port"] in ports


def _trainer_pods(r: Render) -> list[tuple[dict, dict]]:
    """(labels, spec) of the pods whose driver serves training metrics: a Job's pod, a RayJob's head."""
    out = []
    for o in r.objects():
        if o["kind"] == "Job" and o["metadata"]["labels"].get("app.kubernetes.io/name") == "training":
            template = o["spec"]["template"]
        elif o["kind"] == "RayJob":
            template = o["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        else:
            continue
        out.append((template.get("metadata", {}).get("labels", {}), template["spec"]))
    return out


def test_the_rendered_webhook_command_runs(renders, tmp_path: Path) -> None:
    """The sidecar's command line, as rendered, is one ``rlops stack webhook`` takes and acts on; only its
    addresses and paths move to this machine (nothing answers on the management port here)."""
    (hook,) = [c for c in _serving_pod(renders["dev"])["spec"]["containers"] if c["name"] == "actions"]
    _, flags = localrun.split(hook["command"])
    port = localrun.free_port()
    token = "s3cret"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    record = str(flags["--record"]).replace("$(POD_NAME)", "torchserve-cartpole-0")
    moved = {
        "--host": "127.0.0.1",
        "--port": str(port),
        "--token-file": str(tmp_path / "token"),
        "--registry": localrun.local_path(tmp_path, str(flags["--registry"])),
        "--management-url": f"http://127.0.0.1:{localrun.free_port()}",
        "--record": localrun.local_path(tmp_path, record),
    }
    base = f"http://127.0.0.1:{port}"
    with localrun.serving(localrun.here(hook["command"], moved), f"{base}/healthz"):
        alert = {
            "status": "firing",
            "labels": {"alertname": "RlopsServingLatencyHigh", "action": "scale_up", "policy": "cartpole",
                       "version": "2"},
            "annotations": {"summary": "p99 above 100 ms"},
            "startsAt": "2025-01-01T00:00:00Z",
            "fingerprint": "f",
        }  # fmt: skip
        payload = {"version": "4", "status": "firing", "alerts": [alert]}
        assert localrun.post_json(f"{base}/alerts", payload, None)[0] == 401
        status, answer = localrun.post_json(f"{base}/alerts", payload, token)
        assert status == 200
        (result,) = answer["results"]
        assert (result["action"], result["outcome"]) == ("scale_up", "failed")
        assert "cannot be reached" in result["message"]
        lines = Path(moved["--record"]).read_text(encoding="utf-8").splitlines()
        assert [json.loads(line)["outcome"] for line in lines] == ["failed"]
        metrics = localrun.get_text(f"{base}/metrics")
        assert 'rlops_alert_actions_total{action="scale_up",outcome="failed"} 1.0' in metrics
