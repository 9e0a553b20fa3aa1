"""Serving: TorchServe from the server image, configured by the same code that configures the local
server (``rlops_server.torchserve.config``), its archives read from the model volume.

Objects: a ConfigMap (config.properties naming the served version, metrics.yaml, log4j2.xml), a
Deployment — or an Argo Rollout when delivery is on — with /ping probes, a Service, a
HorizontalPodAutoscaler, a PodDisruptionBudget, a ServiceMonitor and a NetworkPolicy.

TorchServe binds its management API to loopback (``rlops_server.torchserve.config``) and the NetworkPolicy
admits port 8081 from this namespace only, so nothing outside the namespace can load or unload models.
TorchServe generates its own API keys per process and cannot take a given token, and a Service spreads
requests over pods with different keys, so in the cluster token authorization is off and the inference
API is reachable only from the namespaces the stack lists (``serving.client_namespaces``).

The actions webhook (``rlops stack webhook``, Alertmanager's receiver for rollback and scale-up) runs
beside TorchServe in every serving pod, from the same image, and reaches that pod's management API on
loopback, the only place it listens. It writes the registry's aliases (the model volume, which only it
mounts writable in the pod) and its actions record (``actions/<pod>.jsonl`` in the data volume). The
``rlops-actions`` Service (the address in ``alerts/alertmanager.yaml``) lists every serving pod, ready
or not: an alert about a struggling server must still reach its webhook. An alert reaches one pod, so
with several replicas an action changes that pod's TorchServe only, while a rollback moves the
registry's champion for all. Its bearer token is a Secret here, filled from the same Pulumi secret as
the file Alertmanager reads. Its ServiceMonitor reports workers and ready workers per pod and the
actions taken, under job ``rlops-actions``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from rlops_contracts.metrics import (
    JOB_ACTIONS,
    JOB_TORCHSERVE,
    PORT_ACTIONS_WEBHOOK,
    PORT_TS_INFERENCE,
    PORT_TS_MANAGEMENT,
    PORT_TS_METRICS,
)
from rlops_server.torchserve.archive import archive_file_name
from rlops_server.torchserve.config import (
    ADAPTIVE,
    BATCHER_BUILT,
    BATCHER_CLASS,
    LOG_CONFIG_FILE,
    METRICS_FILE,
    PROPERTIES_FILE,
    ModelSettings,
    ServedModel,
    ServerConfig,
    render_log_config,
    render_properties,
)
from rlops_server.torchserve.metrics_config import metrics_config

from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.k8s import (
    DATA_MOUNT,
    MODEL_STORE_DIR,
    MODELS_MOUNT,
    REGISTRY_DIR,
    as_secret,
    container_security,
    from_namespace,
    from_namespaces,
    gpu_placement,
    http_probe,
    metadata,
    mount,
    pod_security,
    pvc_volume,
    quantity_milli,
    resources,
    scratch_volume,
    selector,
    service_monitor,
    tcp_ports,
)

COMPONENT = "serving"
CONFIG_DIR = "/etc/rlops"
VERSION_LABEL = "rlops.dev/policy-version"
QUEUE_METRIC = "torchserve_queue_wait_seconds"
"""Custom metric prometheus-adapter serves for the HPA: seconds a request waits in TorchServe's queue."""


ACTIONS_SERVICE = JOB_ACTIONS
"""Service, Secret and ServiceMonitor of the actions webhook; Alertmanager's receiver URL names it."""
ACTIONS_COMPONENT = "actions"
ACTIONS_TOKEN_DIR = "/etc/rlops-actions"
ACTIONS_TOKEN_KEY = "token"
ACTIONS_RECORDS = "actions"
"""Folder of the actions records in the data volume, one file per pod."""


@dataclass(frozen=True)
class Actions:
    """The actions webhook beside TorchServe."""

    token: str = field(repr=False)
    """The bearer token Alertmanager sends."""
    max_workers: int
    """Scale-up stops at this many workers per version in a pod."""


@dataclass(frozen=True)
class Canary:
    """How a Rollout moves traffic to a new version and which analyses decide."""

    steps: tuple[int, ...]
    pause_seconds: int
    analysis_template: str
    ope_template: str | None
    args: tuple[tuple[str, str], ...]
    """Analysis arguments: policy, candidate and champion."""


@dataclass(frozen=True)
class ServingArgs:
    serving: cfg.Serving
    namespace: str
    server_image: str
    data_claim: str
    models_claim: str
    logs: str
    """Log root inside the data volume (``storage.logs``): decisions go to its ``decisions/``."""
    monitoring_namespace: str | None
    monitor_labels: dict[str, str] | None
    canary: Canary | None = None
    actions: Actions | None = None
    """The actions webhook (None: Alertmanager posts no actions, or there is no Alertmanager)."""


