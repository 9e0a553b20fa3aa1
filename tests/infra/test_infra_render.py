"""Every stack rendered into Kubernetes objects: schema-valid, policy-clean, carrying the repository's
alert rules and dashboards unchanged, and differing between stacks only where the stack files do."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import yaml
from rlops_infra import policy, validate
from rlops_infra.files import ROOT, RepoFiles
from rlops_infra.monitoring import ALERTMANAGER_KEY, ALERTMANAGER_SECRET, DASHBOARD_LABEL
from rlops_infra.program import COMPONENT_SECTIONS
from rlops_infra.render import read_stack_file, render, stack_file, with_placeholders

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
    found = policy.all_findings(r, {"release": "kube-prometheus-stack"})
    expected = {"resources", "gpu placement", "ray head", "pinned images", "hardened", "serving probes"}
    assert set(found) == {*expected, "selector labels"}


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
