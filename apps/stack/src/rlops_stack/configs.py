"""What the local monitoring stack runs with: its settings, and the Prometheus and Alertmanager configs
generated from the repository's ``alerts/`` (the files the cluster loads, with the local differences
that :mod:`rlops_stack.local` describes). :mod:`rlops_stack.local` starts the processes with them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rlops_contracts.metrics import (
    JOB_ACTIONS,
    JOB_FEEDBACK,
    JOB_TORCHSERVE,
    JOB_TRAINER,
    PORT_ACTIONS_WEBHOOK,
    PORT_ALERTMANAGER,
    PORT_FEEDBACK,
    PORT_PROMETHEUS,
    PORT_TRAINER_METRICS,
    PORT_TS_METRICS,
)

ALERTS_ENV = "RLOPS_ALERTS_DIR"
RULES_SUBDIR = "rules"
ALERTMANAGER_FILE = "alertmanager.yaml"
CLUSTER_SECRETS_DIR = "/etc/alertmanager/secrets"
ACTIONS_RECEIVER = "rlops-actions"
WEBHOOK_PATH = "/alerts"
LOCAL_ENVIRONMENT = "local"
WEBHOOK_LOG_MAX_BYTES = 10 << 20
"""Size at which the webhook's log rolls over (``rlops stack up --webhook-log-max-bytes``)."""


class StackError(RuntimeError):
    """The stack could not be configured, started, reached or stopped; the message says why."""


@dataclass(frozen=True)
class Target:
    """One scrape target: a Prometheus job and the ``host:port`` it scrapes."""

    job: str
    address: str
    metrics_path: str = "/metrics"

    def __post_init__(self) -> None:
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise StackError(f"scrape target {self.job!r}: address {self.address!r} is not HOST:PORT")
        if not self.job or not self.metrics_path.startswith("/"):
            raise StackError(
                f"scrape target {self.job!r}: needs a job name and a metrics path starting with /"
            )

    @classmethod
    def parse(cls, text: str) -> Target:
        """``JOB=HOST:PORT[/PATH]`` (the form of ``rlops stack up --target``)."""
        job, sep, rest = text.partition("=")
        if not sep:
            raise StackError(
                f"--target {text!r}: expected JOB=HOST:PORT[/PATH], e.g. torchserve=127.0.0.1:8082"
            )
        address, slash, path = rest.partition("/")
        return cls(job.strip(), address.strip(), "/" + path if slash else "/metrics")


def default_targets(webhook_port: int = PORT_ACTIONS_WEBHOOK) -> tuple[Target, ...]:
    """TorchServe's metrics port, the feedback service, the trainer and the actions webhook."""
    return (
        Target(JOB_TORCHSERVE, f"127.0.0.1:{PORT_TS_METRICS}"),
        Target(JOB_FEEDBACK, f"127.0.0.1:{PORT_FEEDBACK}"),
        Target(JOB_TRAINER, f"127.0.0.1:{PORT_TRAINER_METRICS}"),
        Target(JOB_ACTIONS, f"127.0.0.1:{webhook_port}"),
    )


@dataclass(frozen=True)
class WebhookSettings:
    """What the actions webhook acts on, and how far it may scale (see rlops_stack.webhook)."""

    registry: Path = Path(".rlops/registry")
    """Registry whose champion alias a rollback moves."""
    serve_run_dir: Path = Path(".rlops/serve")
    """Run directory of the local TorchServe (its management URL and keys)."""
    max_workers: int = 4
    """Scale-up never goes beyond this many workers per policy version."""
    scale_step: int = 1
    """Workers added per scale-up."""
    cooldown_s: float = 300.0
    """An action for the same policy version is not repeated within this many seconds."""
    management_url: str | None = None
    """TorchServe's management API where there is no local run directory (a cluster); None: read it
    from ``serve_run_dir``."""
    management_token_file: Path | None = None
    """File holding the management key, with ``management_url``."""

    def __post_init__(self) -> None:
        if type(self.max_workers) is not int or not 1 <= self.max_workers <= 64:
            raise StackError(f"max_workers must be an integer in [1, 64], got {self.max_workers!r}")
        if type(self.scale_step) is not int or not 1 <= self.scale_step <= 64:
            raise StackError(f"scale_step must be an integer in [1, 64], got {self.scale_step!r}")
        if not self.cooldown_s >= 0:
            raise StackError(f"cooldown_s must be >= 0, got {self.cooldown_s!r}")