def base_name(args: ServingArgs) -> str:
    return f"torchserve-{args.serving.policy}"


def config_name(args: ServingArgs) -> str:
    # One ConfigMap per served version: during a canary the stable pods keep reading their own.
    return f"{base_name(args)}-v{args.serving.version}"


def server_config(s: cfg.Serving) -> ServerConfig:
    settings = ModelSettings(
        batch_size=s.batch_size,
        max_batch_delay_ms=s.max_batch_delay_ms,
        min_workers=s.workers,
        max_workers=s.workers,
        batcher=s.batcher,
    )
    model = ServedModel(s.policy, str(s.version), archive_file_name(s.policy, s.version), settings)
    return ServerConfig(
        model_store=Path(MODEL_STORE_DIR),
        metrics_config=Path(CONFIG_DIR) / METRICS_FILE,
        models=(model,),
        inference_host="0.0.0.0",
        inference_port=PORT_TS_INFERENCE,
        management_port=PORT_TS_MANAGEMENT,
        metrics_host="0.0.0.0",
        metrics_port=PORT_TS_METRICS,
        token_auth=False,
        default_workers_per_model=s.workers,
    )


def config_map(args: ServingArgs) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config_name(args), args.namespace, COMPONENT),
        "data": {
            PROPERTIES_FILE: render_properties(server_config(args.serving)),
            METRICS_FILE: yaml.safe_dump(metrics_config(), sort_keys=False),
            LOG_CONFIG_FILE: render_log_config(),
        },
        # rlops' batcher, mounted where the frontend (started in /tmp) loads it: see pod_template.
        **(
            {"binaryData": {BATCHER_CLASS.name: base64.b64encode(BATCHER_BUILT.read_bytes()).decode("ascii")}}
            if args.serving.batcher == ADAPTIVE
            else {}
        ),
    }


def pod_template(args: ServingArgs) -> dict[str, Any]:
    s = args.serving
    command = [
        "torchserve", "--start", "--foreground", "--ncs",
        "--log-config", f"{CONFIG_DIR}/{LOG_CONFIG_FILE}",
        "--model-store", MODEL_STORE_DIR,
        "--ts-config", f"{CONFIG_DIR}/{PROPERTIES_FILE}",
    ]  # fmt: skip
    env = [
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "LOG_LOCATION", "value": "/tmp/logs"},
        {"name": "METRICS_LOCATION", "value": "/tmp/logs"},
        # One torch thread per worker: TorchServe already runs a worker per core asked for.
        {"name": "OMP_NUM_THREADS", "value": "1"},
        # Every pod logs into the one log root, laid out as locally (decisions/ here, rewards/ from the
        # feedback service): file names carry the pod's host name, so pods never write the same file.
        {"name": "RLOPS_DECISION_LOG_DIR", "value": f"{DATA_MOUNT}/{args.logs}"},
    ]
    mounts = [
        mount("config", CONFIG_DIR, read_only=True),
        mount("models", MODELS_MOUNT, read_only=True),
        mount("data", DATA_MOUNT),
        mount("tmp", "/tmp"),
    ]
    if s.batcher == ADAPTIVE:
        # TorchServe's launcher puts the working directory first on the frontend's class path.
        batcher = mount("config", f"/tmp/{BATCHER_CLASS}", read_only=True)
        mounts.append({**batcher, "subPath": BATCHER_CLASS.name})
    container = {
        "name": "torchserve",
        "image": args.server_image,
        "command": command,
        # TorchServe writes next to where it starts; the root filesystem is read-only.
        "workingDir": "/tmp",
        "env": env,
        "ports": [
            {"name": "http", "containerPort": PORT_TS_INFERENCE},
            {"name": "metrics", "containerPort": PORT_TS_METRICS},
        ],
        "resources": resources(s.resources.cpu, s.resources.memory, s.resources.gpus),
        # Java and the model load take a while: liveness starts counting once startup succeeded.
        "startupProbe": http_probe("/ping", 5, 60),
        "readinessProbe": http_probe("/ping", 5, 3),
        "livenessProbe": http_probe("/ping", 10, 6),
        "securityContext": container_security(),
        "volumeMounts": mounts,
    }
    volumes = [
        {"name": "config", "configMap": {"name": config_name(args)}},
        # Writable for the actions webhook (the registry's aliases); TorchServe mounts it read-only.
        pvc_volume("models", args.models_claim, read_only=args.actions is None),
        pvc_volume("data", args.data_claim),
        scratch_volume("tmp", "4Gi"),
    ]
    containers = [container]
    if args.actions is not None:
        containers.append(actions_container(args.server_image, args.actions))
        volumes += [
            {"name": "actions-token", "secret": {"secretName": ACTIONS_SERVICE, "defaultMode": 0o440}},
            scratch_volume("actions-tmp", "64Mi"),
        ]
    spec: dict[str, Any] = {
        "securityContext": pod_security(),
        "terminationGracePeriodSeconds": 30,
        **gpu_placement(s.resources.gpus),
        "containers": containers,
        "volumes": volumes,
    }
    if s.min_pods > 1:
        spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector(COMPONENT)},
            }
        ]
    return {
        "metadata": {"labels": {**selector(COMPONENT), VERSION_LABEL: str(s.version)}},
        "spec": spec,
    }


