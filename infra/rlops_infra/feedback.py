"""The reward feedback service: ``rlops feedback serve`` from the server image, behind the
``rlops-feedback`` Service on port 8090.

Producers post rewards by ``decision_id``; the service appends them to ``rewards/`` of the log root in the
data volume (``storage.logs``), where serving writes ``decisions/``: the layout of the local ``.rlops/logs``,
so the reward join, the OPE gate and the loop read both side by side. Every replica appends to the same
folder; file names carry the pod's host name, so no two write one file. ``POST /rewards`` wants a bearer
token, a Secret filled from a Pulumi secret and read from a file, never from the environment.

Who may post: pods of the stack's namespace and of ``serving.client_namespaces`` (the namespaces that may
call inference are those whose decisions get rewards), and Prometheus, which scrapes ``/metrics`` on the
same port as job ``rlops-feedback`` (the rules and dashboards select on it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pulumi
from rlops_contracts.metrics import JOB_FEEDBACK, PORT_FEEDBACK

from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import (
    DATA_MOUNT,
    as_secret,
    container_security,
    from_namespace,
    from_namespaces,
    http_probe,
    metadata,
    mount,
    pod_security,
    pvc_volume,
    resources,
    scratch_volume,
    selector,
    service_monitor,
    tcp_ports,
)

COMPONENT = "feedback"
NAME = JOB_FEEDBACK
"""Deployment, Service, Secret, ServiceMonitor, NetworkPolicy and PodDisruptionBudget."""
TOKEN_DIR = "/etc/rlops-feedback"
TOKEN_KEY = "token"


@dataclass(frozen=True)
class FeedbackArgs:
    feedback: cfg.Feedback
    namespace: str
    server_image: str
    data_claim: str
    logs: str
    """Log root inside the data volume (``storage.logs``)."""
    token: str = field(repr=False)
    client_namespaces: tuple[str, ...] = ()
    """Namespaces besides the stack's own whose pods may post rewards."""
    monitoring_namespace: str | None = None
    monitor_labels: dict[str, str] | None = None
    """Labels Prometheus selects monitors by; None when monitoring is off."""


def command(args: FeedbackArgs) -> list[str]:
    return [
        "rlops", "feedback", "serve",
        "--dir", f"{DATA_MOUNT}/{args.logs}",
        "--host", "0.0.0.0",
        "--port", str(PORT_FEEDBACK),
        "--token-file", f"{TOKEN_DIR}/{TOKEN_KEY}",
    ]  # fmt: skip


def deployment(args: FeedbackArgs) -> dict[str, Any]:
    f = args.feedback
    container = {
        "name": "feedback",
        "image": args.server_image,
        "command": command(args),
        "env": [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}],
        "ports": [{"name": "http", "containerPort": PORT_FEEDBACK}],
        "resources": resources(f.resources.cpu, f.resources.memory),
        # /healthz answers 503 once the reward writer has stopped: such a pod takes no rewards.
        "startupProbe": http_probe("/healthz", 5, 36),
        "readinessProbe": http_probe("/healthz", 10, 3),
        "livenessProbe": http_probe("/healthz", 10, 6),
        "securityContext": container_security(),
        # The whole data volume, no subPath: a folder the kubelet creates for a subPath is owned by root.
        "volumeMounts": [
            mount("data", DATA_MOUNT),
            mount("token", TOKEN_DIR, read_only=True),
            mount("tmp", "/tmp"),
        ],
    }
    pod: dict[str, Any] = {
        "securityContext": pod_security(),
        # SIGTERM drains the queued rewards to disk before the pod goes.
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [
            pvc_volume("data", args.data_claim),
            {"name": "token", "secret": {"secretName": NAME, "defaultMode": 0o440}},
            scratch_volume("tmp", "64Mi"),
        ],
    }
    if f.replicas > 1:
        pod["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector(COMPONENT)},
            }
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(NAME, args.namespace, COMPONENT),
        "spec": {
            "replicas": f.replicas,
            "selector": {"matchLabels": selector(COMPONENT)},
            "revisionHistoryLimit": 3,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": selector(COMPONENT)}, "spec": pod},
        },
    }


def service(args: FeedbackArgs) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(NAME, args.namespace, COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(COMPONENT),
            "ports": [{"name": "http", "port": PORT_FEEDBACK, "targetPort": "http"}],
        },
    }


def secret(args: FeedbackArgs) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(NAME, args.namespace, COMPONENT),
        "type": "Opaque",
        "stringData": {TOKEN_KEY: args.token},
    }


def network_policy(args: FeedbackArgs) -> dict[str, Any]:
    peers: list[dict[str, Any]] = [{"podSelector": {}}]
    if args.client_namespaces:
        peers.append(from_namespaces(list(args.client_namespaces)))
    if args.monitoring_namespace:
        peers.append(from_namespace(args.monitoring_namespace))
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(NAME, args.namespace, COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": selector(COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": peers, "ports": tcp_ports(PORT_FEEDBACK)}],
        },
    }


def disruption_budget(args: FeedbackArgs) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(NAME, args.namespace, COMPONENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(COMPONENT)}},
    }


def objects(args: FeedbackArgs) -> list[dict[str, Any]]:
    out = [secret(args), deployment(args), service(args), network_policy(args)]
    if args.feedback.replicas >= 2:
        out.append(disruption_budget(args))
    if args.monitor_labels is not None:
        out.append(
            service_monitor(NAME, args.namespace, COMPONENT, "http", JOB_FEEDBACK, args.monitor_labels)
        )
    return out


class Feedback(Component):
    """Outputs ``url``: the in-cluster address producers post rewards to (``<url>/rewards``)."""

    def __init__(
        self,
        name: str,
        args: FeedbackArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Feedback", name, opts)
        deps = depends_on or []
        objs = objects(args)
        # The token the pods read at start exists before them.
        token = self.add("secret", as_secret(objs[0]), depends_on=deps)
        for obj in objs[1:]:
            self.add(obj["kind"].lower(), obj, depends_on=[*deps, token])
        self.url = f"http://{NAME}.{args.namespace}.svc:{PORT_FEEDBACK}"
        self.register_outputs({"url": self.url})
