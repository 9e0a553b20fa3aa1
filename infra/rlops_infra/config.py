"""The stack configuration: one typed model, validated whole before any resource exists.

A stack file (``stacks/Pulumi.<env>.yaml``) holds deployment facts under the ``rlops:`` namespace, one
top-level key per section (``rlops:cluster``, ``rlops:serving`` …). Secrets never appear in it as
plain text: they are separate keys set with ``pulumi config set --secret`` and referenced by name.

Every problem is reported at once, each as ``rlops:<key path>: <what is wrong>; <what is accepted>``,
so one ``pulumi preview`` lists everything to fix.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

NAMESPACE = "rlops"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"
CHART_VERSION = r"^v?[0-9]+\.[0-9]+\.[0-9]+$"
SECRET_KEY = r"^[a-z][a-zA-Z0-9]*$"
RELATIVE_PATH = r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$"
DURATION = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"

Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=50)]
Quantity = Annotated[str, Field(pattern=QUANTITY)]
ChartVersion = Annotated[str, Field(pattern=CHART_VERSION)]
SecretKey = Annotated[str, Field(pattern=SECRET_KEY)]


class ConfigError(ValueError):
    """The stack configuration is wrong; ``problems`` lists every finding, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid stack configuration:\n  " + "\n  ".join(problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- cluster ---------------------------------------------------------------------------------------


class NodeGroup(Section):
    """A GPU node group: created as an EKS managed node group, or described for an existing cluster."""

    name: Name
    instance_types: list[str] = []
    """EC2 instance types (EKS only), e.g. g5.xlarge."""
    capacity: Literal["on-demand", "spot"] = "on-demand"
    min_size: int = Field(default=0, ge=0)
    """0 lets the group scale from zero: GPU nodes exist only while GPU pods wait for them."""
    max_size: int = Field(default=1, ge=1, le=1000)
    desired_size: int = Field(default=0, ge=0)
    gpus_per_node: int = Field(default=1, ge=1, le=16)
    disk_gib: int = Field(default=200, ge=20, le=16384)

    @model_validator(mode="after")
    def _sizes(self) -> NodeGroup:
        if not self.min_size <= self.desired_size <= self.max_size:
            raise ValueError(
                f"sizes must satisfy min_size <= desired_size <= max_size, got "
                f"{self.min_size} <= {self.desired_size} <= {self.max_size}"
            )
        return self


class SystemNodes(Section):
    """The CPU node group for system pods, the Ray head, operators and monitoring (EKS only)."""

    instance_types: list[str] = Field(default=["m6i.xlarge"], min_length=1)
    min_size: int = Field(default=2, ge=1)
    max_size: int = Field(default=4, ge=1, le=1000)
    desired_size: int = Field(default=2, ge=1)
    disk_gib: int = Field(default=100, ge=20, le=16384)

    @model_validator(mode="after")
    def _sizes(self) -> SystemNodes:
        if not self.min_size <= self.desired_size <= self.max_size:
            raise ValueError(
                f"sizes must satisfy min_size <= desired_size <= max_size, got "
                f"{self.min_size} <= {self.desired_size} <= {self.max_size}"
            )
        return self


class Eks(Section):
    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]$")
    kubernetes_version: str = Field(default="1.33", pattern=r"^1\.[0-9]{2}$")
    vpc_id: str | None = None
    """An existing VPC; without it the cluster goes into the account's default VPC."""
    subnet_ids: list[str] = []
    system_nodes: SystemNodes = SystemNodes()
    autoscaler_chart_version: ChartVersion = "9.52.1"


