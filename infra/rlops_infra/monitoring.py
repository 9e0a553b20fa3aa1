"""Monitoring: kube-prometheus-stack (Prometheus, Alertmanager, Grafana) from its pinned chart, one
PrometheusRule per rule file in ``alerts/``, one ConfigMap per built dashboard, the Alertmanager config
(routes from ``alerts/``, receivers from the stack with their credentials from Pulumi secrets) and
prometheus-adapter for the serving autoscaler.

The chart's Prometheus selects rules, ServiceMonitors and PodMonitors labelled ``release: <release>``
(its ``*SelectorNilUsesHelmValues`` defaults, stated explicitly in the values); Grafana's sidecar loads
ConfigMaps labelled ``grafana_dashboard: "1"`` from every namespace.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pulumi
import yaml
from rlops_contracts.metrics import PORT_ACTIONS_WEBHOOK, TS_INFERENCE_REQUESTS, TS_QUEUE_LATENCY

from rlops_infra import charts
from rlops_infra import config as cfg
from rlops_infra.base import Component
from rlops_infra.files import RepoFiles
from rlops_infra.k8s import as_secret, metadata
from rlops_infra.serving import ACTIONS_SERVICE, QUEUE_METRIC

DASHBOARD_LABEL = "grafana_dashboard"
DASHBOARD_LABEL_VALUE = "1"
GRAFANA_SECRET = "grafana-admin"
ALERTMANAGER_SECRET = "alertmanager-rlops"
ALERTMANAGER_KEY = "alertmanager.yaml"


@dataclass(frozen=True)
class MonitoringArgs:
    monitoring: cfg.Monitoring
    alerting: cfg.Alerting
    environment: str
    secrets: dict[str, str] = field(repr=False)
    """Secret values by config key (Grafana password, receiver credentials)."""
    files: RepoFiles = field(repr=False)
    adapter: bool = False
    """Install prometheus-adapter (the serving HPA scales on queue wait)."""
    actions_namespace: str = cfg.Tenancy().namespace
    """Namespace of the actions webhook's Service (the stack's own namespace)."""


def selector_labels(m: cfg.Monitoring) -> dict[str, str]:
    return {"release": m.release_name}


def prometheus_url(m: cfg.Monitoring) -> str:
    # fullnameOverride = release name, so the service name does not depend on the chart's truncation rules.
    return f"http://{m.release_name}-prometheus.{m.namespace}.svc:9090"


def _receiver(r: cfg.Receiver) -> dict[str, Any]:
    """A receiver whose credential is a file in the mounted Secret, never a value in the config."""
    credential = f"{SECRETS_DIR}{r.secret}" if r.secret else None
    if r.type == "pagerduty":
        return {
            "name": r.name,
            "pagerduty_configs": [{"routing_key_file": credential, "send_resolved": True}],
        }
    if r.type == "slack":
        slack: dict[str, Any] = {"api_url_file": credential, "send_resolved": True}
        if r.channel:
            slack["channel"] = r.channel
        return {"name": r.name, "slack_configs": [slack]}
    if r.type == "webhook":
        hook: dict[str, Any] = {"url_file": credential} if credential else {"url": r.url}
        return {"name": r.name, "webhook_configs": [{**hook, "send_resolved": True}]}
    return {"name": r.name}


def _routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes") or []:
        yield from _routes(child)


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ACTIONS_PATH = "/alerts"


def actions_url(namespace: str) -> str:
    return f"http://{ACTIONS_SERVICE}.{namespace}.svc.cluster.local:{PORT_ACTIONS_WEBHOOK}{ACTIONS_PATH}"


def _actions_hooks(config: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(receiver name, webhook config) of every webhook that posts to the actions Service in the cluster."""
    for rec in config.get("receivers") or []:
        for hook in rec.get("webhook_configs") or []:
            host = urlparse(str(hook.get("url", ""))).hostname or ""
            labels = host.split(".")
            if labels[0] == ACTIONS_SERVICE and "svc" in labels[2:]:
                yield str(rec.get("name")), hook


def _bearer_file(hook: dict[str, Any]) -> str | None:
    auth = (hook.get("http_config") or {}).get("authorization") or {}
    if auth.get("type", "Bearer").lower() != "bearer":
        return None
    value = auth.get("credentials_file")
    return value if isinstance(value, str) else None


