"""The Pulumi program: read the stack config, validate it and the repository files it deploys (all before
any resource exists), then build one component per concern."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pulumi
from pulumi.runtime import config as runtime_config

from rlops_infra import config as cfg
from rlops_infra import delivery, feedback, loop, monitoring, ray, serving, storage, tenancy, training
from rlops_infra.cluster import Cluster, ClusterArgs
from rlops_infra.files import FilesError, RepoFiles
from rlops_infra.k8s import cpu_cores

COMPONENT_SECTIONS: dict[str, tuple[str, ...]] = {
    "cluster": ("cluster",),
    "tenancy": ("tenancy", "monitoring", "ray", "delivery"),
    "storage": ("storage", "tenancy", "images", "serving"),
    "monitoring": ("monitoring", "alerting", "serving", "tenancy"),
    "ray": ("ray", "tenancy", "images", "monitoring"),
    "training": ("training", "ray", "tenancy", "images", "monitoring"),
    "delivery": ("delivery", "tenancy", "images", "monitoring", "storage"),
    "serving": ("serving", "tenancy", "images", "monitoring", "alerting", "delivery", "storage"),
    "feedback": ("feedback", "serving", "tenancy", "images", "monitoring", "storage"),
    "loop": ("loop", "serving", "tenancy", "images", "monitoring", "storage"),
}
"""The config sections each component reads: a component whose sections are equal in two stacks renders
the same objects in both (checked by the render tests)."""


@dataclass(frozen=True)
class Plan:
    """Everything validated, ready to build."""

    config: cfg.StackConfig
    secrets: dict[str, str]
    files: RepoFiles
    alertmanager: dict[str, Any] | None = None
    """The cluster's Alertmanager config (None: monitoring is off)."""


def read_pulumi_config() -> tuple[dict[str, Any], set[str]]:
    """Every ``rlops:`` key Pulumi hands the program, and which of them are secrets."""
    values: dict[str, Any] = dict(runtime_config.get_config_env())
    values.update(runtime_config.CONFIG.get())
    secret_keys = set(runtime_config.get_config_secret_keys_env())
    secret_keys |= {k for k in values if runtime_config.is_config_secret(k)}
    return {k: v for k, v in values.items() if k.startswith(f"{cfg.NAMESPACE}:")}, secret_keys


def plan(values: dict[str, Any], secret_keys: set[str], files: RepoFiles | None = None) -> Plan:
    """Validate config and files together; raises :class:`config.ConfigError` listing every problem."""
    config, secrets = cfg.parse(values, secret_keys)
    try:
        repo = files if files is not None else RepoFiles.load()
    except FilesError as exc:
        raise cfg.ConfigError([str(exc)]) from None
    problems = []
    if config.delivery.enabled and repo.analysis is None:
        problems.append(
            "rlops:delivery.enabled: alerts/canary/analysis.yaml is missing; the canary has no checks"
        )
    if config.loop.enabled:
        if repo.analysis is None:
            problems.append(
                "rlops:loop.enabled: alerts/canary/analysis.yaml is missing; rlops loop run-once reads it"
            )
        problems += loop.check(config)
    alertmanager = None
    if config.monitoring.enabled:
        try:
            alertmanager = monitoring.alertmanager_config(
                repo.alertmanager,
                str(repo.alertmanager_path or "alerts/"),
                config.alerting,
                config.environment,
                config.tenancy.namespace,
            )
        except cfg.ConfigError as exc:
            problems += exc.problems
    if problems:
        raise cfg.ConfigError(problems)
    return Plan(config=config, secrets=secrets, files=repo, alertmanager=alertmanager)


def actions_hook(p: Plan) -> serving.Actions | None:
    """The actions webhook beside TorchServe, when Alertmanager posts to it, with the token it sends."""
    token_file = monitoring.actions_token_file(p.alertmanager) if p.alertmanager else None
    if token_file is None:
        return None
    s = p.config.serving
    return serving.Actions(
        token=monitoring.secret_files(p.config.alerting, p.secrets)[token_file],
        # One torch thread per worker: workers beyond the pod's cores only queue for CPU.
        max_workers=min(64, max(s.workers, math.floor(cpu_cores(s.resources.cpu)))),
    )


