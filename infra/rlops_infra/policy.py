"""Policy checks over a rendered stack: what every object must satisfy before it reaches a cluster.

Each check returns findings, one line each, naming the object and the container; no finding is a pass.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Any

from rlops_contracts.metrics import JOB_ACTIONS, JOB_FEEDBACK, JOB_TORCHSERVE, JOB_TRAINER

from rlops_infra import ray
from rlops_infra.config import CHART_VERSION, check_image
from rlops_infra.k8s import GPU_NODE_LABEL, GPU_RESOURCE
from rlops_infra.render import Render

MONITOR_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
SCRAPE_JOBS = (JOB_TORCHSERVE, JOB_FEEDBACK, JOB_TRAINER, JOB_ACTIONS, ray.JOB)
"""The scrape job names the rules and dashboards select on (rlops_contracts.metrics), and Ray's own."""


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata", {})
    return f"{obj['kind']}/{meta.get('namespace', '-')}/{meta.get('name')}"


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec an object will create: (where, spec)."""
    name, kind, spec = _name(obj), obj["kind"], obj.get("spec") or {}
    if kind in ("Deployment", "Job", "Rollout", "StatefulSet", "DaemonSet"):
        yield name, spec["template"]["spec"]
    elif kind == "CronJob":
        yield name, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("RayCluster", "RayJob"):
        cluster = spec if kind == "RayCluster" else spec.get("rayClusterSpec", {})
        yield f"{name} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{name} workers {group['groupName']}", group["template"]["spec"]
        if "submitterPodTemplate" in spec:
            yield f"{name} submitter", spec["submitterPodTemplate"]["spec"]
    elif kind == "AnalysisTemplate":
        for metric in spec.get("metrics", []):
            job = metric.get("provider", {}).get("job")
            if job:
                yield f"{name} metric {metric['name']}", job["spec"]["template"]["spec"]


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _gpus(container: dict[str, Any]) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    return int(limits.get(GPU_RESOURCE, 0))


def resources_everywhere(r: Render) -> list[str]:
    out = []
    for obj in r.objects():
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                res = c.get("resources") or {}
                for part in ("requests", "limits"):
                    missing = {"cpu", "memory"} - set(res.get(part) or {})
                    if missing:
                        out.append(f"{where} container {c['name']}: no {part} for {sorted(missing)}")
        if obj["kind"] == "RayCluster" and obj["spec"].get("enableInTreeAutoscaling"):
            res = obj["spec"].get("autoscalerOptions", {}).get("resources", {})
            if not res.get("requests") or not res.get("limits"):
                out.append(f"{_name(obj)} autoscaler: no requests/limits")
    for rel in r.releases():
        for path, res in _release_resources(rel.inputs.get("values") or {}):
            if not res.get("requests") or not res.get("limits"):
                out.append(f"release {rel.inputs['name']} {path}: resources without requests and limits")
    return out


def _release_resources(values: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(values, dict):
        for k, v in values.items():
            if k == "volumeClaimTemplate":
                continue
            if k == "resources" and isinstance(v, dict):
                yield f"{path}.resources", v
            else:
                yield from _release_resources(v, f"{path}.{k}")


def gpu_placement(r: Render) -> list[str]:
    """GPU pods tolerate the GPU taint and select GPU nodes; CPU pods do neither."""
    out = []
    for obj in r.objects():
        for where, pod in pod_specs(obj):
            gpus = sum(_gpus(c) for c in containers(pod))
            tolerates = any(t.get("key") == GPU_RESOURCE for t in pod.get("tolerations", []))
            selects = (pod.get("nodeSelector") or {}).get(GPU_NODE_LABEL) == "true"
            if gpus and not (tolerates and selects):
                out.append(
                    f"{where}: asks for {gpus} GPU(s) but does not tolerate the taint and select GPU nodes"
                )
            if not gpus and (tolerates or selects):
                out.append(f"{where}: asks for no GPU but tolerates the GPU taint or selects GPU nodes")
    return out


def ray_head(r: Render) -> list[str]:
    out = []
    for obj in r.objects():
        if obj["kind"] not in ("RayCluster", "RayJob"):
            continue
        cluster = obj["spec"] if obj["kind"] == "RayCluster" else obj["spec"]["rayClusterSpec"]
        head = cluster["headGroupSpec"]
        if head.get("rayStartParams", {}).get("num-cpus") != "0":
            out.append(f"{_name(obj)}: the Ray head must not schedule work (rayStartParams num-cpus '0')")
        if any(_gpus(c) for c in containers(head["template"]["spec"])):
            out.append(f"{_name(obj)}: the Ray head asks for a GPU")
    return out


def pinned_images(r: Render) -> list[str]:
    out = []
    for obj in r.objects():
        for where, pod in pod_specs(obj):
            for c in containers(pod):
                try:
                    check_image(c.get("image", ""))
                except ValueError as exc:
                    out.append(f"{where} container {c['name']}: {exc}")
    for rel in r.releases():
        if not re.fullmatch(CHART_VERSION, str(rel.inputs.get("version", ""))):
            out.append(
                f"release {rel.inputs.get('name')}: chart version {rel.inputs.get('version')!r} is not pinned"
            )
    return out


def hardened(r: Render) -> list[str]:
    out = []
    for obj in r.objects():
        for where, pod in pod_specs(obj):
            if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
                out.append(f"{where}: pod securityContext.runAsNonRoot is not true")
            for c in containers(pod):
                sc = c.get("securityContext") or {}
                wanted = {
                    "runAsNonRoot": True,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                }
                for key, value in wanted.items():
                    if sc.get(key) is not value:
                        out.append(f"{where} container {c['name']}: securityContext.{key} must be {value}")
                if "ALL" not in (sc.get("capabilities") or {}).get("drop", []):
                    out.append(f"{where} container {c['name']}: capabilities must drop ALL")
                if sc.get("privileged"):
                    out.append(f"{where} container {c['name']}: privileged")
    return out


def serving_probes(r: Render) -> list[str]:
    out = []
    for obj in r.objects():
        if obj["kind"] not in ("Deployment", "Rollout"):
            continue
        for where, pod in pod_specs(obj):
            for c in pod["containers"]:
                for probe in ("readinessProbe", "livenessProbe"):
                    if probe not in c:
                        out.append(f"{where} container {c['name']}: no {probe}")
    return out


def selector_labels(r: Render, labels: dict[str, str]) -> list[str]:
    out = []
    for obj in r.objects():
        if obj["kind"] in MONITOR_KINDS:
            have = obj["metadata"].get("labels") or {}
            if any(have.get(k) != v for k, v in labels.items()):
                out.append(f"{_name(obj)}: missing the Prometheus selector labels {labels}")
    return out


def scrape_job(endpoint: dict[str, Any]) -> str | None:
    """The job name a monitor endpoint's relabelings set (the last literal replacement of ``job``)."""
    job = None
    for rule in endpoint.get("relabelings") or []:
        if (
            rule.get("targetLabel") == "job"
            and rule.get("action", "replace").lower() == "replace"
            and not rule.get("sourceLabels")
        ):
            job = rule.get("replacement")
    return job