def _point_at_actions(config: dict[str, Any], file_name: str, namespace: str) -> list[str]:
    """Point the actions webhooks at the Service in ``namespace``; returns problems (wrong port, no token)."""
    problems = []
    for name, hook in _actions_hooks(config):
        url = urlparse(str(hook["url"]))
        if url.port != PORT_ACTIONS_WEBHOOK or url.path != ACTIONS_PATH:
            problems.append(
                f"{file_name}: receiver '{name}' posts to {hook['url']}; the actions webhook listens on "
                f"port {PORT_ACTIONS_WEBHOOK}, path {ACTIONS_PATH}"
            )
        if _bearer_file(hook) is None:
            problems.append(
                f"{file_name}: receiver '{name}' posts to the actions webhook without a bearer token; it "
                "takes only authenticated requests: set http_config.authorization.credentials_file to "
                f"a file in {SECRETS_DIR}"
            )
        hook["url"] = actions_url(namespace)
    return problems


def actions_token_file(config: dict[str, Any]) -> str | None:
    """The credentials file (its name in the credentials Secret) holding the token Alertmanager sends the
    actions webhook; None when no receiver posts to the webhook (it is then not deployed)."""
    for _, hook in _actions_hooks(config):
        ref = _bearer_file(hook)
        if ref is not None:
            return ref.removeprefix(SECRETS_DIR)
    return None


SECRETS_NAME = "rlops-alertmanager"
"""The Secret the chart mounts at /etc/alertmanager/secrets/<name>/ (alertmanagerSpec.secrets)."""
SECRETS_DIR = f"/etc/alertmanager/secrets/{SECRETS_NAME}/"


