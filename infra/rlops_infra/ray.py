"""Ray on Kubernetes: the KubeRay operator from its pinned chart (which installs the CRDs on first install,
as upstream recommends) and a RayCluster whose head schedules no work (``num-cpus: 0``) and whose GPU
worker group autoscales from zero; PodMonitors for Ray's metrics.

The cluster spec is built by :func:`cluster_spec`, which the RayJobs of the training component reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi

from rlops_infra import charts
from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import (
    DATA_MOUNT,
    MODELS_MOUNT,
    container_security,
    gpu_placement,
    job_relabeling,
    metadata,
    mount,
    pod_security,
    pvc_volume,
    resources,
    scratch_volume,
)

OPERATOR_NAMESPACE = "kuberay-system"
CLUSTER_NAME = "rlops"
METRICS_PORT = 8080
RAY_NODE_LABEL = "ray.io/is-ray-node"
JOB = "ray"
"""Scrape job of Ray's own metrics (``ray_*``)."""


@dataclass(frozen=True)
class RayArgs:
    ray: cfg.Ray
    namespace: str
    trainer_image: str
    data_claim: str
    models_claim: str
    monitor_labels: dict[str, str] | None = None
    """Labels Prometheus selects monitors by; None when monitoring is off."""


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    min_replicas: int
    max_replicas: int
    replicas: int
    cpu: str
    memory: str
    gpus: int


def _volumes(data_claim: str, models_claim: str, shm: str) -> list[dict[str, Any]]:
    return [
        pvc_volume("data", data_claim, read_only=True),
        pvc_volume("models", models_claim),
        scratch_volume("tmp", "20Gi"),
        # Ray's object store lives in /dev/shm; the default 64 MiB would spill everything to disk.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]


def _mounts() -> list[dict[str, Any]]:
    return [
        mount("data", DATA_MOUNT, read_only=True),
        mount("models", MODELS_MOUNT),
        mount("tmp", "/tmp"),
        mount("dshm", "/dev/shm"),
    ]


def _env() -> list[dict[str, str]]:
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "RLOPS_REGISTRY", "value": f"{MODELS_MOUNT}/registry"},
    ]


def head_group(image: str, head: cfg.RayHead, data_claim: str, models_claim: str) -> dict[str, Any]:
    return {
        # The head runs the GCS, the dashboard and the autoscaler; no tasks, so it never needs a GPU.
        "rayStartParams": {
            "num-cpus": "0",
            "dashboard-host": "0.0.0.0",
            "metrics-export-port": str(METRICS_PORT),
        },
        "template": {
            "spec": {
                "securityContext": pod_security(),
                "containers": [
                    {
                        "name": "ray-head",
                        "image": image,
                        "env": _env(),
                        "ports": [
                            {"name": "gcs-server", "containerPort": 6379},
                            {"name": "dashboard", "containerPort": 8265},
                            {"name": "client", "containerPort": 10001},
                            {"name": "metrics", "containerPort": METRICS_PORT},
                        ],
                        "resources": resources(head.cpu, head.memory),
                        "securityContext": container_security(),
                        "volumeMounts": _mounts(),
                    }
                ],
                "volumes": _volumes(data_claim, models_claim, "2Gi"),
            }
        },
    }


def worker_group(image: str, group: WorkerGroup, data_claim: str, models_claim: str) -> dict[str, Any]:
    return {
        "groupName": group.name,
        "replicas": group.replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": {
            "spec": {
                "securityContext": pod_security(),
                **gpu_placement(group.gpus),
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": image,
                        "env": _env(),
                        "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                        "resources": resources(group.cpu, group.memory, group.gpus),
                        "securityContext": container_security(),
                        "volumeMounts": _mounts(),
                    }
                ],
                "volumes": _volumes(data_claim, models_claim, "8Gi"),
            }
        },
    }


def cluster_spec(
    ray: cfg.Ray,
    image: str,
    workers: WorkerGroup,
    data_claim: str,
    models_claim: str,
    autoscale: bool,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "rayVersion": ray.ray_version,
        "headGroupSpec": head_group(image, ray.head, data_claim, models_claim),
        "workerGroupSpecs": [worker_group(image, workers, data_claim, models_claim)],
    }
    if autoscale:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": ray.idle_timeout_seconds,
            "resources": resources("500m", "512Mi"),
            "securityContext": container_security(),
            "env": [{"name": "HOME", "value": "/tmp"}],
            "volumeMounts": [mount("tmp", "/tmp")],
        }
    return spec


def gpu_worker_group(ray: cfg.Ray) -> WorkerGroup:
    w = ray.gpu_workers
    return WorkerGroup(
        name="gpu" if w.gpus else "cpu",
        min_replicas=w.min_replicas,
        max_replicas=w.max_replicas,
        replicas=w.min_replicas,
        cpu=w.cpu,
        memory=w.memory,
        gpus=w.gpus,
    )


def raycluster(args: RayArgs) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": metadata(CLUSTER_NAME, args.namespace, "ray"),
        "spec": cluster_spec(
            args.ray, args.trainer_image, gpu_worker_group(args.ray), args.data_claim, args.models_claim, True
        ),
    }


def pod_monitor(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    meta = metadata("ray", namespace, "ray")
    meta["labels"].update(labels)
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            # Every Ray pod in the namespace: the long-lived cluster and the clusters RayJobs create.
            "selector": {"matchLabels": {RAY_NODE_LABEL: "yes"}},
            "podMetricsEndpoints": [
                {"port": "metrics", "interval": "15s", "relabelings": job_relabeling(JOB)}
            ],
        },
    }


def operator_values(monitor_labels: dict[str, str] | None) -> dict[str, Any]:
    return {
        "resources": {
            "requests": {"cpu": "100m", "memory": "512Mi"},
            "limits": {"cpu": "500m", "memory": "512Mi"},
        },
        "metrics": {
            "enabled": True,
            "serviceMonitor": {
                "enabled": monitor_labels is not None,
                "additionalLabels": monitor_labels or {},
            },
        },
    }


def objects(args: RayArgs) -> list[dict[str, Any]]:
    out = [raycluster(args)]
    if args.monitor_labels is not None:
        out.append(pod_monitor(args.namespace, args.monitor_labels))
    return out


class Ray(Component):
    """Outputs ``operator``: the KubeRay release (its CRDs exist once it is installed)."""

    def __init__(
        self,
        name: str,
        args: RayArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Ray", name, opts)
        deps = depends_on or []
        self.operator = charts.release(
            f"{name}-kuberay-operator",
            charts.KUBERAY_OPERATOR,
            args.ray.operator_chart_version,
            OPERATOR_NAMESPACE,
            operator_values(args.monitor_labels),
            self.child_opts(depends_on=deps),
        )
        for obj in objects(args):
            self.add(obj["kind"].lower(), obj, depends_on=[self.operator, *deps])
        self.register_outputs({"operator": self.operator})
