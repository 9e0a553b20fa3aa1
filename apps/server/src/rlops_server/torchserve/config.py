"""TorchServe's server config (``config.properties``) and per-model settings, generated from typed settings.

Choices, for a small machine first (2 cores: one worker per policy version, one torch thread each):

- the management API and the metrics endpoint listen on 127.0.0.1 unless told otherwise; inference
  listens where the caller says (127.0.0.1 by default, 0.0.0.0 in a container);
- token authorization stays on (TorchServe's default). TorchServe writes the keys to ``key_file.json``
  in its working directory, which rlops makes the run directory (mode 0600); ``rlops serve status``
  and the client read them there. Keys expire after ``token_expiration_min``;
- the model API (registering archives over HTTP) stays off and ``allowed_urls`` only matches the
  model store, so nothing outside the store can ever be loaded;
- environment variables cannot override the config (``enable_envvars_config=false``): the file is
  the whole truth;
- the frontend's logs (``log4j2.xml``) roll over daily and at ``LOG_MAX_BYTES`` (``--log-max-bytes``)
  into numbered archives, so no roll-over overwrites another;
- batching is per model (``batchSize``). TorchServe 0.12's own batcher fills a batch by waiting up to
  ``maxBatchDelay`` (at least 1 ms: it reads 0 as "not set" and uses 100 ms) for more requests
  whenever fewer than ``batchSize`` are queued, so at low load every request pays the delay. rlops'
  batcher (``adaptive``, the default) sends a request that finds a worker idle at once; a worker that
  finds two or more requests already waiting fills its batch for up to ``maxBatchDelay``. One client
  gets batch-1 latency and many clients get full batches. It is a class of the frontend
  (``frontend/ContinuousBatching.java``) that :func:`install_batcher` puts in the frontend's working
  directory, where it is loaded in place of the TorchServe class that ``continuousBatching: true``
  selects. ``delay`` keeps TorchServe's batcher. The per-model
  settings go into the archive and the server config's ``models=``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlops_contracts.durable import replace_atomic

from rlops_server.plan import ADAPTIVE, BATCHERS, DELAY, ServePlan
from rlops_server.runfiles import CONFIG_MODE
from rlops_server.settings import ServingSettings

__all__ = ["ADAPTIVE", "BATCHERS", "DELAY"]  # re-exported: the batchers are TorchServe settings here

PROPERTIES_FILE = "config.properties"
METRICS_FILE = "metrics.yaml"
LOG_CONFIG_FILE = "log4j2.xml"
LOG_MAX_BYTES = ServePlan.log_max_bytes
"""Size at which each of TorchServe's logs rolls over (``rlops serve start --log-max-bytes``)."""


BATCHER_CLASS = Path("org/pytorch/serve/wlm/ContinuousBatching.class")
"""Where the frontend looks for rlops' batcher, relative to its working directory."""
BATCHER_BUILT = Path(__file__).parent / "frontend" / BATCHER_CLASS.name