def _file_refs(node: Any) -> Iterator[str]:
    """Every ``*_file`` value in a receiver (credential files the Alertmanager config reads)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key.endswith("_file") and isinstance(value, str):
                yield value
            else:
                yield from _file_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _file_refs(item)


def _notifies(receiver: dict[str, Any]) -> bool:
    return any(k.endswith("_configs") and v for k, v in receiver.items())


def _critical_receivers(route: dict[str, Any]) -> list[str]:
    found = [
        r["receiver"]
        for r in _routes(route)
        if "receiver" in r and any("severity" in m and "critical" in m for m in r.get("matchers") or [])
    ]
    return found or [route.get("receiver", "")]


def alertmanager_config(
    file_config: dict[str, Any] | None,
    file_name: str,
    alerting: cfg.Alerting,
    environment: str,
    namespace: str = cfg.Tenancy().namespace,
) -> dict[str, Any]:
    """The cluster's Alertmanager config: ``alerts/``'s config with the stack's receiver overrides.

    A receiver the stack defines replaces the file's receiver of that name. Credential files the kept
    receivers read must be mapped to secret config keys (``alerting.secrets``); a kept webhook must not
    point at this machine (the local profile's address). Webhooks that post to the actions Service
    (``rlops-actions.<namespace>.svc…``) are pointed at ``namespace``, where the stack runs it, and must
    send its bearer token. In prod, critical alerts must notify someone.
    Raises :class:`config.ConfigError` listing every problem.
    """
    stack = {r.name: _receiver(r) for r in alerting.receivers}
    if file_config is None:
        config: dict[str, Any] = {"route": {"receiver": next(iter(stack), "null"), "group_by": ["alertname"]}}
        file_receivers: list[dict[str, Any]] = [] if stack else [{"name": "null"}]
    else:
        config = copy.deepcopy(file_config)
        file_receivers = list(config.get("receivers") or [])
    # Template files are paths on the machine that ran the local profile; the chart mounts none of them.
    config.pop("templates", None)
    problems = []
    merged = []
    for rec in file_receivers:
        name = rec.get("name")
        if name in stack:
            merged.append(stack.pop(name))
            continue
        for hook in rec.get("webhook_configs") or []:
            if _loopback(str(hook.get("url", ""))):
                problems.append(
                    f"{file_name}: receiver '{name}' posts to {hook.get('url')}, an address of the local "
                    f"machine; override it in rlops:alerting.receivers (name '{name}')"
                )
        for ref in _file_refs(rec):
            file = ref.removeprefix(SECRETS_DIR)
            if file == ref or "/" in file:
                problems.append(
                    f"{file_name}: receiver '{name}' reads {ref}; credential files must live in {SECRETS_DIR}"
                )
            elif file not in alerting.secrets:
                problems.append(
                    f"rlops:alerting.secrets: receiver '{name}' of {file_name} reads {ref}; map '{file}' "
                    f"to a secret config key (alerting.secrets.{file}: <key>, then "
                    "`pulumi config set --secret <key> <value>`), or override the receiver (type none drops "
                    "its alerts)"
                )
        merged.append(rec)
    merged.extend(stack.values())
    config["receivers"] = merged
    problems += _point_at_actions(config, file_name, namespace)
    by_name = {r.get("name"): r for r in merged}
    for route in _routes(config.get("route") or {}):
        name = route.get("receiver")
        if name is not None and name not in by_name:
            problems.append(
                f"{file_name}: route receiver '{name}' is not defined; defined: {sorted(map(str, by_name))}"
            )
    if environment == "prod":
        for name in _critical_receivers(config.get("route") or {}):
            if name in by_name and not _notifies(by_name[name]):
                problems.append(
                    f"rlops:alerting.receivers: prod pages no one: critical alerts go to '{name}', which "
                    "has no integration; keep the file's receiver or define one of type pagerduty, slack "
                    "or webhook"
                )
    if problems:
        raise cfg.ConfigError(problems)
    return config


def secret_files(alerting: cfg.Alerting, secrets: dict[str, str]) -> dict[str, str]:
    """File name → secret value for the mounted credentials Secret (a stack receiver's file is its key)."""
    files = {file: secrets[key] for file, key in alerting.secrets.items()}
    files.update({r.secret: secrets[r.secret] for r in alerting.receivers if r.secret})
    return files


def grafana_secret(namespace: str, password: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(GRAFANA_SECRET, namespace, "monitoring"),
        "type": "Opaque",
        "stringData": {"admin-user": "admin", "admin-password": password},
    }


def credentials_secret(namespace: str, files: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(SECRETS_NAME, namespace, "monitoring"),
        "type": "Opaque",
        "stringData": dict(files),
    }


def alertmanager_secret(namespace: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(ALERTMANAGER_SECRET, namespace, "monitoring"),
        "type": "Opaque",
        "stringData": {ALERTMANAGER_KEY: yaml.safe_dump(config, sort_keys=False)},
    }


def prometheus_rules(args: MonitoringArgs) -> list[dict[str, Any]]:
    m = args.monitoring
    out = []
    for rule_file in args.files.rule_files:
        meta = metadata(rule_file.name, m.namespace, "monitoring", **selector_labels(m))
        meta["annotations"] = {"rlops.dev/source": str(rule_file.path)}
        out.append(
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PrometheusRule",
                "metadata": meta,
                "spec": {"groups": copy.deepcopy(rule_file.groups)},
            }
        )
    return out


def dashboards(args: MonitoringArgs) -> list[dict[str, Any]]:
    m = args.monitoring
    out = []
    for d in args.files.dashboards:
        meta = metadata(d.name, m.namespace, "monitoring", **{DASHBOARD_LABEL: DASHBOARD_LABEL_VALUE})
        meta["annotations"] = {"rlops.dev/source": str(d.path)}
        out.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {f"{d.uid}.json": d.text}}
        )
    return out


def _res(
    cpu: str, memory: str, cpu_limit: str | None = None, memory_limit: str | None = None
) -> dict[str, Any]:
    return {
        "requests": {"cpu": cpu, "memory": memory},
        "limits": {"cpu": cpu_limit or cpu, "memory": memory_limit or memory},
    }


