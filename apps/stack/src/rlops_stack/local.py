"""The local monitoring stack: real Prometheus, Alertmanager and the actions webhook as local processes.

Configured from the same ``alerts/`` files the cluster loads: the rule files are copied in, and the
Alertmanager config is the cluster's with three local differences, each a setting rather than an edit:

- the actions receiver's URL points at the local webhook (its bearer token is generated under the root);
- secrets the cluster mounts under ``/etc/alertmanager/secrets/`` are read from ``<root>/secrets/``; a
  receiver (Slack, PagerDuty) whose secret file is not there is kept by name, so routes stay the same,
  but has no integration and notifies nobody (``rlops stack status`` lists them);
- optional timing overrides: ``alert_for`` replaces every alert's ``for:`` in the generated rule copies
  (the test profile: alerts reach the webhook in seconds) and ``group_wait`` / ``group_interval`` /
  ``repeat_interval`` replace Alertmanager's. The rule files in ``alerts/`` are never changed.

Everything of one stack lives under its root (default ``.rlops/stack``)::

    <root>/prometheus.yml, rules/*.yaml     generated Prometheus config and rule copies
    <root>/alertmanager.yml                 generated Alertmanager config (mode 0600: the source's
                                            receivers may hold secrets inline)
    <root>/secrets/                         receiver secrets (mode 0700; the webhook token is created
                                            here, mode 0600)
    <root>/data/prometheus, data/alertmanager   their storage
    <root>/logs/<component>.log             console output of each process; the previous start's is
                                            <component>.log.1 (… .5, older ones deleted); the webhook's
                                            also rolls over by size (``webhook_log_max_bytes``)
    <root>/<component>.pid                  pid of each process
    <root>/actions.jsonl                    what the webhook did (rlops_stack.webhook)
    <root>/state.json                       what rlops started: pids, URLs, settings (written once ready)

Nothing under the root is for other users: the root and its folders are mode 0750, configs, state and
logs 0640, and the processes run with umask 027, so their storage is not readable by others either.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml
from rlops_contracts.durable import replace_atomic
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
from rlops_server.http import request_json
from rlops_server.runfiles import (
    CONFIG_MODE,
    CONSOLE_BACKUPS,
    DIR_MODE,
    PRIVATE_DIR_MODE,
    RUN_UMASK,
    SECRET_MODE,
    open_console_log,
)

from rlops_stack import prometheus

DEFAULT_ROOT = Path(".rlops/stack")
ALERTS_ENV = "RLOPS_ALERTS_DIR"
STATE_FILE = "state.json"
ACTIONS_RECORD = "actions.jsonl"
RULES_SUBDIR = "rules"
ALERTMANAGER_FILE = "alertmanager.yaml"
CLUSTER_SECRETS_DIR = "/etc/alertmanager/secrets"
ACTIONS_RECEIVER = "rlops-actions"
WEBHOOK_PATH = "/alerts"
LOCAL_ENVIRONMENT = "local"

PROMETHEUS = "prometheus"
ALERTMANAGER = "alertmanager"
WEBHOOK = "webhook"

LOG_BACKUPS = CONSOLE_BACKUPS
"""Earlier logs of each process kept beside the current one (``<component>.log.1`` is the newest)."""
WEBHOOK_LOG_MAX_BYTES = 10 << 20

APT_PACKAGES = {  # binary -> the Debian/Ubuntu package that has it (make system installs them)
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "prometheus-alertmanager": "prometheus-alertmanager",
    "alertmanager": "prometheus-alertmanager",
    "amtool": "prometheus-alertmanager",
}


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


@dataclass
class Component:
    """One process of the stack as ``state.json`` records it."""

    name: str
    pid: int
    create_time: float
    url: str
    ready_path: str
    log: str


@dataclass
class StackState:
    root: str
    prometheus_url: str
    alertmanager_url: str
    webhook_url: str | None
    components: list[Component]
    settings: dict[str, Any]
    silent_receivers: dict[str, str]
    """Receivers that notify nobody here, with why (a missing secret file, no webhook)."""
    started_at: float

    @classmethod
    def read(cls, root: Path) -> StackState | None:
        path = root / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["components"] = [Component(**c) for c in data["components"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise StackError(f"{path}: not a stack state file ({e}); remove it if no stack runs there") from e

    def write(self, root: Path) -> None:
        replace_atomic(root / STATE_FILE, json.dumps(asdict(self), indent=2) + "\n", mode=CONFIG_MODE)


# --- files ---------------------------------------------------------------------------------------------


def _private_dirs(top: Path, mode: int) -> None:
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


# --- processes -----------------------------------------------------------------------------------------


def binary(name: str) -> str:
    """Path of an OS-package binary, or an error that says how to install it."""
    found = shutil.which(name)
    if found is None and name == "prometheus-alertmanager":
        found = shutil.which("alertmanager")
    if found is None:
        package = APT_PACKAGES.get(name, name)
        raise StackError(
            f"{name} is not installed: run 'make system' (installs the Debian/Ubuntu package {package} "
            f"with apt) or install {package} with your package manager"
        )
    return found


def _check_port_free(port: int, what: str, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise StackError(
                f"port {port} for {what} is in use ({e.strerror}); stop what listens there or choose another "
                f"port with {flag}"
            ) from None


def _alive(component: Component) -> psutil.Process | None:
    try:
        proc = psutil.Process(component.pid)
        if abs(proc.create_time() - component.create_time) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def log_tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    return f"--- {path} ---\n" + "\n".join(text)


def _spawn(
    root: Path, name: str, cmd: list[str], url: str, ready_path: str, env: dict[str, str] | None = None
) -> Component:
    log = root / "logs" / f"{name}.log"
    with open_console_log(log, keep=LOG_BACKUPS) as out:
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            umask=RUN_UMASK,
        )
    replace_atomic(root / f"{name}.pid", f"{proc.pid}\n", mode=CONFIG_MODE)
    try:
        create_time = psutil.Process(proc.pid).create_time()
    except psutil.Error:
        create_time = time.time()
    return Component(name, proc.pid, create_time, url, ready_path, str(log))


def _ready(component: Component, timeout: float = 2.0) -> bool:
    try:
        status, _ = request_json("GET", component.url + component.ready_path, timeout=timeout)
    except OSError:
        return False
    return status == 200


def _wait_ready(component: Component, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _alive(component) is None:
            raise StackError(f"{component.name} exited while starting\n{log_tail(Path(component.log))}")
        if _ready(component):
            return
        time.sleep(0.2)
    raise StackError(
        f"{component.name} was not ready at {component.url}{component.ready_path} within {timeout_s:.0f} s\n"
        f"{log_tail(Path(component.log))}"
    )


def _terminate(component: Component, timeout_s: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout_s``; True if it had to be killed."""
    proc = _alive(component)
    if proc is None:
        return False
    with contextlib.suppress(psutil.Error):
        proc.terminate()
    _, alive = psutil.wait_procs([proc], timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    return bool(alive)


def running_state(root: Path) -> StackState | None:
    """The stack of ``root`` if any of its processes still runs, else None."""
    state = StackState.read(Path(root).resolve())
    if state is None or not any(_alive(c) for c in state.components):
        return None
    return state


# --- the commands --------------------------------------------------------------------------------------


def up(
    root: Path = DEFAULT_ROOT,
    *,
    scrape_interval: float = 15.0,
    evaluation_interval: float = 15.0,
    prometheus_port: int = PORT_PROMETHEUS,
    alertmanager_port: int = PORT_ALERTMANAGER,
    webhook_port: int = PORT_ACTIONS_WEBHOOK,
    targets: Sequence[Target] = (),
    alert_for: float | None = None,
    group_wait: float | None = None,
    group_interval: float | None = None,
    repeat_interval: float | None = None,
    webhook: WebhookSettings | None = WebhookSettings(),
    webhook_log_max_bytes: int = WEBHOOK_LOG_MAX_BYTES,
    alerts: Path | None = None,
    timeout_s: float = 60.0,
) -> StackState:
    """Generate the configs under ``root`` and start the webhook, Alertmanager and Prometheus.

    Returns once each answers its readiness check; on failure whatever was started is stopped again and
    the error carries the tail of the failing process's log.
    """
    settings = StackSettings(
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
        prometheus_port=prometheus_port,
        alertmanager_port=alertmanager_port,
        webhook_port=webhook_port,
        targets=tuple(targets),
        alert_for=alert_for,
        group_wait=group_wait,
        group_interval=group_interval,
        repeat_interval=repeat_interval,
        webhook=webhook,
        webhook_log_max_bytes=webhook_log_max_bytes,
    )
    return start(Path(root), settings, alerts=alerts, timeout_s=timeout_s)


def start(
    root: Path, settings: StackSettings, *, alerts: Path | None = None, timeout_s: float = 60.0
) -> StackState:
    """:func:`up` with the settings already gathered."""
    root = Path(root).resolve()
    if running_state(root) is not None:
        raise StackError(
            f"a stack from {root} is already running; stop it first (rlops stack down --root {root})"
        )
    source = alerts_dir(alerts)
    prom_bin, am_bin = binary("prometheus"), binary("prometheus-alertmanager")
    _check_port_free(settings.prometheus_port, "Prometheus", "--prometheus-port")
    _check_port_free(settings.alertmanager_port, "Alertmanager", "--alertmanager-port")
    if settings.webhook is not None:
        _check_port_free(settings.webhook_port, "the actions webhook", "--webhook-port")

    root.mkdir(parents=True, exist_ok=True)
    root.chmod(DIR_MODE)
    for folder in ("logs", "data"):
        (root / folder).mkdir(exist_ok=True)
        (root / folder).chmod(DIR_MODE)
    _private_dirs(root / "secrets", PRIVATE_DIR_MODE)
    (root / STATE_FILE).unlink(missing_ok=True)
    rules_dir = root / RULES_SUBDIR
    if rules_dir.is_dir():
        shutil.rmtree(rules_dir)
    rules_dir.mkdir()
    rules_dir.chmod(DIR_MODE)
    for path in rule_files(source):
        replace_atomic(
            rules_dir / f"{path.stem}.yaml", render_rules(path, settings.alert_for), mode=CONFIG_MODE
        )
    prom_config = replace_atomic(
        root / "prometheus.yml", render_prometheus(settings, rules_dir), mode=CONFIG_MODE
    )
    am_text, silent, token_file = render_alertmanager(source / ALERTMANAGER_FILE, settings, root / "secrets")
    if settings.webhook is not None:
        if token_file is None:
            raise StackError(
                f"{source / ALERTMANAGER_FILE}: receiver {ACTIONS_RECEIVER!r} must send a bearer token "
                f"(http_config.authorization.credentials_file under {CLUSTER_SECRETS_DIR}/)"
            )
        if not token_file.is_file():
            replace_atomic(token_file, secrets.token_urlsafe(32) + "\n", mode=SECRET_MODE)
        _private_dirs(root / "secrets", PRIVATE_DIR_MODE)
    am_config = replace_atomic(root / "alertmanager.yml", am_text, mode=SECRET_MODE)

    prometheus_url = f"http://127.0.0.1:{settings.prometheus_port}"
    alertmanager_url = f"http://127.0.0.1:{settings.alertmanager_port}"
    webhook_url = f"http://127.0.0.1:{settings.webhook_port}" if settings.webhook is not None else None
    started: list[Component] = []
    try:
        if settings.webhook is not None and webhook_url is not None and token_file is not None:
            hook = settings.webhook
            cmd = [
                sys.executable, "-m", "rlops_stack.commands.stack", "webhook",
                "--host", "127.0.0.1",
                "--port", str(settings.webhook_port),
                "--registry", str(Path(hook.registry).resolve()),
                "--serve-run-dir", str(Path(hook.serve_run_dir).resolve()),
                "--token-file", str(token_file),
                "--record", str(root / ACTIONS_RECORD),
                "--max-workers", str(hook.max_workers),
                "--scale-step", str(hook.scale_step),
                "--cooldown", f"{hook.cooldown_s:g}",
                "--log-file", str(root / "logs" / f"{WEBHOOK}.log"),
                "--log-max-bytes", str(settings.webhook_log_max_bytes),
                "--log-backups", str(LOG_BACKUPS),
            ]  # fmt: skip
            if hook.management_url:
                cmd += ["--management-url", hook.management_url]
            if hook.management_token_file:
                cmd += ["--management-token-file", str(Path(hook.management_token_file).resolve())]
            started.append(_spawn(root, WEBHOOK, cmd, webhook_url, "/healthz"))
            _wait_ready(started[-1], timeout_s)
        cmd = [
            am_bin,
            f"--config.file={am_config}",
            f"--storage.path={root / 'data' / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{settings.alertmanager_port}",
            f"--web.external-url={alertmanager_url}",
            "--cluster.listen-address=",  # one local instance: no gossip port
        ]
        started.append(_spawn(root, ALERTMANAGER, cmd, alertmanager_url, "/-/ready"))
        _wait_ready(started[-1], timeout_s)
        cmd = [
            prom_bin,
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={root / 'data' / 'prometheus'}",
            f"--storage.tsdb.retention.time={settings.retention}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
            f"--web.external-url={prometheus_url}",
            "--web.enable-lifecycle",
        ]
        started.append(_spawn(root, PROMETHEUS, cmd, prometheus_url, "/-/ready"))
        _wait_ready(started[-1], timeout_s)
    except BaseException:
        for component in reversed(started):
            _terminate(component, timeout_s=10.0)
        raise
    state = StackState(
        root=str(root),
        prometheus_url=prometheus_url,
        alertmanager_url=alertmanager_url,
        webhook_url=webhook_url,
        components=started,
        settings=json.loads(json.dumps(asdict(settings), default=str)),
        silent_receivers=silent,
        started_at=time.time(),
    )
    state.write(root)
    return state


def down(root: Path = DEFAULT_ROOT, timeout_s: float = 15.0) -> list[str]:
    """Stop every process of the stack of ``root`` (Prometheus first); returns what happened, in words."""
    root = Path(root).resolve()
    state = StackState.read(root)
    if state is None:
        return [f"no stack was started from {root}"]
    said = []
    for component in sorted(
        state.components, key=lambda c: [PROMETHEUS, ALERTMANAGER, WEBHOOK].index(c.name)
    ):
        if _alive(component) is None:
            said.append(f"{component.name} (pid {component.pid}) was not running any more")
        elif _terminate(component, timeout_s):
            said.append(f"stopped {component.name} (pid {component.pid}); it had to be killed")
        else:
            said.append(f"stopped {component.name} (pid {component.pid})")
        (root / f"{component.name}.pid").unlink(missing_ok=True)
    (root / STATE_FILE).unlink(missing_ok=True)
    return said


def status(root: Path = DEFAULT_ROOT) -> dict[str, Any]:
    """Each process (running, ready), Prometheus's scrape targets and its pending and firing alerts."""
    root = Path(root).resolve()
    state = StackState.read(root)
    if state is None:
        raise StackError(f"no stack was started from {root} (start one with rlops stack up --root {root})")
    components = []
    for c in state.components:
        alive = _alive(c) is not None
        components.append(
            {
                "name": c.name,
                "pid": c.pid,
                "running": alive,
                "ready": alive and _ready(c),
                "url": c.url,
                "log": c.log,
            }
        )
    report: dict[str, Any] = {
        "root": state.root,
        "prometheus_url": state.prometheus_url,
        "alertmanager_url": state.alertmanager_url,
        "webhook_url": state.webhook_url,
        "components": components,
        "silent_receivers": state.silent_receivers,
        "targets": [],
        "alerts": [],
        "healthy": all(c["ready"] for c in components),
    }
    if any(c["name"] == PROMETHEUS and c["ready"] for c in components):
        with contextlib.suppress(prometheus.PrometheusError):
            report["targets"] = [
                {
                    "job": t["labels"].get("job"),
                    "url": t.get("scrapeUrl"),
                    "health": t.get("health"),
                    "error": t.get("lastError") or "",
                }
                for t in prometheus.targets(state.prometheus_url)
            ]
            report["alerts"] = [
                {
                    "name": a["labels"].get("alertname"),
                    "state": a.get("state"),
                    "severity": a["labels"].get("severity"),
                    "labels": a["labels"],
                    "since": a.get("activeAt"),
                    "value": a.get("value"),
                }
                for a in prometheus.alerts(state.prometheus_url)
            ]
    return report


def prometheus_url(root: Path = DEFAULT_ROOT) -> str:
    """URL of the running stack's Prometheus (for the report and the dashboards' checks)."""
    state = running_state(root)
    if state is None:
        raise StackError(f"no stack is running from {Path(root).resolve()} (start one with rlops stack up)")
    return state.prometheus_url