@dataclass(frozen=True)
class StackSettings:
    """Everything that shapes the generated configs. Intervals and overrides are in seconds."""

    scrape_interval: float = 15.0
    evaluation_interval: float = 15.0
    prometheus_port: int = PORT_PROMETHEUS
    alertmanager_port: int = PORT_ALERTMANAGER
    webhook_port: int = PORT_ACTIONS_WEBHOOK
    targets: tuple[Target, ...] = ()
    """Scrape targets besides Prometheus and Alertmanager themselves; empty: :func:`default_targets`."""
    alert_for: float | None = None
    """Replace every alert's ``for:`` in the generated rule copies (the test profile); None keeps them."""
    group_wait: float | None = None
    group_interval: float | None = None
    repeat_interval: float | None = None
    """Replace Alertmanager's timing on every route that sets it; None keeps the cluster's."""
    webhook: WebhookSettings | None = field(default_factory=WebhookSettings)
    """None: no webhook; the actions receiver then notifies nobody."""
    retention: str = "7d"
    webhook_log_max_bytes: int = WEBHOOK_LOG_MAX_BYTES
    """The webhook's log rolls over at this size (``LOG_BACKUPS`` kept)."""

    def __post_init__(self) -> None:
        for name in ("scrape_interval", "evaluation_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0.1 <= value <= 3600:
                raise StackError(f"{name} must be between 0.1 and 3600 seconds, got {value!r}")
        for name in ("alert_for", "group_wait", "group_interval", "repeat_interval"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or not 0 <= value <= 7 * 86400):
                raise StackError(f"{name} must be between 0 and 604800 seconds, got {value!r}")
        ports = {"prometheus_port": self.prometheus_port, "alertmanager_port": self.alertmanager_port}
        if self.webhook is not None:
            ports["webhook_port"] = self.webhook_port
        for name, port in ports.items():
            if type(port) is not int or not 1 <= port <= 65535:
                raise StackError(f"{name} must be a TCP port (1-65535), got {port!r}")
        if len(set(ports.values())) != len(ports):
            raise StackError(f"the stack's ports must differ, got {ports}")
        if type(self.webhook_log_max_bytes) is not int or self.webhook_log_max_bytes < 1:
            raise StackError(
                f"webhook_log_max_bytes must be a number of bytes >= 1, got {self.webhook_log_max_bytes!r}"
            )

    @property
    def scrape_targets(self) -> tuple[Target, ...]:
        return self.targets or default_targets(self.webhook_port)


# --- the configs ---------------------------------------------------------------------------------------


def private_dirs(top: Path, mode: int) -> None:
    """``top`` and every folder under it get ``mode``."""
    top.mkdir(parents=True, exist_ok=True)
    for folder in (top, *(p for p in top.rglob("*") if p.is_dir())):
        folder.chmod(mode)


def alerts_dir(explicit: Path | None = None) -> Path:
    """The ``alerts/`` folder: ``explicit``, ``$RLOPS_ALERTS_DIR``, the nearest one above the working
    directory, or the one of the source tree this package is installed from."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates = [Path(explicit)]
    elif os.environ.get(ALERTS_ENV):
        candidates = [Path(os.environ[ALERTS_ENV])]
    else:
        cwd = Path.cwd().resolve()
        candidates = [p / "alerts" for p in (cwd, *cwd.parents)]
        candidates.append(Path(__file__).resolve().parents[4] / "alerts")
    for path in candidates:
        if (path / ALERTMANAGER_FILE).is_file() and (path / RULES_SUBDIR).is_dir():
            return path
    where = ", ".join(str(p) for p in candidates[:3]) + (" …" if len(candidates) > 3 else "")
    raise StackError(
        f"no alerts folder (with {ALERTMANAGER_FILE} and {RULES_SUBDIR}/) found at {where}; run from the "
        f"rlops repository, or pass --alerts-dir / set {ALERTS_ENV}"
    )


def rule_files(alerts: Path) -> list[Path]:
    files = sorted(p for p in (alerts / RULES_SUBDIR).iterdir() if p.suffix in (".yaml", ".yml"))
    if not files:
        raise StackError(f"{alerts / RULES_SUBDIR}: no rule files (*.yaml)")
    return files


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise StackError(f"{path}: cannot be read as YAML: {e}") from e


def duration(seconds: float) -> str:
    """Seconds as a Prometheus/Alertmanager duration (milliseconds where needed)."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def render_rules(path: Path, alert_for: float | None) -> str:
    """A rule file as the local stack loads it: unchanged, or with every alert's ``for:`` replaced."""
    data = _load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        raise StackError(f"{path}: not a Prometheus rule file (no 'groups:' list)")
    if alert_for is None:
        return path.read_text(encoding="utf-8")
    for group in data["groups"]:
        for rule in group.get("rules") or []:
            if "alert" in rule:
                rule["for"] = duration(alert_for)
    header = (
        f"# Generated by rlops stack up from {path} with every alert's for: set to {duration(alert_for)}.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, width=1000)


def render_prometheus(settings: StackSettings, rules_dir: Path) -> str:
    scrape = [
        {
            "job_name": t.job,
            "metrics_path": t.metrics_path,
            "static_configs": [{"targets": [t.address]}],
        }
        for t in settings.scrape_targets
    ]
    scrape += [
        {
            "job_name": "prometheus",
            "static_configs": [{"targets": [f"127.0.0.1:{settings.prometheus_port}"]}],
        },
        {
            "job_name": "alertmanager",
            "static_configs": [{"targets": [f"127.0.0.1:{settings.alertmanager_port}"]}],
        },
    ]
    jobs = [s["job_name"] for s in scrape]
    if len(set(jobs)) != len(jobs):
        raise StackError(f"scrape job names must be unique, got {jobs}")
    config = {
        "global": {
            "scrape_interval": duration(settings.scrape_interval),
            "scrape_timeout": duration(min(10.0, settings.scrape_interval)),
            "evaluation_interval": duration(settings.evaluation_interval),
            "external_labels": {"environment": LOCAL_ENVIRONMENT},
        },
        "rule_files": [str(rules_dir / "*.yaml")],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{settings.alertmanager_port}"]}]}]
        },
        "scrape_configs": scrape,
    }
    return "# Generated by rlops stack up; regenerated on every start, do not edit.\n" + yaml.safe_dump(
        config, sort_keys=False
    )


def _local_secret(value: str, secrets_dir: Path) -> Path | None:
    if isinstance(value, str) and value.startswith(CLUSTER_SECRETS_DIR + "/"):
        return secrets_dir / value[len(CLUSTER_SECRETS_DIR) + 1 :]
    return None


def _secret_files(node: Any, secrets_dir: Path) -> list[tuple[dict[str, Any], str, Path]]:
    """Every ``*_file`` setting under ``node`` that names a cluster secret: (mapping, key, local path)."""
    found: list[tuple[dict[str, Any], str, Path]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            local = _local_secret(value, secrets_dir) if key.endswith("_file") else None
            if local is not None:
                found.append((node, key, local))
            else:
                found += _secret_files(value, secrets_dir)
    elif isinstance(node, list):
        for item in node:
            found += _secret_files(item, secrets_dir)
    return found


def _override_timing(route: dict[str, Any], overrides: dict[str, float | None], root: bool) -> None:
    for key, value in overrides.items():
        if value is not None and (root or key in route):
            route[key] = duration(value)
    for child in route.get("routes") or []:
        _override_timing(child, overrides, root=False)


def render_alertmanager(
    source: Path, settings: StackSettings, secrets_dir: Path
) -> tuple[str, dict[str, str], Path | None]:
    """The local Alertmanager config from the cluster's: (yaml, silent receivers with why, token file).

    The token file is the one the actions receiver sends as its bearer token (the webhook checks it).
    """
    config = _load_yaml(source)
    if not isinstance(config, dict) or not isinstance(config.get("receivers"), list):
        raise StackError(f"{source}: not an Alertmanager config (no 'receivers:' list)")
    config = copy.deepcopy(config)
    silent: dict[str, str] = {}
    token_file: Path | None = None
    integrations = ("webhook_configs", "slack_configs", "pagerduty_configs", "email_configs")
    for receiver in config["receivers"]:
        name = receiver.get("name")
        if name == ACTIONS_RECEIVER:
            if settings.webhook is None:
                receiver.pop("webhook_configs", None)
                silent[name] = "the actions webhook is not started (--no-webhook)"
                continue
            hooks = receiver.get("webhook_configs") or []
            if len(hooks) != 1:
                raise StackError(
                    f"{source}: receiver {ACTIONS_RECEIVER!r} must have exactly one webhook_configs entry"
                )
            hooks[0]["url"] = f"http://127.0.0.1:{settings.webhook_port}{WEBHOOK_PATH}"
            for mapping, key, local in _secret_files(receiver, secrets_dir):
                mapping[key] = str(local)
                token_file = local
            continue
        missing = [(m, k, p) for m, k, p in _secret_files(receiver, secrets_dir) if not p.is_file()]
        if missing:
            for key in integrations:
                receiver.pop(key, None)
            silent[name] = f"no secret file {missing[0][2]}"
            continue
        for mapping, key, local in _secret_files(receiver, secrets_dir):
            mapping[key] = str(local)
    overrides = {
        "group_wait": settings.group_wait,
        "group_interval": settings.group_interval,
        "repeat_interval": settings.repeat_interval,
    }
    if not isinstance(config.get("route"), dict):
        raise StackError(f"{source}: no 'route:' mapping")
    _override_timing(config["route"], overrides, root=True)
    header = f"# Generated by rlops stack up from {source}; regenerated on every start, do not edit.\n"
    return header + yaml.safe_dump(config, sort_keys=False, width=1000), silent, token_file