class Cluster(Section):
    provider: Literal["eks", "kubeconfig"]
    """``eks`` creates the cluster; ``kubeconfig`` deploys into an existing one (kind, minikube, on-prem)."""
    context: str | None = None
    """kubeconfig context to use (kubeconfig only; default: the current context)."""
    kubeconfig: str | None = None
    """Path of the kubeconfig file (kubeconfig only; default: $KUBECONFIG or ~/.kube/config)."""
    eks: Eks | None = None
    gpu_node_groups: list[NodeGroup] = []
    device_plugin: bool = True
    """Install the NVIDIA device plugin on GPU nodes (turn off where the GPU operator already runs)."""
    device_plugin_chart_version: ChartVersion = "0.18.2"

    @model_validator(mode="after")
    def _provider(self) -> Cluster:
        if self.provider == "eks":
            if self.eks is None:
                raise ValueError("provider 'eks' needs an 'eks' section (region, system_nodes …)")
            if self.context or self.kubeconfig:
                raise ValueError("'context' and 'kubeconfig' apply to provider 'kubeconfig' only")
            for group in self.gpu_node_groups:
                if not group.instance_types:
                    raise ValueError(f"gpu_node_groups '{group.name}': EKS needs instance_types")
        elif self.eks is not None:
            raise ValueError("the 'eks' section applies to provider 'eks' only")
        names = [g.name for g in self.gpu_node_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"gpu_node_groups names must be unique, got {names}")
        return self

    @property
    def max_gpus_per_node(self) -> int:
        return max((g.gpus_per_node for g in self.gpu_node_groups), default=0)


# --- images, tenancy, storage ------------------------------------------------------------------------


def check_image(image: str) -> str:
    """An image reference pinned by tag or digest; ``latest`` and untagged references are refused."""
    if "@sha256:" in image:
        if not re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", image):
            raise ValueError(f"{image!r}: a digest must be sha256:<64 hex digits>")
        return image
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        raise ValueError(f"{image!r} has no tag; pin it as <repository>:<version> or <repository>@sha256:…")
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag):
        raise ValueError(f"{image!r}: tag {tag!r} is not a pinned version (never 'latest')")
    return image


class Images(Section):
    trainer: str
    """The trainer image (apps/trainer/Dockerfile): Ray head and workers, training jobs, OPE gate."""
    server: str
    """The server image (apps/server/Dockerfile): TorchServe and the model-store population job."""

    @field_validator("trainer", "server")
    @classmethod
    def _pinned(cls, value: str) -> str:
        return check_image(value)


class Team(Section):
    """A team namespace with its own quota: many concurrent jobs share the GPUs without starving others."""

    name: Name
    gpus: int = Field(ge=0, le=10_000)
    """Most GPUs the team's pods may request at once."""
    cpu: Quantity = "64"
    memory: Quantity = "256Gi"
    max_jobs: int = Field(default=100, ge=1, le=10_000)
    """Most Jobs and RayJobs that may exist at once in the namespace."""
    default_cpu: Quantity = "500m"
    default_memory: Quantity = "1Gi"
    max_container_gpus: int = Field(default=8, ge=1, le=16)


class Tenancy(Section):
    namespace: Name = "rlops"
    """Namespace of the stack's own workloads (Ray, training, serving)."""
    teams: list[Team] = []

    @model_validator(mode="after")
    def _unique(self) -> Tenancy:
        names = [t.name for t in self.teams]
        if len(set(names)) != len(names) or self.namespace in names:
            raise ValueError(f"team names must be unique and differ from namespace, got {names}")
        return self


def inside(value: str) -> str:
    """A relative path that stays inside its folder."""
    if ".." in value.split("/"):
        raise ValueError(f"{value!r} leaves its folder ('..' is not allowed)")
    return value


class Volume(Section):
    size: Quantity
    storage_class: Name
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = "ReadWriteOnce"


class StorageClassSpec(Section):
    """A storage class the stack creates (leave empty to use the cluster's own)."""

    name: Name
    provisioner: str = Field(pattern=r"^[a-z0-9.\-/]+$")
    parameters: dict[str, str] = {}
    reclaim_policy: Literal["Retain", "Delete"] = "Retain"
    volume_binding_mode: Literal["Immediate", "WaitForFirstConsumer"] = "WaitForFirstConsumer"