def stack_values(m: cfg.Monitoring) -> dict[str, Any]:
    storage: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": m.prometheus_storage}},
    }
    if m.storage_class:
        storage["storageClassName"] = m.storage_class
    return {
        "fullnameOverride": m.release_name,
        "crds": {"enabled": True},
        "prometheus": {
            "prometheusSpec": {
                "retention": m.retention,
                # The selector contract: rules and monitors labelled release=<release name> are picked up.
                "ruleSelectorNilUsesHelmValues": True,
                "serviceMonitorSelectorNilUsesHelmValues": True,
                "podMonitorSelectorNilUsesHelmValues": True,
                "storageSpec": {"volumeClaimTemplate": {"spec": storage}},
                "resources": _res("500m", "2Gi", "2", "4Gi"),
            }
        },
        "alertmanager": {
            "alertmanagerSpec": {
                # The config (with receiver credentials) comes from our own Secret, never from Helm values.
                "useExistingSecret": True,
                "configSecret": ALERTMANAGER_SECRET,
                # Credential files the config reads, mounted at /etc/alertmanager/secrets/<name>/.
                "secrets": [SECRETS_NAME],
                "resources": _res("100m", "256Mi", "500m", "512Mi"),
            }
        },
        "grafana": {
            "admin": {
                "existingSecret": GRAFANA_SECRET,
                "userKey": "admin-user",
                "passwordKey": "admin-password",
            },
            "sidecar": {
                "dashboards": {
                    "enabled": True,
                    "label": DASHBOARD_LABEL,
                    "labelValue": DASHBOARD_LABEL_VALUE,
                    "searchNamespace": "ALL",
                }
            },
            "resources": _res("100m", "256Mi", "500m", "512Mi"),
        },
        "prometheusOperator": {"resources": _res("100m", "256Mi", "500m", "512Mi")},
    }


def adapter_values(m: cfg.Monitoring) -> dict[str, Any]:
    per_pod = "<<.LabelMatchers>>"
    return {
        "prometheus": {"url": f"http://{m.release_name}-prometheus.{m.namespace}.svc", "port": 9090},
        "rules": {
            "default": False,
            "custom": [
                {
                    "seriesQuery": f'{TS_QUEUE_LATENCY}{{namespace!="",pod!=""}}',
                    "resources": {
                        "overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
                    },
                    "name": {"matches": f"^{TS_QUEUE_LATENCY}$", "as": QUEUE_METRIC},
                    # Mean seconds a request waited in the queue over 2 minutes (both are counters).
                    "metricsQuery": (
                        f"sum by (<<.GroupBy>>) (rate({TS_QUEUE_LATENCY}{{{per_pod}}}[2m])) / 1e6"
                        " / clamp_min("
                        f"sum by (<<.GroupBy>>) (rate({TS_INFERENCE_REQUESTS}{{{per_pod}}}[2m])), 1e-9)"
                    ),
                }
            ],
        },
        "resources": _res("100m", "128Mi", "500m", "256Mi"),
    }


def objects(args: MonitoringArgs) -> list[dict[str, Any]]:
    m = args.monitoring
    file_name = str(args.files.alertmanager_path or "alerts/")
    am = alertmanager_config(
        args.files.alertmanager, file_name, args.alerting, args.environment, args.actions_namespace
    )
    out = [
        grafana_secret(m.namespace, args.secrets[m.grafana_admin_password]),
        alertmanager_secret(m.namespace, am),
        credentials_secret(m.namespace, secret_files(args.alerting, args.secrets)),
    ]
    return out + prometheus_rules(args) + dashboards(args)


class Monitoring(Component):
    """Outputs ``release`` (kube-prometheus-stack; its CRDs exist once installed) and ``prometheus_url``."""

    def __init__(
        self,
        name: str,
        args: MonitoringArgs,
        opts: pulumi.ResourceOptions | None = None,
        depends_on: list[pulumi.Resource] | None = None,
    ) -> None:
        super().__init__("Monitoring", name, opts)
        m = args.monitoring
        deps = depends_on or []
        objs = objects(args)
        secrets = [
            self.add(f"secret-{o['metadata']['name']}", as_secret(o), deps)
            for o in objs
            if o["kind"] == "Secret"
        ]
        self.release = charts.release(
            f"{name}-kube-prometheus-stack",
            charts.KUBE_PROMETHEUS_STACK,
            m.chart_version,
            m.namespace,
            stack_values(m),
            self.child_opts(depends_on=[*deps, *secrets]),
            release_name=m.release_name,
        )
        for obj in (o for o in objs if o["kind"] != "Secret"):
            self.add(
                f"{obj['kind'].lower()}-{obj['metadata']['name']}", obj, depends_on=[*deps, self.release]
            )
        if args.adapter:
            charts.release(
                f"{name}-prometheus-adapter",
                charts.PROMETHEUS_ADAPTER,
                m.adapter_chart_version,
                m.namespace,
                adapter_values(m),
                self.child_opts(depends_on=[self.release]),
            )
        self.prometheus_url = prometheus_url(m)
        self.register_outputs({"release": self.release, "prometheus_url": self.prometheus_url})