def monitor_endpoints(r: Render) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, endpoint) for every ServiceMonitor and PodMonitor endpoint."""
    for obj in r.objects():
        if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
            spec = obj.get("spec") or {}
            for i, ep in enumerate(spec.get("endpoints") or spec.get("podMetricsEndpoints") or []):
                yield f"{_name(obj)} endpoint {i} (port {ep.get('port')})", ep


def monitor_jobs(r: Render, jobs: Collection[str] = SCRAPE_JOBS) -> list[str]:
    """Every monitor endpoint names its scrape job, one of ``jobs``: without it the operator names the job
    after the Service or the monitor, and no rule selecting ``job="torchserve"`` would ever match."""
    out = []
    for where, ep in monitor_endpoints(r):
        job = scrape_job(ep)
        if job is None:
            out.append(f"{where}: no relabeling names the job (action replace, targetLabel job)")
        elif job not in jobs:
            out.append(f"{where}: job {job!r} is none of {', '.join(jobs)}")
    return out


def all_findings(r: Render, monitor_labels: dict[str, str] | None) -> dict[str, list[str]]:
    checks = {
        "resources": resources_everywhere(r),
        "gpu placement": gpu_placement(r),
        "ray head": ray_head(r),
        "pinned images": pinned_images(r),
        "hardened": hardened(r),
        "serving probes": serving_probes(r),
        "monitor jobs": monitor_jobs(r),
    }
    if monitor_labels is not None:
        checks["selector labels"] = selector_labels(r, monitor_labels)
    return {k: v for k, v in checks.items() if v}
