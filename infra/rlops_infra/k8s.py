"""Kubernetes object helpers shared by the components: labels, pod hardening, resources, GPU placement,
and :func:`apply`, which turns a manifest (a plain dict, exactly what ``kubectl`` would read) into a
Pulumi resource. Components build manifests with small pure functions, so what they deploy can be read,
rendered and checked without a cluster.
"""

from __future__ import annotations

import re
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

PART_OF = "rlops"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"
"""Set on GPU nodes (by the node group here, by GPU feature discovery elsewhere); the NVIDIA device
plugin's chart schedules on it by default."""
GPU_TAINT = {"key": GPU_RESOURCE, "value": "true", "effect": "NoSchedule"}
NODE_GROUP_LABEL = "rlops.dev/node-group"
RUN_AS = 10001
"""The uid and gid of the ``rlops`` user in both images (apps/*/Dockerfile)."""

DATA_MOUNT = "/mnt/data"
MODELS_MOUNT = "/mnt/models"
REGISTRY_DIR = f"{MODELS_MOUNT}/registry"
MODEL_STORE_DIR = f"{MODELS_MOUNT}/store"


def labels(component: str, **extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": component,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "pulumi",
        **extra,
    }


def selector(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": component, "app.kubernetes.io/part-of": PART_OF}


def metadata(name: str, namespace: str | None, component: str, **extra_labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels(component, **extra_labels)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    """Requests equal to limits: a pod gets what it asked for and nothing it did not."""
    spec: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        spec[GPU_RESOURCE] = str(gpus)
    return {"requests": dict(spec), "limits": dict(spec)}


def gpu_placement(gpus: int) -> dict[str, Any]:
    """Pod spec fields that put a GPU pod on a GPU node; none for CPU pods: they never tolerate the taint."""
    if not gpus:
        return {}
    return {
        "nodeSelector": {GPU_NODE_LABEL: "true"},
        "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
    }


def scratch_volume(name: str, size: str = "1Gi") -> dict[str, Any]:
    return {"name": name, "emptyDir": {"sizeLimit": size}}


def pvc_volume(name: str, claim: str, read_only: bool = False) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def mount(name: str, path: str, read_only: bool = False) -> dict[str, Any]:
    return {"name": name, "mountPath": path, "readOnly": read_only}


def cpu_cores(quantity: str) -> float:
    """Cores in a CPU quantity ("2" → 2.0, "500m" → 0.5)."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def http_probe(path: str, period: int, failures: int, port: str = "http") -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def tcp_ports(*ports: int) -> list[dict[str, Any]]:
    """NetworkPolicy ports."""
    return [{"protocol": "TCP", "port": p} for p in ports]


def from_namespace(name: str) -> dict[str, Any]:
    """A NetworkPolicy peer: every pod of one namespace."""
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def from_namespaces(names: list[str]) -> dict[str, Any]:
    """A NetworkPolicy peer: every pod of the listed namespaces."""
    return {
        "namespaceSelector": {
            "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": names}]
        }
    }


def job_relabeling(job: str) -> list[dict[str, str]]:
    """Monitor endpoint relabelings that name the scrape job: the alert rules and dashboards select on
    these names (rlops_contracts.metrics.JOB_*), not on the operator's default of service or monitor name."""
    return [{"action": "replace", "targetLabel": "job", "replacement": job}]


def service_monitor(
    name: str, namespace: str, component: str, port: str, job: str, labels: dict[str, str]
) -> dict[str, Any]:
    """Scrapes ``port`` of the Services labelled for ``component``, as scrape job ``job``; ``labels`` are
    those Prometheus selects monitors by."""
    meta = metadata(name, namespace, component)
    meta["labels"].update(labels)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector(component)},
            "endpoints": [
                {"port": port, "path": "/metrics", "interval": "15s", "relabelings": job_relabeling(job)}
            ],
        },
    }


def as_secret(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Secret manifest whose values Pulumi keeps encrypted in the state; other manifests unchanged."""
    if manifest["kind"] != "Secret":
        return manifest
    return {**manifest, "stringData": {k: pulumi.Output.secret(v) for k, v in manifest["stringData"].items()}}


def quantity_milli(value: float) -> str:
    """A Kubernetes quantity for a small positive number (0.02 → "20m")."""
    milli = round(value * 1000)
    return f"{milli // 1000}" if milli % 1000 == 0 else f"{milli}m"


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")

_KINDS: dict[tuple[str, str], Any] = {
    ("v1", "Namespace"): k8s.core.v1.Namespace,
    ("v1", "ConfigMap"): k8s.core.v1.ConfigMap,
    ("v1", "Secret"): k8s.core.v1.Secret,
    ("v1", "Service"): k8s.core.v1.Service,
    ("v1", "ServiceAccount"): k8s.core.v1.ServiceAccount,
    ("v1", "PersistentVolumeClaim"): k8s.core.v1.PersistentVolumeClaim,
    ("v1", "ResourceQuota"): k8s.core.v1.ResourceQuota,
    ("v1", "LimitRange"): k8s.core.v1.LimitRange,
    ("apps/v1", "Deployment"): k8s.apps.v1.Deployment,
    ("batch/v1", "Job"): k8s.batch.v1.Job,
    ("batch/v1", "CronJob"): k8s.batch.v1.CronJob,
    ("policy/v1", "PodDisruptionBudget"): k8s.policy.v1.PodDisruptionBudget,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s.autoscaling.v2.HorizontalPodAutoscaler,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.networking.v1.NetworkPolicy,
    ("storage.k8s.io/v1", "StorageClass"): k8s.storage.v1.StorageClass,
}


def apply(
    resource_name: str, manifest: dict[str, Any], opts: pulumi.ResourceOptions
) -> pulumi.CustomResource:
    """The Pulumi resource for ``manifest``: the typed class for core kinds, CustomResource otherwise."""
    api_version, kind = manifest["apiVersion"], manifest["kind"]
    body = {k: v for k, v in manifest.items() if k not in ("apiVersion", "kind")}
    cls = _KINDS.get((api_version, kind))
    if cls is None:
        if "." not in api_version.split("/")[0]:
            raise ValueError(f"{kind} {api_version}: a core kind missing from rlops_infra.k8s._KINDS")
        extra = {k: v for k, v in body.items() if k not in ("metadata", "spec")}
        return k8s.apiextensions.CustomResource(
            resource_name,
            api_version=api_version,
            kind=kind,
            metadata=body.get("metadata"),
            spec=body.get("spec"),
            opts=opts,
            **extra,
        )
    kwargs = {_CAMEL.sub("_", k).lower(): v for k, v in body.items()}
    resource: pulumi.CustomResource = cls(resource_name, opts=opts, **kwargs)
    return resource
