"""The Helm charts the stack installs: where each comes from. Versions are deployment facts and live in
the stack files (with these defaults checked against each chart's own repository)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s


@dataclass(frozen=True)
class Chart:
    name: str
    repo: str
    app_version: str
    """The application version the default chart version ships (for the docs and the stack table)."""


KUBE_PROMETHEUS_STACK = Chart(
    "kube-prometheus-stack",
    "https://prometheus-community.github.io/helm-charts",
    "prometheus-operator v0.93.1",
)
PROMETHEUS_ADAPTER = Chart(
    "prometheus-adapter", "https://prometheus-community.github.io/helm-charts", "v0.12.0"
)
KUBERAY_OPERATOR = Chart("kuberay-operator", "https://ray-project.github.io/kuberay-helm/", "v1.7.0")
ARGO_ROLLOUTS = Chart("argo-rollouts", "https://argoproj.github.io/argo-helm", "v1.9.1")
NVIDIA_DEVICE_PLUGIN = Chart("nvidia-device-plugin", "https://nvidia.github.io/k8s-device-plugin", "v0.18.2")
CLUSTER_AUTOSCALER = Chart("cluster-autoscaler", "https://kubernetes.github.io/autoscaler", "chart default")


def release(
    resource_name: str,
    chart: Chart,
    version: str,
    namespace: str,
    values: dict[str, Any],
    opts: pulumi.ResourceOptions,
    release_name: str | None = None,
) -> k8s.helm.v3.Release:
    """A Helm release with a fixed name (selectors and service names depend on it) and a pinned version."""
    return k8s.helm.v3.Release(
        resource_name,
        name=release_name or chart.name,
        chart=chart.name,
        version=version,
        repository_opts={"repo": chart.repo},
        namespace=namespace,
        values=values,
        # A failed install or upgrade rolls back instead of leaving half a release behind.
        atomic=True,
        timeout=900,
        opts=opts,
    )