def actions_container(image: str, a: Actions) -> dict[str, Any]:
    command = [
        "rlops", "stack", "webhook",
        "--host", "0.0.0.0",
        "--port", str(PORT_ACTIONS_WEBHOOK),
        "--token-file", f"{ACTIONS_TOKEN_DIR}/{ACTIONS_TOKEN_KEY}",
        "--registry", REGISTRY_DIR,
        # This pod's TorchServe; token authorization is off in the cluster, so no management key file.
        "--management-url", f"http://127.0.0.1:{PORT_TS_MANAGEMENT}",
        # One record per pod: appends from several clients to one file on a network volume may interleave.
        "--record", f"{DATA_MOUNT}/{ACTIONS_RECORDS}/$(POD_NAME).jsonl",
        "--max-workers", str(a.max_workers),
    ]  # fmt: skip
    return {
        "name": "actions",
        "image": image,
        "command": command,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HOME", "value": "/tmp"},
            {"name": "TMPDIR", "value": "/tmp"},
        ],
        "ports": [{"name": "actions", "containerPort": PORT_ACTIONS_WEBHOOK}],
        "resources": resources("250m", "512Mi"),
        # Its imports (torch among them) take a while on a quarter of a core.
        "startupProbe": http_probe("/healthz", 5, 36, port="actions"),
        "readinessProbe": http_probe("/healthz", 10, 3, port="actions"),
        "livenessProbe": http_probe("/healthz", 10, 6, port="actions"),
        "securityContext": container_security(),
        # Whole volumes, no subPath: a folder the kubelet creates for a subPath is owned by root and may not
        # be writable for the trainers that later publish into the registry.
        "volumeMounts": [
            mount("models", MODELS_MOUNT),
            mount("data", DATA_MOUNT),
            mount("actions-token", ACTIONS_TOKEN_DIR, read_only=True),
            mount("actions-tmp", "/tmp"),
        ],
    }


def canary_strategy(c: Canary) -> dict[str, Any]:
    analysis_args = [{"name": k, "value": v} for k, v in c.args]
    steps: list[dict[str, Any]] = []
    if c.ope_template:
        # Off-policy evaluation on recent logs decides before any traffic moves.
        steps.append({"analysis": {"templates": [{"templateName": c.ope_template}], "args": analysis_args}})
    first_weight = len(steps)
    for weight in c.steps:
        steps.append({"setWeight": weight})
        if weight < 100 and c.pause_seconds:
            steps.append({"pause": {"duration": f"{c.pause_seconds}s"}})
    return {
        "canary": {
            "maxSurge": "25%",
            "maxUnavailable": 0,
            "steps": steps,
            "analysis": {
                "templates": [{"templateName": c.analysis_template}],
                "startingStep": first_weight,
                "args": analysis_args,
            },
        }
    }


def workload(args: ServingArgs) -> dict[str, Any]:
    s = args.serving
    spec: dict[str, Any] = {
        "selector": {"matchLabels": selector(COMPONENT)},
        "revisionHistoryLimit": 3,
        "template": pod_template(args),
    }
    if not s.autoscaling.enabled:
        # With an HPA the replica count is the HPA's to set; declaring it here would fight it.
        spec["replicas"] = s.replicas
    if args.canary is None:
        spec["strategy"] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
        }
        api_version, kind = "apps/v1", "Deployment"
    else:
        spec["strategy"] = canary_strategy(args.canary)
        api_version, kind = "argoproj.io/v1alpha1", "Rollout"
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": metadata(base_name(args), args.namespace, COMPONENT),
        "spec": spec,
    }


def service(args: ServingArgs) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(base_name(args), args.namespace, COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(COMPONENT),
            "ports": [
                {"name": "http", "port": PORT_TS_INFERENCE, "targetPort": "http"},
                {"name": "metrics", "port": PORT_TS_METRICS, "targetPort": "metrics"},
            ],
        },
    }


def actions_service(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ACTIONS_SERVICE, namespace, ACTIONS_COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(COMPONENT),
            # A pod whose TorchServe fails its readiness probe is the one an alert is about.
            "publishNotReadyAddresses": True,
            "ports": [{"name": "actions", "port": PORT_ACTIONS_WEBHOOK, "targetPort": "actions"}],
        },
    }