@dataclass(frozen=True)
class ModelSettings:
    """TorchServe's per-model settings for one policy version."""

    batch_size: int = ServePlan.batch_size
    """Most requests a worker takes at once (1: no batching)."""
    max_batch_delay_ms: int = ServePlan.max_batch_delay_ms
    """How long a worker waits for a batch to fill (TorchServe's minimum is 1): with the ``delay``
    batcher for every batch that is not full, with ``adaptive`` only when two or more requests were
    already waiting."""
    min_workers: int = ServePlan.workers
    max_workers: int = ServePlan.workers
    response_timeout_s: int = 30
    """A worker that takes longer than this on one batch is restarted."""
    batcher: str = ServePlan.batcher
    """How a worker fills its batch: one of :data:`rlops_server.plan.BATCHERS`."""

    def __post_init__(self) -> None:
        if self.batcher not in BATCHERS:
            raise ValueError(f"batcher must be one of {', '.join(BATCHERS)}, got {self.batcher!r}")
        checks = {
            "batch_size": (self.batch_size, 1, 4096),
            "max_batch_delay_ms": (self.max_batch_delay_ms, 1, 10_000),
            "min_workers": (self.min_workers, 1, 64),
            "max_workers": (self.max_workers, 1, 64),
            "response_timeout_s": (self.response_timeout_s, 1, 3600),
        }
        for name, (value, low, high) in checks.items():
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")

    def model_config(
        self, serving: ServingSettings, extra_handler: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The archive's model-config yaml: TorchServe's keys plus the ``handler:`` section."""
        config: dict[str, Any] = {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "deviceType": "cpu",
        }
        if self.batcher == ADAPTIVE:
            # Selects the batcher class that install_batcher() puts in place of TorchServe's.
            config["continuousBatching"] = True
        config["handler"] = {**serving.to_mapping(), **(extra_handler or {})}
        return config

    def properties_entry(self) -> dict[str, int]:
        """This version's entry in the server config's ``models=`` JSON."""
        return {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
        }


@dataclass(frozen=True)
class ServedModel:
    """One archive to load at start: a version of a model."""

    name: str
    version: str
    archive: str
    """File name of the .mar in the model store."""
    settings: ModelSettings = field(default_factory=ModelSettings)


@dataclass(frozen=True)
class ServerConfig:
    """Everything config.properties says. ``models`` load in order: the first version is the default."""

    model_store: Path
    metrics_config: Path
    models: tuple[ServedModel, ...] = ()
    inference_host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    token_expiration_min: float = 7 * 24 * 60.0
    """Minutes before TorchServe's keys expire (its default is 60, which would break long runs)."""
    default_workers_per_model: int = 1
    job_queue_size: int = 256
    """Requests queued per model version before TorchServe answers 503; beyond this they would wait
    longer than any client timeout anyway."""
    netty_threads: int = 2
    """Frontend threads for HTTP; more than the cores only adds context switches."""

    def __post_init__(self) -> None:
        ports = {
            "inference_port": self.inference_port,
            "management_port": self.management_port,
            "metrics_port": self.metrics_port,
            "grpc_inference_port": self.grpc_inference_port,
            "grpc_management_port": self.grpc_management_port,
        }
        for name, port in ports.items():
            if type(port) is not int or not 1 <= port <= 65535:
                raise ValueError(f"{name} must be a TCP port (1-65535), got {port!r}")
        clashes = {p for p in ports.values() if list(ports.values()).count(p) > 1}
        if clashes:
            raise ValueError(f"ports must differ; used twice: {sorted(clashes)} in {ports}")
        if not self.token_expiration_min > 0:
            raise ValueError(f"token_expiration_min must be positive, got {self.token_expiration_min}")
        for name in ("default_workers_per_model", "job_queue_size", "netty_threads"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        seen = set()
        for model in self.models:
            if (model.name, model.version) in seen:
                raise ValueError(f"model {model.name} version {model.version} is listed twice")
            seen.add((model.name, model.version))

    @property
    def inference_url(self) -> str:
        return f"http://{_url_host(self.inference_host)}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.metrics_host)}:{self.metrics_port}/metrics"

    def properties(self) -> dict[str, str]:
        store = self.model_store.resolve()
        per_model: dict[str, dict[str, dict[str, int]]] = {}
        for model in self.models:
            per_model.setdefault(model.name, {})[model.version] = model.settings.properties_entry()
        props = {
            "inference_address": f"http://{self.inference_host}:{self.inference_port}",
            "management_address": f"http://127.0.0.1:{self.management_port}",
            "metrics_address": f"http://{self.metrics_host}:{self.metrics_port}",
            "grpc_inference_address": self.inference_host,
            "grpc_inference_port": str(self.grpc_inference_port),
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": str(self.grpc_management_port),
            "metrics_mode": "prometheus",
            "metrics_config": str(self.metrics_config.resolve()),
            "enable_metrics_api": "true",
            "disable_token_authorization": "false" if self.token_auth else "true",
            "token_expiration_min": f"{self.token_expiration_min:g}",
            "enable_model_api": "false",
            "enable_envvars_config": "false",
            "install_py_dep_per_model": "false",
            "model_store": str(store),
            "allowed_urls": "file://" + re.escape(str(store)) + "/.*",
            "load_models": ",".join(f"{m.name}={m.archive}" for m in self.models),
            "models": json.dumps(per_model, separators=(",", ":")),
            "default_workers_per_model": str(self.default_workers_per_model),
            "job_queue_size": str(self.job_queue_size),
            "number_of_netty_threads": str(self.netty_threads),
            "netty_client_threads": str(self.netty_threads),
            "async_logging": "true",
            # TorchServe would start a Python process every minute for host CPU, memory and disk
            # gauges; nothing of rlops reads them, and on a cluster node-exporter measures the host.
            "disable_system_metrics": "true",
        }
        if not self.models:
            del props["load_models"], props["models"]
        return props


def install_batcher(directory: Path, needed: bool) -> Path | None:
    """Put rlops' adaptive batcher where a frontend started in ``directory`` loads it (or take it away).

    TorchServe's launcher starts the frontend with ``.`` first on its class path, so a class under the
    working directory wins over the one of the same name in TorchServe's jar. Returns the installed
    file, or None when ``needed`` is false (a class left from an earlier start is removed).
    """
    target = Path(directory) / BATCHER_CLASS
    if not needed:
        target.unlink(missing_ok=True)
        return None
    if not BATCHER_BUILT.is_file():
        raise FileNotFoundError(f"{BATCHER_BUILT}: the adaptive batcher is missing from rlops-server")
    return replace_atomic(target, BATCHER_BUILT.read_bytes())


def _url_host(host: str) -> str:
    # A server bound to every interface is reached on loopback from this machine.
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _escape(value: str) -> str:
    """A value as java.util.Properties reads it back unchanged (backslashes are escapes there)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def render_properties(config: ServerConfig) -> str:
    lines = ["# Written by rlops (rlops_server.torchserve.config); regenerated on every start, do not edit."]
    lines += [f"{key}={_escape(value)}" for key, value in config.properties().items()]
    return "\n".join(lines) + "\n"


def write_properties(path: Path, config: ServerConfig) -> Path:
    """Write config.properties atomically; returns ``path``."""
    return replace_atomic(path, render_properties(config))


def read_properties(path: Path) -> dict[str, str]:
    """The key/value pairs of a properties file this module wrote (for tests and status)."""
    props = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        props[key] = re.sub(r"\\(.)", lambda mt: "\n" if mt.group(1) == "n" else mt.group(1), value)
    return props


# TorchServe's own log4j2.xml logs about ten lines per request at INFO/DEBUG, most of them twice (its
# org.pytorch.serve logger also feeds the root logger), plus two per metric update the worker prints.
# This one keeps startup, worker lifecycle, warnings and errors, and the access log only on request.
# Each log rolls over at midnight and whenever it reaches max_bytes, into <name>.<date>.<n>.log.gz: the
# counter %i gives every roll-over of a day its own archive (with a date alone, a second roll-over the
# same day would overwrite the first). At most five archives a day per log (DefaultRolloverStrategy max).
_LOG_CONFIG = """<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by rlops (rlops_server.torchserve.config); regenerated on every start, do not edit. -->
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{{ISO8601}} [%-5p] %t %c - %m%n"/>
    </Console>
{appenders}
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="{access_level}" additivity="false">
      <AppenderRef ref="access_log"/>
    </Logger>
    <Logger name="MODEL_LOG" level="info" additivity="false">
      <AppenderRef ref="model_log"/>
    </Logger>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="info" additivity="false">
      <AppenderRef ref="ts_log"/>
    </Logger>
    <Logger name="org.pytorch.serve.wlm.WorkerThread" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.BatchAggregator" level="warn"/>
    <Logger name="org.pytorch.serve.job" level="warn"/>
    <Logger name="org.pytorch.serve.wlm.WorkerLifeCycle" level="info">
      <RegexFilter regex="result=.*" onMatch="DENY" onMismatch="NEUTRAL"/>
    </Logger>
    <Root level="warn">
      <AppenderRef ref="STDOUT"/>
    </Root>
  </Loggers>
</Configuration>
"""

_ROLLING = """    <RollingFile name="{name}" fileName="${{env:LOG_LOCATION:-logs}}/{name}.log"
                 filePattern="${{env:LOG_LOCATION:-logs}}/{name}.%d{{yyyy-MM-dd}}.%i.log.gz">
      <PatternLayout pattern="{pattern}"/>
      <Policies>
        <SizeBasedTriggeringPolicy size="{max_bytes}"/>
        <TimeBasedTriggeringPolicy/>
      </Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>"""


def render_log_config(access_log: bool = False, max_bytes: int = LOG_MAX_BYTES) -> str:
    """log4j2.xml for TorchServe's frontend: quiet on the request path (see the comment above)."""
    if type(max_bytes) is not int or max_bytes < 1:
        raise ValueError(f"the log size limit must be a number of bytes >= 1, got {max_bytes!r}")
    detailed = "%d{ISO8601} [%-5p] %t %c - %m%n"
    appenders = [
        _ROLLING.format(name="ts_log", pattern=detailed, max_bytes=max_bytes),
        _ROLLING.format(name="model_log", pattern=detailed, max_bytes=max_bytes),
        _ROLLING.format(name="access_log", pattern="%d{ISO8601} - %m%n", max_bytes=max_bytes),
    ]
    return _LOG_CONFIG.format(appenders="\n".join(appenders), access_level="info" if access_log else "off")


def write_log_config(path: Path, access_log: bool = False, max_bytes: int = LOG_MAX_BYTES) -> Path:
    return replace_atomic(path, render_log_config(access_log, max_bytes), mode=CONFIG_MODE)