class Storage(Section):
    data: Volume
    """Datasets, the decision and reward logs, the loop's state."""
    models: Volume
    """The registry and the TorchServe model store: read by every serving pod at once."""
    classes: list[StorageClassSpec] = []
    logs: str = Field(default="logs", pattern=RELATIVE_PATH)
    """Log root inside the data volume, laid out as locally: serving writes ``decisions/``, the feedback
    service ``rewards/``; the OPE gate, the reward join and the loop read both."""

    @field_validator("logs")
    @classmethod
    def _inside(cls, value: str) -> str:
        return inside(value)


# --- workloads ---------------------------------------------------------------------------------------


class Resources(Section):
    cpu: Quantity
    memory: Quantity
    gpus: int = Field(default=0, ge=0, le=16)


class RayHead(Section):
    cpu: Quantity = "2"
    memory: Quantity = "8Gi"


class RayWorkers(Section):
    min_replicas: int = Field(default=0, ge=0)
    max_replicas: int = Field(default=4, ge=1, le=1000)
    cpu: Quantity = "8"
    memory: Quantity = "32Gi"
    gpus: int = Field(default=1, ge=0, le=16)

    @model_validator(mode="after")
    def _sizes(self) -> RayWorkers:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class Ray(Section):
    enabled: bool = True
    operator_chart_version: ChartVersion = "1.7.0"
    ray_version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    """Ray version inside the trainer image (KubeRay's rayVersion)."""
    head: RayHead = RayHead()
    gpu_workers: RayWorkers = RayWorkers()
    idle_timeout_seconds: int = Field(default=300, ge=30, le=86_400)


TRAINER_CONFIGS = "/opt/rlops-configs"
"""Where the trainer image holds the repository's configs/ (apps/trainer/Dockerfile)."""


class TrainingJob(Section):
    name: Name
    runner: Literal["ray", "job"]
    """``ray``: a RayJob with its own Ray cluster; ``job``: one batch/v1 Job."""
    algorithm: Literal["bc", "cql", "iql", "td3bc", "online"]
    """Offline (bc, cql, iql, and td3bc for Box actions: ``rlops train <algorithm> --data``) or on Ray
    (``rlops train online``)."""
    data: str | None = Field(default=None, pattern=RELATIVE_PATH)
    """Dataset path inside the data volume (offline algorithms)."""
    config: str | None = Field(default=None, pattern=RELATIVE_PATH)
    """Online training config inside the image's configs/ folder, e.g. online/cartpole-ppo.yaml (the
    hyperparameters live there, not in the stack)."""
    out: str = Field(pattern=RELATIVE_PATH)
    """Run directory inside the model volume."""
    resources: Resources = Resources(cpu="4", memory="16Gi", gpus=1)
    ray_workers: int = Field(default=2, ge=1, le=1000)
    parallelism: int = Field(default=1, ge=1, le=100)
    backoff_limit: int = Field(default=2, ge=0, le=20)
    ttl_seconds_after_finished: int = Field(default=3600, ge=0, le=604_800)
    active_deadline_seconds: int = Field(default=86_400, ge=60, le=2_592_000)

    @field_validator("data", "out", "config")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        return None if value is None else inside(value)

    @model_validator(mode="after")
    def _inputs(self) -> TrainingJob:
        if self.algorithm == "online":
            if self.config is None or self.data is not None:
                raise ValueError(f"job '{self.name}': online training takes 'config' (and no 'data')")
            if self.runner != "ray":
                raise ValueError(f"job '{self.name}': online training runs on Ray; accepted runner: ray")
        elif self.data is None or self.config is not None:
            raise ValueError(
                f"job '{self.name}': offline algorithm {self.algorithm} takes 'data' (and no 'config')"
            )
        elif self.algorithm == "td3bc" and self.runner != "job":
            # Ray Train's data-parallel path takes Discrete actions only; td3bc is for Box actions.
            raise ValueError(
                f"job '{self.name}': td3bc trains Box-action data, which Ray Train does not take; "
                "accepted runner: job"
            )
        return self