def build(p: Plan) -> dict[str, pulumi.Resource]:
    """Create every component; returns them by name."""
    c = p.config
    ns = c.tenancy.namespace
    stack = pulumi.get_stack()
    cluster = Cluster(
        "cluster",
        ClusterArgs(cluster=c.cluster, cluster_name=f"rlops-{stack}", tags={"rlops.dev/stack": stack}),
    )
    opts = pulumi.ResourceOptions(providers=[cluster.provider])
    extra_ns = []
    if c.monitoring.enabled:
        extra_ns.append(c.monitoring.namespace)
    if c.ray.enabled:
        extra_ns.append(ray.OPERATOR_NAMESPACE)
    if c.delivery.enabled:
        extra_ns.append(delivery.NAMESPACE)
    ten = tenancy.Tenancy("tenancy", tenancy.TenancyArgs(c.tenancy, tuple(extra_ns)), opts)
    namespaces = list(ten.namespaces.values())
    archives = storage.ArchiveSpec(
        policy=c.serving.policy,
        versions=tuple(v for v in (c.serving.previous_version, c.serving.version) if v is not None),
        workers=c.serving.workers,
        batch_size=c.serving.batch_size,
        max_batch_delay_ms=c.serving.max_batch_delay_ms,
        batcher=c.serving.batcher,
    )
    store = storage.Storage(
        "storage", storage.StorageArgs(c.storage, ns, c.images.server, archives), opts, depends_on=namespaces
    )
    built: dict[str, pulumi.Resource] = {"cluster": cluster, "tenancy": ten, "storage": store}
    monitor_labels = monitoring.selector_labels(c.monitoring) if c.monitoring.enabled else None
    after: list[pulumi.Resource] = list(namespaces)
    if c.monitoring.enabled:
        mon = monitoring.Monitoring(
            "monitoring",
            monitoring.MonitoringArgs(
                monitoring=c.monitoring,
                alerting=c.alerting,
                environment=c.environment,
                secrets=p.secrets,
                files=p.files,
                adapter=c.serving.autoscaling.enabled and c.serving.autoscaling.metric == "queue-latency",
                actions_namespace=ns,
            ),
            opts,
            depends_on=namespaces,
        )
        built["monitoring"] = mon
        # ServiceMonitor and PodMonitor kinds exist once the chart installed its CRDs.
        after.append(mon.release)
    if c.ray.enabled:
        r = ray.Ray(
            "ray",
            ray.RayArgs(c.ray, ns, c.images.trainer, store.data_claim, store.models_claim, monitor_labels),
            opts,
            depends_on=[*after, store],
        )
        built["ray"] = r
        if c.training.jobs:
            built["training"] = training.Training(
                "training",
                training.TrainingArgs(
                    c.training,
                    c.ray,
                    ns,
                    c.images.trainer,
                    store.data_claim,
                    store.models_claim,
                    monitor_labels,
                ),
                opts,
                depends_on=[r.operator, store, *after],
            )
    elif c.training.jobs:
        built["training"] = training.Training(
            "training",
            training.TrainingArgs(
                c.training, c.ray, ns, c.images.trainer, store.data_claim, store.models_claim, monitor_labels
            ),
            opts,
            depends_on=[store, *after],
        )
    canary = None
    serving_deps: list[pulumi.Resource] = [*after, *store.archive_jobs]
    if c.delivery.enabled and p.files.analysis is not None and "monitoring" in built:
        d = delivery.Delivery(
            "delivery",
            delivery.DeliveryArgs(
                delivery=c.delivery,
                analysis=p.files.analysis,
                namespace=ns,
                prometheus_url=monitoring.prometheus_url(c.monitoring),
                trainer_image=c.images.trainer,
                data_claim=store.data_claim,
                models_claim=store.models_claim,
                logs=c.storage.logs,
            ),
            opts,
            depends_on=after,
        )
        built["delivery"] = d
        serving_deps.append(d)
        canary = serving.Canary(
            steps=tuple(c.delivery.steps),
            pause_seconds=c.delivery.pause_seconds,
            analysis_template=delivery.CANARY_TEMPLATE,
            ope_template=delivery.OPE_TEMPLATE if c.delivery.ope_gate else None,
            args=(
                ("policy", c.serving.policy),
                ("candidate", str(c.serving.version)),
                ("champion", str(c.serving.previous_version)),
            ),
        )
    built["serving"] = serving.Serving(
        "serving",
        serving.ServingArgs(
            serving=c.serving,
            namespace=ns,
            server_image=c.images.server,
            data_claim=store.data_claim,
            models_claim=store.models_claim,
            logs=c.storage.logs,
            monitoring_namespace=c.monitoring.namespace if c.monitoring.enabled else None,
            monitor_labels=monitor_labels,
            canary=canary,
            actions=actions_hook(p),
        ),
        opts,
        depends_on=serving_deps,
    )
    if c.feedback.enabled:
        fb = feedback.Feedback(
            "feedback",
            feedback.FeedbackArgs(
                feedback=c.feedback,
                namespace=ns,
                server_image=c.images.server,
                data_claim=store.data_claim,
                logs=c.storage.logs,
                token=p.secrets[c.feedback.token],
                client_namespaces=tuple(c.serving.client_namespaces),
                monitoring_namespace=c.monitoring.namespace if c.monitoring.enabled else None,
                monitor_labels=monitor_labels,
            ),
            opts,
            depends_on=[*after, store],
        )
        built["feedback"] = fb
        pulumi.export("feedback_url", fb.url)
    if c.loop.enabled and p.files.analysis is not None:
        built["loop"] = loop.Loop(
            "loop",
            loop.LoopArgs(
                loop=c.loop,
                policy=c.serving.policy,
                namespace=ns,
                trainer_image=c.images.trainer,
                data_claim=store.data_claim,
                models_claim=store.models_claim,
                logs=c.storage.logs,
                analysis=p.files.analysis.text,
                prometheus_url=monitoring.prometheus_url(c.monitoring) if c.monitoring.enabled else None,
            ),
            opts,
            depends_on=[*after, store],
        )
    pulumi.export("environment", c.environment)
    pulumi.export("namespace", ns)
    pulumi.export("inference_url", built["serving"].url)  # type: ignore[attr-defined]
    if c.monitoring.enabled:
        pulumi.export("prometheus_url", monitoring.prometheus_url(c.monitoring))
    return built


def main() -> None:
    values, secret_keys = read_pulumi_config()
    try:
        p = plan(values, secret_keys)
    except cfg.ConfigError as exc:
        # One readable list instead of a traceback; nothing has been created.
        raise pulumi.RunError(str(exc)) from None
    build(p)