def actions_secret(namespace: str, a: Actions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(ACTIONS_SERVICE, namespace, ACTIONS_COMPONENT),
        "type": "Opaque",
        "stringData": {ACTIONS_TOKEN_KEY: a.token},
    }


def autoscaler(args: ServingArgs, target_kind: str, target_api: str) -> dict[str, Any]:
    a = args.serving.autoscaling
    if a.metric == "cpu":
        metric: dict[str, Any] = {
            "type": "Resource",
            "resource": {
                "name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": round(a.target)},
            },
        }
    else:
        metric = {
            "type": "Pods",
            "pods": {
                "metric": {"name": QUEUE_METRIC},
                "target": {"type": "AverageValue", "averageValue": quantity_milli(a.target)},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(base_name(args), args.namespace, COMPONENT),
        "spec": {
            "scaleTargetRef": {"apiVersion": target_api, "kind": target_kind, "name": base_name(args)},
            "minReplicas": a.min_replicas,
            "maxReplicas": a.max_replicas,
            "metrics": [metric],
            "behavior": {
                # Scale up at once under a burst; scale down slowly so a dip does not drop warm workers.
                "scaleUp": {"stabilizationWindowSeconds": 0},
                "scaleDown": {"stabilizationWindowSeconds": 300},
            },
        },
    }


def disruption_budget(args: ServingArgs) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(base_name(args), args.namespace, COMPONENT),
        "spec": {
            "minAvailable": args.serving.pdb_min_available,
            "selector": {"matchLabels": selector(COMPONENT)},
        },
    }


def network_policy(args: ServingArgs) -> dict[str, Any]:
    ingress: list[dict[str, Any]] = [
        # Same namespace: inference, management and metrics.
        {
            "from": [{"podSelector": {}}],
            "ports": tcp_ports(PORT_TS_INFERENCE, PORT_TS_MANAGEMENT, PORT_TS_METRICS),
        }
    ]
    if args.serving.client_namespaces:
        ingress.append(
            {
                "from": [from_namespaces(list(args.serving.client_namespaces))],
                "ports": tcp_ports(PORT_TS_INFERENCE),
            }
        )
    if args.monitoring_namespace:
        ingress.append(
            {
                "from": [from_namespace(args.monitoring_namespace)],
                # Prometheus scrapes; Alertmanager posts to the actions webhook.
                "ports": tcp_ports(PORT_TS_METRICS, *([PORT_ACTIONS_WEBHOOK] if args.actions else [])),
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(base_name(args), args.namespace, COMPONENT),
        "spec": {
            "podSelector": {"matchLabels": selector(COMPONENT)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def objects(args: ServingArgs) -> list[dict[str, Any]]:
    work = workload(args)
    out = [config_map(args), work, service(args), network_policy(args)]
    if args.serving.autoscaling.enabled:
        out.append(autoscaler(args, work["kind"], work["apiVersion"]))
    if args.serving.pdb_min_available:
        out.append(disruption_budget(args))
    labels = args.monitor_labels
    if labels is not None:
        out.append(
            service_monitor(base_name(args), args.namespace, COMPONENT, "metrics", JOB_TORCHSERVE, labels)
        )
    if args.actions is not None:
        out += [actions_secret(args.namespace, args.actions), actions_service(args.namespace)]
        if labels is not None:
            out.append(
                service_monitor(
                    ACTIONS_SERVICE, args.namespace, ACTIONS_COMPONENT, "actions", JOB_ACTIONS, labels
                )
            )
    return out


def _suffix(obj: dict[str, Any]) -> str:
    kind = obj["kind"].lower()
    return f"{ACTIONS_COMPONENT}-{kind}" if obj["metadata"]["name"] == ACTIONS_SERVICE else kind


class Serving(Component):
    """Outputs ``service``: the in-cluster URL of the inference API."""

    def __init__(
        self,
        name: str,
        args: ServingArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Serving", name, opts)
        deps = depends_on or []
        objs = objects(args)
        # What the pods read at start (their ConfigMap, the webhook's token) exists before them.
        read: list[pulumi.Resource] = []
        for obj in objs:
            if obj["kind"] == "ConfigMap":
                # Kept after a version change: pods of the previous version may still restart and read it.
                read.append(
                    self.add("config", obj, depends_on=deps, retain_on_delete=args.canary is not None)
                )
            elif obj["kind"] == "Secret":
                read.append(self.add(_suffix(obj), as_secret(obj), depends_on=deps))
        for obj in objs:
            if obj["kind"] not in ("ConfigMap", "Secret"):
                self.add(_suffix(obj), obj, depends_on=[*deps, *read])
        url = f"http://{base_name(args)}.{args.namespace}.svc:{PORT_TS_INFERENCE}"
        self.url = url
        self.register_outputs({"url": url})