class Training(Section):
    jobs: list[TrainingJob] = []

    @model_validator(mode="after")
    def _unique(self) -> Training:
        names = [j.name for j in self.jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"job names must be unique, got {names}")
        return self


class Autoscaling(Section):
    enabled: bool = False
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1, le=1000)
    metric: Literal["queue-latency", "cpu"] = "queue-latency"
    """``queue-latency``: mean time requests wait in TorchServe's queue (through prometheus-adapter);
    ``cpu``: CPU utilisation of the pods."""
    target: float = Field(default=0.02, gt=0)
    """Seconds of queue wait per request (queue-latency) or percent of the CPU request (cpu)."""

    @model_validator(mode="after")
    def _sizes(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class Serving(Section):
    policy: Name
    """Policy name in the registry on the model volume."""
    version: int = Field(ge=1)
    """Registry version this deployment serves (the candidate while a canary runs)."""
    previous_version: int | None = Field(default=None, ge=1)
    """The version it replaces: the champion the canary analysis compares against."""
    replicas: int = Field(default=1, ge=1, le=1000)
    resources: Resources = Resources(cpu="2", memory="4Gi")
    workers: int = Field(default=1, ge=1, le=64)
    """Model workers per policy version in each pod. With one, a worker that dies leaves its version
    unanswered for about 3 s while TorchServe starts another (docs/benchmarks.md, robustness: 0.9 % of
    requests failed at 400 requests/s); with two, the other keeps answering (0.004 %)."""
    batch_size: int = Field(default=16, ge=1, le=4096)
    batcher: Literal["adaptive", "delay"] = "adaptive"
    """``adaptive`` (rlops' batcher): a request that finds a worker idle is sent at once, and a worker
    that finds requests waiting fills its batch for up to ``max_batch_delay_ms``; ``delay``:
    TorchServe's, which waits up to ``max_batch_delay_ms`` for every batch that is not full."""
    max_batch_delay_ms: int = Field(default=1, ge=1, le=10_000)
    autoscaling: Autoscaling = Autoscaling()
    pdb_min_available: int = Field(default=0, ge=0)
    """Pods kept through voluntary disruptions (0: no PodDisruptionBudget)."""
    client_namespaces: list[Name] = []
    """Namespaces whose pods may call the inference API (besides the stack's own namespace)."""

    @model_validator(mode="after")
    def _versions(self) -> Serving:
        if self.previous_version is not None and self.previous_version == self.version:
            raise ValueError(f"previous_version must differ from version ({self.version})")
        if self.pdb_min_available and self.pdb_min_available >= self.min_pods:
            raise ValueError(
                f"pdb_min_available ({self.pdb_min_available}) must be below the fewest pods "
                f"({self.min_pods}), or no node could ever be drained"
            )
        return self

    @property
    def min_pods(self) -> int:
        return self.autoscaling.min_replicas if self.autoscaling.enabled else self.replicas


class Monitoring(Section):
    enabled: bool = True
    namespace: Name = "monitoring"
    release_name: Annotated[str, Field(pattern=DNS_LABEL, max_length=26)] = "kube-prometheus-stack"
    """Helm release name; the chart's Prometheus selects rules and monitors labelled release=<this>."""
    chart_version: ChartVersion = "88.5.3"
    retention: str = Field(default="15d", pattern=r"^[0-9]+(h|d|w|y)$")
    prometheus_storage: Quantity = "50Gi"
    storage_class: Name | None = None
    grafana_admin_password: SecretKey = "grafanaAdminPassword"
    """Config key of the Grafana admin password (set with ``pulumi config set --secret``)."""
    adapter_chart_version: ChartVersion = "5.3.0"


class Receiver(Section):
    """An Alertmanager receiver; its credential comes from a secret config key, never the stack file."""

    name: Name
    type: Literal["pagerduty", "slack", "webhook", "none"]
    """``none`` drops what is routed to it: say so explicitly, e.g. for a dev stack without on-call."""
    secret: SecretKey | None = None
    """Config key holding the PagerDuty routing key, Slack webhook URL or webhook URL."""
    channel: str | None = None
    """Slack channel (slack only)."""
    url: str | None = None
    """In-cluster webhook URL (webhook only, when it carries no credential)."""

    @model_validator(mode="after")
    def _fields(self) -> Receiver:
        if self.type in ("pagerduty", "slack") and not self.secret:
            raise ValueError(f"receiver '{self.name}' of type {self.type} needs 'secret'")
        if self.type == "none" and (self.secret or self.url):
            raise ValueError(f"receiver '{self.name}' of type none takes no 'secret' or 'url'")
        if self.type == "webhook" and bool(self.secret) == bool(self.url):
            raise ValueError(f"receiver '{self.name}' of type webhook needs exactly one of 'secret', 'url'")
        if self.channel is not None and self.type != "slack":
            raise ValueError(f"receiver '{self.name}': 'channel' applies to slack only")
        if self.url is not None and not re.fullmatch(r"https?://[^\s]+", self.url):
            raise ValueError(f"receiver '{self.name}': url must be http(s)://…, got {self.url!r}")
        return self


class Alerting(Section):
    receivers: list[Receiver] = []
    """Receivers by name; they replace the same-named receivers of alerts/alertmanager.yaml."""
    secrets: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")], SecretKey] = {}
    """Credential files the Alertmanager config reads from its mounted Secret, each filled from a secret
    config key: ``pagerduty-routing-key: pagerdutyRoutingKey``."""

    @model_validator(mode="after")
    def _unique(self) -> Alerting:
        names = [r.name for r in self.receivers]
        if len(set(names)) != len(names):
            raise ValueError(f"receiver names must be unique, got {names}")
        return self


class Delivery(Section):
    enabled: bool = False
    """Serve through an Argo Rollouts canary with analysis instead of a plain Deployment."""
    chart_version: ChartVersion = "2.41.1"
    steps: list[int] = [10, 50, 100]
    """Canary traffic weights in percent, increasing, ending at 100."""
    pause_seconds: int = Field(default=300, ge=0, le=86_400)
    """Time at each weight below 100 while the analysis runs."""
    ope_gate: bool = True
    """Run OPE of the candidate on the served logs (``storage.logs``) before any traffic moves."""
    inconclusive_limit: int = Field(default=10, ge=0, le=1000)
    """Measurements without enough samples tolerated before the rollout pauses for a human."""

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        if not steps or steps[-1] != 100:
            raise ValueError(f"steps must end at 100, got {steps}")
        if any(not 0 < s <= 100 for s in steps) or any(a >= b for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must be increasing weights in 1..100, got {steps}")
        return steps


class Feedback(Section):
    """The reward feedback service (``rlops feedback serve``): producers post rewards by decision_id, it
    appends them to the log root's ``rewards/`` beside serving's ``decisions/``."""

    enabled: bool = True
    replicas: int = Field(default=1, ge=1, le=100)
    """Pods behind the Service; from 2 on a PodDisruptionBudget keeps all but one through drains."""
    resources: Resources = Resources(cpu="500m", memory="1Gi")
    token: SecretKey = "feedbackToken"
    """Config key of the bearer token ``POST /rewards`` must present (set with ``pulumi config set
    --secret``)."""

    @field_validator("resources")
    @classmethod
    def _cpu_only(cls, value: Resources) -> Resources:
        if value.gpus:
            raise ValueError(
                f"the feedback service validates and appends rewards: it takes no GPU, got {value.gpus}"
            )
        return value


CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_CRON_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_CRON_ITEM = re.compile(r"^(\*|\?|([A-Za-z0-9]+)(?:-([A-Za-z0-9]+))?)(?:/([0-9]+))?$")


def _cron_number(text: str, name: str, low: int, high: int, names: tuple[str, ...]) -> int:
    upper = text.upper()
    if upper in names:
        return low + names.index(upper)
    if not text.isdigit() or not low <= int(text) <= high:
        named = f" or {names[0]}-{names[-1]}" if names else ""
        raise ValueError(f"{name} {text!r} is outside {low}-{high}{named}")
    return int(text)


def check_cron(schedule: str) -> str:
    """A Kubernetes CronJob schedule: five fields (minute hour day-of-month month day-of-week) of ``*``,
    numbers, ranges, lists and steps, or one of the macros."""
    if schedule in CRON_MACROS:
        return schedule
    fields = schedule.split()
    if len(fields) != 5:
        raise ValueError(
            f"{schedule!r} is not a schedule: five fields (minute hour day-of-month month day-of-week, "
            f"e.g. '0 */6 * * *') or one of {', '.join(CRON_MACROS)}"
        )
    for text, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        for item in text.split(","):
            match = _CRON_ITEM.match(item)
            if match is None or (item.startswith("?") and name not in ("day of month", "day of week")):
                raise ValueError(
                    f"{name} {item!r} in {schedule!r}: accepted are *, N, N-M, */S, N-M/S and lists"
                )
            if match.group(2) is not None:
                first = _cron_number(match.group(2), name, low, high, names)
                last = _cron_number(match.group(3), name, low, high, names) if match.group(3) else first
                if first > last:
                    raise ValueError(f"{name} range {item!r} in {schedule!r} runs backwards")
            if match.group(4) is not None and int(match.group(4)) < 1:
                raise ValueError(f"{name} step {item!r} in {schedule!r} must be at least 1")
    return schedule


class LoopGate(Section):
    """The loop's OPE gate of its candidate against the champion (``gate:`` of the loop config); unset
    keys keep the loop's defaults."""

    estimator: str | None = None
    """Estimator the gate decides on (default: dr with propensities, else fqe)."""
    margin: float | None = Field(default=None, ge=0)
    relative: bool | None = None
    against: Literal["value", "upper"] | None = None
    gamma: float | None = Field(default=None, gt=0, le=1)
    confidence: float | None = Field(default=None, gt=0, lt=1)
    bootstrap: int | None = Field(default=None, ge=1)
    fqe_steps: int | None = Field(default=None, ge=1)
    fqe_models: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0)


TrainValue = bool | int | float | str | list[int] | list[float]


class Loop(Section):
    """The continuous-learning loop on a schedule: a CronJob running ``rlops loop run-once`` in the trainer
    image. The keys between ``algorithm`` and ``gate`` are those of the loop config (its ``policy`` is
    ``serving.policy``); unset ones keep the loop's defaults."""

    enabled: bool = False
    schedule: str = "0 */6 * * *"
    """Cron schedule of the iterations (at most one runs at a time)."""
    time_zone: str = Field(default="Etc/UTC", pattern=r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$")
    """IANA time zone the schedule is read in."""
    algorithm: Literal["bc", "cql", "iql", "td3bc"] | None = None
    """Offline algorithm that retrains the policy (default: cql; td3bc for Box actions only)."""
    train: dict[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_]*$")], TrainValue] = {}
    """Fields of the algorithm's config, as ``rlops train ALGO --set``: e.g. ``steps: 20000``."""
    min_new_transitions: int | None = Field(default=None, ge=1)
    """Rewarded transitions in new decision files needed to retrain (default: 1000)."""
    reward_wait: str | None = Field(default=None, pattern=DURATION)
    """Age a decision file must reach before its rewards count as arrived (default: 1m)."""
    max_decision_files: int | None = Field(default=None, ge=0)
    """Train on at most this many of the latest decision files (default 0: all consumed so far)."""
    gate: LoopGate = LoopGate()
    resources: Resources = Resources(cpu="4", memory="16Gi")
    """The loop's pod: it joins, trains and evaluates in one process."""
    starting_deadline_seconds: int = Field(default=600, ge=10, le=86_400)
    """A run that could not start within this long after its time is skipped, not started late."""
    active_deadline_seconds: int = Field(default=21_600, ge=60, le=604_800)
    backoff_limit: int = Field(default=1, ge=0, le=10)
    """Retries of a failed run (an interrupted iteration resumes where it stopped)."""
    successful_jobs_history_limit: int = Field(default=3, ge=0, le=100)
    failed_jobs_history_limit: int = Field(default=3, ge=0, le=100)

    @model_validator(mode="before")
    @classmethod
    def _no_local_canary(cls, data: Any) -> Any:
        if isinstance(data, dict) and "canary" in data:
            raise ValueError(
                "'canary' is the local canary's steps and timing; in the cluster Argo Rollouts runs the "
                "canary, configured by rlops:delivery (steps, pause_seconds)"
            )
        return data

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)


ENVIRONMENTS = ("dev", "staging", "prod")


class StackConfig(Section):
    environment: Literal["dev", "staging", "prod"]
    cluster: Cluster
    images: Images
    tenancy: Tenancy = Tenancy()
    storage: Storage
    ray: Ray
    training: Training = Training()
    serving: Serving
    monitoring: Monitoring = Monitoring()
    alerting: Alerting = Alerting()
    delivery: Delivery = Delivery()
    feedback: Feedback = Feedback()
    loop: Loop = Loop()

    def gpu_requests(self) -> dict[str, int]:
        """Per-pod GPU requests by where they come from (``rlops:<key>``), for the GPU node rule."""
        asks = {"serving.resources.gpus": self.serving.resources.gpus}
        if self.ray.enabled:
            asks["ray.gpu_workers.gpus"] = self.ray.gpu_workers.gpus
        for i, job in enumerate(self.training.jobs):
            asks[f"training.jobs[{i}].resources.gpus"] = job.resources.gpus
        if self.loop.enabled:
            asks["loop.resources.gpus"] = self.loop.resources.gpus
        return {k: v for k, v in asks.items() if v > 0}

    def secret_keys(self) -> dict[str, str]:
        """Secret config keys the stack needs, each with where it is referenced."""
        keys = {self.monitoring.grafana_admin_password: "monitoring.grafana_admin_password"}
        for i, r in enumerate(self.alerting.receivers):
            if r.secret:
                keys[r.secret] = f"alerting.receivers[{i}].secret"
        for file, key in self.alerting.secrets.items():
            keys[key] = f"alerting.secrets.{file}"
        if self.feedback.enabled:
            keys[self.feedback.token] = "feedback.token"
        return keys


SECTIONS = tuple(StackConfig.model_fields)


def _cross_field(cfg: StackConfig) -> list[str]:
    problems = []
    if cfg.environment == "prod":
        if cfg.serving.min_pods < 2:
            problems.append(
                f"rlops:serving.replicas: prod serves from at least 2 pods, got {cfg.serving.min_pods} "
                "(with autoscaling: autoscaling.min_replicas)"
            )
        if cfg.serving.pdb_min_available < 1:
            problems.append("rlops:serving.pdb_min_available: prod needs a PodDisruptionBudget (>= 1)")
    shared = {
        "models": "the model store is read by serving pods on many nodes",
        "data": "serving pods on many nodes write decision logs into it",
    }
    for volume, why in shared.items():
        mode = getattr(cfg.storage, volume).access_mode
        if cfg.environment != "dev" and mode != "ReadWriteMany":
            problems.append(
                f"rlops:storage.{volume}.access_mode: {why}; accepted: ReadWriteMany "
                f"(ReadWriteOnce only in dev, on one node), got {mode}"
            )
    gpus = cfg.gpu_requests()
    if gpus and not cfg.cluster.gpu_node_groups:
        problems.append(
            "rlops:cluster.gpu_node_groups: GPUs are requested by "
            + ", ".join(f"rlops:{k}={v}" for k, v in gpus.items())
            + " but no GPU node group exists; add one or set those to 0"
        )
    elif gpus:
        most = cfg.cluster.max_gpus_per_node
        for key, count in gpus.items():
            if count > most:
                problems.append(f"rlops:{key}: {count} GPUs per pod, but the largest GPU node has {most}")
    scaling = cfg.serving.autoscaling
    if scaling.enabled and scaling.metric == "queue-latency" and not cfg.monitoring.enabled:
        problems.append(
            "rlops:serving.autoscaling.metric: queue-latency needs monitoring.enabled (Prometheus and "
            "prometheus-adapter); accepted without it: cpu"
        )
    if cfg.delivery.enabled:
        if not cfg.monitoring.enabled:
            problems.append(
                "rlops:delivery.enabled: the canary analysis queries Prometheus; enable monitoring"
            )
        if cfg.serving.previous_version is None:
            problems.append(
                "rlops:serving.previous_version: the canary compares the candidate (serving.version) with "
                "the champion it replaces; set the champion's version"
            )
    if any(j.runner == "ray" for j in cfg.training.jobs) and not cfg.ray.enabled:
        problems.append("rlops:training.jobs: jobs with runner 'ray' need ray.enabled: true")
    if cfg.loop.enabled and not cfg.feedback.enabled:
        problems.append(
            "rlops:loop.enabled: the loop trains on the rewards the feedback service writes; "
            "set rlops:feedback.enabled: true"
        )
    return problems


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            out += f".{part}"
    return out


def _accepted(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names accepted at ``loc`` (for 'unknown key' errors)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if current is not None else None
        current = _model_of(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _messages(error: ValidationError) -> list[str]:
    problems = []
    for e in error.errors():
        key = f"{NAMESPACE}:{_path(e['loc'])}" if e["loc"] else f"{NAMESPACE}:<stack>"
        if e["type"] == "extra_forbidden":
            accepted = _accepted(StackConfig, e["loc"])
            problems.append(f"{key}: unknown key; accepted here: {', '.join(accepted)}")
        elif e["type"] == "missing":
            problems.append(f"{key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            given = e.get("input")
            shown = "" if isinstance(given, dict | list) or given is None else f" (got {given!r})"
            problems.append(f"{key}: {msg}{shown}")
    return problems


def parse(
    values: Mapping[str, Any], secret_keys: set[str] | frozenset[str] = frozenset()
) -> tuple[StackConfig, dict[str, str]]:
    """Validate the ``rlops:`` config of a stack; returns the model and the secret values it references.

    ``values`` maps full keys (``rlops:serving``) to their values: objects as parsed YAML/JSON or as
    JSON text (how Pulumi hands them to the program). ``secret_keys`` names the keys Pulumi holds as
    secrets. Raises :class:`ConfigError` listing every problem.
    """
    sections: dict[str, Any] = {}
    secrets_given: dict[str, Any] = {}
    problems: list[str] = []
    for full_key, raw in values.items():
        ns, _, key = full_key.partition(":")
        if ns != NAMESPACE:
            continue
        value = raw
        if isinstance(raw, str) and raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append(f"{full_key}: not valid structured config ({exc.msg})")
                continue
        if key in SECTIONS:
            sections[key] = value
        else:
            secrets_given[key] = value
    try:
        cfg = StackConfig.model_validate(sections)
    except ValidationError as exc:
        raise ConfigError(problems + _messages(exc)) from None
    needed = cfg.secret_keys()
    secrets: dict[str, str] = {}
    for key, value in secrets_given.items():
        full = f"{NAMESPACE}:{key}"
        if key not in needed:
            problems.append(
                f"{full}: unknown key; accepted: {', '.join(SECTIONS)} and the secret keys the stack "
                f"references ({', '.join(sorted(needed)) or 'none'})"
            )
        elif full not in secret_keys:
            problems.append(
                f"{full}: holds a plaintext value; secrets are set with "
                f"`pulumi config set --secret {key} <value>` (referenced by rlops:{needed[key]})"
            )
        elif not isinstance(value, str) or not value:
            problems.append(f"{full}: must be a non-empty string")
        else:
            secrets[key] = value
    for key, where in needed.items():
        if key not in secrets_given:
            problems.append(
                f"{NAMESPACE}:{key}: missing secret (referenced by rlops:{where}); set it with "
                f"`pulumi config set --secret {key} <value>`"
            )
    problems += _cross_field(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg, secrets
