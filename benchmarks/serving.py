"""Serving load benchmark: rlops' TorchServe handler beside a naive one and the bare forward pass, one run.

    .venv/bin/python benchmarks/serving.py              # the full benchmark (~8 minutes)
    .venv/bin/python benchmarks/serving.py --quick      # a short run that checks the plumbing

What it does, in order:

1. Makes a policy to serve: collects a CartPole-v1 dataset (``--env Pendulum-v1``: a Pendulum-v1
   dataset of uniform actions, for a policy with Box actions), trains BC briefly, publishes it to a
   temporary registry and promotes it to champion, all through the ``rlops`` command (``--registry``
   serves an existing registry's champion instead).
2. The floor, in this process with one torch thread: the TorchScript forward pass alone on 1, 16 and
   256 observations, and each handler's whole Python path (parse, decide, answer, and for rlops the
   decision log and metrics) without TorchServe around it.
3. The servers (four by default), one after the other, each with the same requests:

   - ``naive``: ``benchmarks/naive_handler.py`` (json-load, tensor, forward, argmax) archived with
     torch-model-archiver and served with TorchServe's defaults; config.properties only sets the ports
     and the model store (token authorization stays on, as by default);
   - ``rlops``: ``rlops serve start`` as shipped (adaptive batches of up to 16), decision log and
     metrics on; ``rlops-w2`` the same with ``--workers 2``;
   - ``rlops-b16``: ``rlops serve start --batcher delay --batch-size 16 --max-batch-delay-ms 1``
     (TorchServe's own batcher), decision log and metrics on; ``rlops-b16-w2`` with two workers, and
     ``rlops-b1`` with ``--batch-size 1`` (not run by default).

   Against each, wrk (keep-alive POSTs from a Lua script, ``Authorization: Bearer <inference key>``)
   sends single-observation requests at 1, 16 and 64 connections (one connection is one client that
   sends its next request when the answer arrives) and batch requests of 256 observations at 1, 4 and
   16 connections; each point is a short warm-up and then ``--duration`` seconds measured. Beside the
   latency distribution it records where the CPU time went (TorchServe's Java frontend, its Python
   workers, wrk and everything else on the machine), TorchServe's own latency counters and the handler
   time rlops reports, and the load average.
4. Writes ``results.json`` and ``results.md`` (with the exact command) to ``benchmarks/results/serving/``
   (``serving-box/`` for a Box policy) and checks the targets of issue 3, the same for both kinds.

Every server it starts is stopped again, also when a step fails or the run is interrupted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rlops_server import metrics as rm
from rlops_server.torchserve import metrics_config as mc
from rlops_server.torchserve.process import ServeError, read_keys

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
NAIVE_HANDLER = BENCH / "naive_handler.py"
RESULTS = BENCH / "results"
BIN = Path(sys.executable).parent
RLOPS = BIN / "rlops"
ENV_ID = "CartPole-v1"
BOX_ENV_ID = "Pendulum-v1"
NAIVE_MODEL = "naive"
BATCH_OBS = 256
SINGLE_BODIES = 64
"""Distinct single-observation requests the wrk script cycles through."""
BATCH_BODIES = 8
START_TIMEOUT_S = 180
WRK_TIMEOUT = "5s"
"""wrk counts a request as a timeout error after this long."""

# Targets of issue 3, on the same 2-core machine, with decision logging and metrics on.
TARGET_P50_1_MS = 1.5
TARGET_P99_16_MS = 10.0
TARGET_RATIO_64 = 3.0
TARGET_P99_64_MS = 20.0
TARGET_BATCH_OBS_S = 50_000.0
# The naive handler as measured on this machine when the issue was written (TorchServe defaults).
EARLIER_NAIVE = {1: (647, 6.7), 16: (1497, 25.6), 64: (1669, 63.0)}

console = Console(stderr=True)
app = typer.Typer(
    add_completion=False, help=__doc__, rich_markup_mode=None, pretty_exceptions_show_locals=False
)


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and shows the tool's output."""


@dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    naive: bool
    batch_size: int = 16
    max_batch_delay_ms: int = 1
    workers: int = 1
    batcher: str = "adaptive"


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("naive", "naive handler, TorchServe defaults", naive=True),
    ServerSpec("rlops", "rlops as shipped: adaptive batches of up to 16", naive=False),
    ServerSpec("rlops-w2", "rlops, adaptive batches of up to 16, 2 workers", naive=False, workers=2),
    ServerSpec("rlops-b1", "rlops, batch 1", naive=False, batch_size=1),
    ServerSpec("rlops-b16", "rlops, TorchServe's batcher, 16 / 1 ms", naive=False, batcher="delay"),
    ServerSpec(
        "rlops-b16-w2",
        "rlops, TorchServe's batcher, 16 / 1 ms, 2 workers",
        naive=False,
        workers=2,
        batcher="delay",
    ),
)
DEFAULT_SERVERS = "naive,rlops,rlops-w2,rlops-b16"


@dataclass(frozen=True)
class Ports:
    inference: int
    management: int
    metrics: int
    grpc: int
    """gRPC inference; gRPC management is the next port."""


@dataclass
class Running:
    """A started server: where to send requests and what to watch."""

    spec: ServerSpec
    run_dir: Path
    inference_url: str
    management_url: str
    metrics_url: str
    predict_path: str
    key: str
    frontend_pid: int
    model: str
    decision_dir: Path | None = None


@dataclass
class Point:
    """One measured load point: a server, a request kind and a number of concurrent clients."""

    server: str
    kind: str
    """single or batch."""
    clients: int
    obs_per_request: int
    duration_s: float
    requests: int
    errors: dict[str, int]
    rps: float
    obs_per_s: float
    latency_ms: dict[str, float]
    loadavg_1m: float
    cpu: dict[str, float] = field(default_factory=dict)
    """CPU milliseconds per request by role, and the machine's busy cores during the point."""
    server_side: dict[str, float] = field(default_factory=dict)
    """Means per request from the server's metrics: TorchServe's inference and queue latency, handler time."""
    ratio_vs_naive: float | None = None


# --- helpers -------------------------------------------------------------------------------------------


def _run(cmd: list[str], what: str, *, timeout: float, cwd: Path | None = None, env: Any = None) -> str:
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{what}: no result within {timeout:.0f} s ({shlex.join(cmd)})") from e
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-3000:]
        raise BenchError(f"{what} failed (exit {done.returncode}): {shlex.join(cmd)}\n{tail}")
    return done.stdout


def _free_ports() -> Ports:
    """Five free TCP ports on loopback; the last two consecutive (gRPC inference and management)."""

    def one() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    taken: set[int] = set()
    picked: list[int] = []
    while len(picked) < 3:
        p = one()
        if p not in taken:
            taken.add(p)
            picked.append(p)
    for _ in range(100):
        g = one()
        if g + 1 <= 65535 and {g, g + 1}.isdisjoint(taken) and free(g + 1):
            return Ports(picked[0], picked[1], picked[2], g)
    raise BenchError("found no two consecutive free ports for TorchServe's gRPC APIs")


def _http(url: str, *, key: str | None, body: bytes | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", errors="replace")


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(\S+)")


def _scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, summed over label sets per metric name; {} if unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except OSError:
        return {}
    sums: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                sums[match[1]] = sums.get(match[1], 0.0) + float(match[2])
    return sums


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _is_worker(proc: psutil.Process) -> bool:
    try:
        return "model_service_worker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def _cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds so far of the server's frontend (Java) and of its Python workers."""
    out = {"frontend": 0.0, "workers": 0.0}
    for proc in _tree(pid):
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        out["workers" if _is_worker(proc) else "frontend"] += t.user + t.system
    return out


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _frontend_pid(run_dir: Path) -> int | None:
    try:
        return int((run_dir / "tmp" / ".model_server.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_leftovers(run_dir: Path) -> list[int]:
    """Terminate, then kill, a frontend whose pid file is in ``run_dir`` and its workers, if still alive."""
    pid = _frontend_pid(run_dir)
    if pid is None:
        return []
    procs = _tree(pid)
    with contextlib.suppress(psutil.Error):
        if procs and "org.pytorch.serve.ModelServer" not in procs[0].cmdline():
            return []  # the pid was reused by an unrelated process
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in procs]


# --- the policy and the requests ------------------------------------------------------------------------


def prepare_policy(
    work: Path, registry: Path | None, name: str, steps: int, env_id: str
) -> tuple[Path, str, Path]:
    """(registry, policy name, champion version dir): trained and published here unless one is given."""
    if registry is None:
        registry = work / "registry"
        data = work / "data.parquet"
        console.print(f"making a policy: {env_id} data, BC for {steps} steps, registry {registry}")
        rlops = str(RLOPS)
        # Box actions: uniform actions (no controller to train first); the policy's quality is not measured.
        behavior = ["--behavior", "uniform"] if env_id == BOX_ENV_ID else []
        commands = [
            [rlops, "data", "collect", "--env", env_id, "--episodes", "50", "--out", str(data),
             *behavior, "--no-progress"],
            [rlops, "train", "bc", "--data", str(data), "--out", str(work / "train"), "--steps", str(steps),
             "--name", name, "--checkpoint-every", "0", "--no-progress"],
            [rlops, "registry", "publish", str(work / "train" / "policy"), "--name", name,
             "--registry", str(registry)],
            [rlops, "registry", "promote", name, "1", "--force", "--reason", "serving benchmark",
             "--registry", str(registry)],
        ]  # fmt: skip
        for cmd in commands:
            _run(cmd, f"rlops {cmd[1]} {cmd[2]}", timeout=900, cwd=work)
    aliases_file = registry / name / "aliases.json"
    try:
        champion = json.loads(aliases_file.read_text(encoding="utf-8"))["champion"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(
            f"{aliases_file}: no champion of policy {name!r} to serve ({e}); promote one with "
            "rlops registry promote, or leave out --registry to train one"
        ) from e
    version_dir = registry / name / str(champion)
    if not (version_dir / "policy.pt").is_file():
        raise BenchError(f"{version_dir}: no policy.pt; is {registry} an rlops registry?")
    return registry, name, version_dir


def sample_observations(card: dict[str, Any], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` observations spread over the range the training data covered (the card's reference bins)."""
    dim = int(card["policy"]["input"]["shape"][1])
    bins = card["reference"]["observation"]["bins"]
    out = rng.standard_normal((n, dim))
    for j, b in enumerate(bins[:dim]):
        edges = b["edges"]
        if len(edges) >= 2 and edges[-1] > edges[0]:
            out[:, j] = rng.uniform(edges[0], edges[-1], n)
    return out.astype(np.float32)


def request_bodies(card: dict[str, Any]) -> tuple[list[bytes], list[bytes]]:
    """Single-observation and 256-observation request bodies, the same for every server."""
    rng = np.random.default_rng(0)
    singles = [
        json.dumps({"observation": [round(float(v), 6) for v in o]}, separators=(",", ":")).encode()
        for o in sample_observations(card, SINGLE_BODIES, rng)
    ]
    batches = []
    for _ in range(BATCH_BODIES):
        obs = np.round(sample_observations(card, BATCH_OBS, rng).astype(np.float64), 6).tolist()
        batches.append(json.dumps({"observations": obs}, separators=(",", ":")).encode())
    return singles, batches


_LUA = """-- Written by benchmarks/serving.py: keep-alive POSTs cycling through fixed JSON bodies.
local path = "{path}"
local headers = {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer {key}"}}
local bodies = {{
{bodies}
}}
local prepared = {{}}
local n = 0
local i = 0

function init(args)
  for k, body in ipairs(bodies) do
    prepared[k] = wrk.format("POST", path, headers, body)
  end
  n = #prepared
  i = math.random(n) - 1
end

function request()
  i = (i % n) + 1
  return prepared[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {{"duration_us":%.0f,"requests":%.0f,"bytes":%.0f,"connect":%.0f,"read":%.0f,' ..
    '"write":%.0f,"status":%.0f,"timeout":%.0f,"mean_us":%.1f,"max_us":%.0f,"p50_us":%.0f,' ..
    '"p90_us":%.0f,"p99_us":%.0f,"p999_us":%.0f}}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


def write_lua(path: Path, predict_path: str, key: str, bodies: list[bytes]) -> Path:
    for b in bodies:
        if b"]==]" in b or b"\n" in b:
            raise BenchError("a request body cannot be quoted as a Lua long string")
    quoted = ",\n".join(f"  [==[{b.decode()}]==]" for b in bodies)
    if not re.fullmatch(r"[A-Za-z0-9._~/-]+", predict_path) or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", key):
        raise BenchError(f"unexpected characters in the request path {predict_path!r} or the inference key")
    path.write_text(_LUA.format(path=predict_path, key=key, bodies=quoted), encoding="utf-8")
    return path


def run_wrk(url: str, script: Path, clients: int, seconds: int, threads: int) -> dict[str, float]:
    cmd = [
        "wrk",
        f"-t{max(1, min(threads, clients))}",
        f"-c{clients}",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        str(script),
        url,
    ]
    out = _run(cmd, f"wrk with {clients} connections", timeout=seconds + 60)
    for line in out.splitlines():
        if line.startswith("WRK_RESULT "):
            return {k: float(v) for k, v in json.loads(line.removeprefix("WRK_RESULT ")).items()}
    raise BenchError(f"wrk printed no result line; its output:\n{out[-2000:]}")


# --- the floor: in this process, no TorchServe ----------------------------------------------------------


def _time_calls(fn: Callable[[], object], seconds: float, warmup: int = 50) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    while True:
        t0 = clock()
        fn()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 >= end and len(samples) >= 20:
            break
    arr = np.asarray(samples, dtype=np.float64) / 1e6
    return {
        "calls": float(len(arr)),
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
        "calls_per_s": float(len(arr) / (arr.sum() / 1e3)),
    }


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BenchError(f"{path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _context(
    model_dir: Path, name: str, metrics_yaml: Path, manifest: dict[str, Any], yaml_config: dict[str, Any]
) -> Any:
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    cache = MetricsCacheYamlImpl(str(metrics_yaml))
    cache.initialize_cache()
    cache.model_name = name
    return Context(
        name, str(model_dir), manifest, 1, None, "0.12.0", metrics=cache, model_yaml_config=yaml_config
    )


def _handle_once(handler: Any, ctx: Any, body: bytes) -> Any:
    """One request through ``handler.handle`` as a TorchServe worker calls it (batch of one)."""
    from ts.context import RequestProcessor

    ctx.request_ids = {0: "bench"}
    ctx.request_processor = [RequestProcessor({})]
    ctx.metrics.set_request_ids(ctx.request_ids)
    return handler.handle([{"body": body}], ctx)


@contextlib.contextmanager
def _as_worker_process() -> Iterator[None]:
    """Logging and signals as in a TorchServe worker for the duration, then this process's own again.

    A worker logs at INFO to its stdout, which the frontend reads: every metric update is such a line.
    Here the lines go to /dev/null, so that their cost is counted without filling the console. A
    handler's initialize() may change log levels and the SIGTERM handler of the process it runs in.
    """
    names = ("", "ts", "ts.metrics", "rlops_server", "rlops_server.torchserve.handler")
    levels = {name: logging.getLogger(name).level for name in names}
    root = logging.getLogger()
    handlers = root.handlers[:]
    sigterm = signal.getsignal(signal.SIGTERM)
    with open(os.devnull, "w", encoding="utf-8") as sink:
        sink_handler = logging.StreamHandler(sink)
        root.handlers = [sink_handler]
        root.setLevel(logging.INFO)
        try:
            yield
        finally:
            root.handlers = handlers
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            signal.signal(signal.SIGTERM, sigterm)


def measure_floor(
    version_dir: Path, work: Path, singles: list[bytes], batches: list[bytes], seconds: float
) -> list[dict[str, Any]]:
    """The forward pass alone and each handler's whole Python path, one torch thread, no TorchServe."""
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    module = torch.jit.load(str(version_dir / "policy.pt"), map_location="cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    single_obs = torch.tensor(json.loads(singles[0])["observation"], dtype=torch.float32)[None, :]
    batch_obs = torch.tensor(json.loads(batches[0])["observations"], dtype=torch.float32)
    for n, x in ((1, single_obs), (16, batch_obs[:16].contiguous()), (BATCH_OBS, batch_obs)):

        def forward(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return module(x)

        rows.append({"what": "TorchScript forward", "observations": n, **_time_calls(forward, seconds)})

    # Each handler's own work per request, as a TorchServe worker runs it, minus the frontend and the
    # socket to it. The rlops handler logs decisions and collects metrics, as it does when served.
    from rlops_server.torchserve.handler import PolicyHandler

    metrics_yaml = mc.write_metrics_config(work / "inproc" / "metrics.yaml")
    card = json.loads((version_dir / "model-card.json").read_text(encoding="utf-8"))
    with _as_worker_process():
        ours = PolicyHandler()
        try:
            ours.initialize(
                _context(
                    version_dir,
                    card["name"],
                    metrics_yaml,
                    {"model": {"modelName": card["name"], "modelVersion": str(card["version"])}},
                    {"handler": {"decision_log_dir": str(work / "inproc" / "decisions")}},
                )
            )
            for n, body in ((1, singles[0]), (BATCH_OBS, batches[0])):
                call = functools.partial(_handle_once, ours, ours.context, body)
                rows.append(
                    {"what": "rlops handler, in-process", "observations": n, **_time_calls(call, seconds)}
                )
        finally:
            with contextlib.suppress(AttributeError):
                ours.shutdown()

    with _as_worker_process():
        naive = _load_module(NAIVE_HANDLER, "naive_handler").NaivePolicyHandler()
        manifest = {
            "model": {"modelName": NAIVE_MODEL, "serializedFile": "policy.pt", "handler": "naive_handler.py"}
        }
        naive_ctx = _context(version_dir, NAIVE_MODEL, mc.torchserve_default_metrics_config(), manifest, {})
        naive.initialize(naive_ctx)
        for n, body in ((1, singles[0]), (BATCH_OBS, batches[0])):
            call = functools.partial(_handle_once, naive, naive_ctx, body)
            rows.append(
                {"what": "naive handler, in-process", "observations": n, **_time_calls(call, seconds)}
            )
    for row in rows:
        row["obs_per_s"] = row["calls_per_s"] * row["observations"]
    return rows


# --- servers --------------------------------------------------------------------------------------------


def _torchserve_env(run_dir: Path) -> dict[str, str]:
    # TorchServe's launcher keeps its pid file in TMPDIR and `torchserve --stop` stops whatever that file
    # names: a private TMPDIR keeps this server apart from any other TorchServe on the machine.
    tmp = run_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(run_dir / "logs")}


def _wait_ready(running: Running, model: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    problem = "no answer"
    while time.monotonic() < deadline:
        if not psutil.pid_exists(running.frontend_pid):
            raise BenchError(f"TorchServe exited while starting; logs in {running.run_dir / 'logs'}")
        try:
            # TorchServe writes its key file while starting: a half-written one is read again next time.
            keys = read_keys(running.run_dir)
            _, described = _http(f"{running.management_url}/models/{model}", key=keys.get("management"))
        except (OSError, ServeError) as e:
            problem = str(e)
        else:
            if isinstance(described, list) and described:
                states = [w.get("status") for w in described[0].get("workers", [])]
                ready = states.count("READY")
                if ready >= 1 and ready == len(states) and "inference" in keys:
                    running.key = keys["inference"]
                    return
                problem = f"workers {states}"
            else:
                problem = str(described)[:200]
        time.sleep(0.5)
    raise BenchError(f"TorchServe was not ready within {START_TIMEOUT_S} s ({problem})")


@contextlib.contextmanager
def naive_server(work: Path, version_dir: Path, spec: ServerSpec) -> Iterator[Running]:
    """The naive handler under TorchServe's defaults: config.properties sets only ports and the store."""
    run_dir = work / spec.key
    store = run_dir / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    env = _torchserve_env(run_dir)
    _run(
        [
            str(BIN / "torch-model-archiver"),
            "--model-name", NAIVE_MODEL,
            "--version", "1",
            "--serialized-file", str(version_dir / "policy.pt"),
            "--handler", str(NAIVE_HANDLER),
            "--extra-files", str(version_dir / "model-card.json"),
            "--export-path", str(store),
            "--force",
        ],
        "torch-model-archiver (naive handler)",
        timeout=300,
        env=env,
    )  # fmt: skip
    ports = _free_ports()
    config = run_dir / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports.inference}",
                f"management_address=http://127.0.0.1:{ports.management}",
                f"metrics_address=http://127.0.0.1:{ports.metrics}",
                f"grpc_inference_port={ports.grpc}",
                f"grpc_management_port={ports.grpc + 1}",
                f"model_store={store}",
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    cmd = [str(BIN / "torchserve"), "--start", "--ncs", "--model-store", str(store), "--models",
           f"{NAIVE_MODEL}={NAIVE_MODEL}.mar", "--ts-config", str(config)]  # fmt: skip
    try:
        with open(run_dir / "torchserve.out", "ab") as out:
            subprocess.run(cmd, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=60,
                           check=True, stdin=subprocess.DEVNULL)  # fmt: skip
        pid = _frontend_pid(run_dir)
        if pid is None:
            raise BenchError(f"TorchServe wrote no pid file; see {run_dir / 'torchserve.out'}")
        running = Running(
            spec=spec,
            run_dir=run_dir,
            inference_url=f"http://127.0.0.1:{ports.inference}",
            management_url=f"http://127.0.0.1:{ports.management}",
            metrics_url=f"http://127.0.0.1:{ports.metrics}/metrics",
            predict_path=f"/predictions/{NAIVE_MODEL}",
            key="",
            model=NAIVE_MODEL,
            frontend_pid=pid,
        )
        _wait_ready(running, NAIVE_MODEL)
        yield running
    finally:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([str(BIN / "torchserve"), "--stop"], cwd=run_dir, env=env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip
        _kill_leftovers(run_dir)


def start_rlops(
    work: Path, registry: Path, name: str, spec: ServerSpec, run_dir: Path, decision_root: Path, ports: Ports
) -> Running:
    """``rlops serve start`` with the spec's batching, decision log and metrics on; returns when it is ready.

    Also how a stopped or killed server is started again in the same run directory (robustness.py).
    """
    cmd = [
        str(RLOPS), "serve", "start",
        "--name", name,
        "--registry", str(registry),
        "--run-dir", str(run_dir),
        "--port", str(ports.inference),
        "--management-port", str(ports.management),
        "--metrics-port", str(ports.metrics),
        "--grpc-port", str(ports.grpc),
        "--decision-log-dir", str(decision_root),
        "--batch-size", str(spec.batch_size),
        "--max-batch-delay-ms", str(spec.max_batch_delay_ms),
        "--batcher", spec.batcher,
        "--workers", str(spec.workers),
    ]  # fmt: skip
    _run(cmd, f"rlops serve start ({spec.key})", timeout=START_TIMEOUT_S + 60, cwd=work)
    state = json.loads((run_dir / "state.json").read_text(encoding="utf-8"))
    keys = read_keys(run_dir)
    if "inference" not in keys:
        raise BenchError(f"{run_dir / 'key_file.json'}: no inference key")
    return Running(
        spec=spec,
        run_dir=run_dir,
        inference_url=state["inference_url"],
        management_url=state["management_url"],
        metrics_url=state["metrics_url"],
        predict_path=f"/predictions/{name}",
        key=keys["inference"],
        frontend_pid=int(state["pid"]),
        model=name,
        decision_dir=decision_root / "decisions",
    )


def stop_rlops(work: Path, run_dir: Path) -> None:
    """``rlops serve stop`` (workers write their queued decisions), then kill whatever is left of it."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        subprocess.run([str(RLOPS), "serve", "stop", "--run-dir", str(run_dir)], capture_output=True,
                       timeout=90, stdin=subprocess.DEVNULL, cwd=work)  # fmt: skip
    _kill_leftovers(run_dir)


@contextlib.contextmanager
def rlops_server(work: Path, registry: Path, name: str, spec: ServerSpec) -> Iterator[Running]:
    """``rlops serve start`` with the spec's batching; decision log and metrics on; stopped on exit."""
    run_dir = work / spec.key
    try:
        yield start_rlops(work, registry, name, spec, run_dir, work / f"{spec.key}-logs", _free_ports())
    finally:
        stop_rlops(work, run_dir)


# --- measuring ------------------------------------------------------------------------------------------


def _describe(running: Running) -> list[dict[str, Any]]:
    """Workers, batch size and batch delay of every served version, as TorchServe reports them."""
    key = read_keys(running.run_dir).get("management")
    status, described = _http(f"{running.management_url}/models/{running.model}/all", key=key)
    if status != 200 or not isinstance(described, list):
        raise BenchError(f"{running.spec.key}: describing {running.model} failed ({status}): {described}")
    return [
        {
            "version": d.get("modelVersion"),
            "workers": len(d.get("workers", [])),
            "batch_size": d.get("batchSize"),
            "max_batch_delay_ms": d.get("maxBatchDelay"),
            "batcher": "adaptive" if d.get("continuousBatching") else "delay",
        }
        for d in described
    ]


def _check_answers(running: Running, single: bytes, batch: bytes) -> dict[str, Any]:
    """One request of each kind with an ordinary HTTP client: the server answers what wrk will send."""
    url = running.inference_url + running.predict_path
    status, answer = _http(url, key=running.key, body=single)
    action = answer.get("action") if isinstance(answer, dict) else None
    # An action index, or an action vector (Box).
    vector = isinstance(action, list) and bool(action) and all(isinstance(a, float) for a in action)
    if status != 200 or not (isinstance(action, int) or vector):
        raise BenchError(f"{running.spec.key}: a single request was answered {status}: {answer}")
    status_b, answer_b = _http(url, key=running.key, body=batch)
    n = len(json.loads(batch)["observations"])
    answered = (answer_b.get("decisions") or answer_b.get("actions")) if isinstance(answer_b, dict) else None
    if status_b != 200 or not isinstance(answered, list) or len(answered) != n:
        raise BenchError(
            f"{running.spec.key}: a batch request was answered {status_b}: {str(answer_b)[:300]}"
        )
    return {"single": answer, "batch_first": answered[0]}


def measure_point(
    running: Running, script: Path, kind: str, clients: int, obs_per_request: int, args: Settings
) -> tuple[Point, dict[str, float]]:
    """Warm up, then measure one point; returns it and the warm-up's wrk result (for the decision count)."""
    url = running.inference_url + running.predict_path
    warm = run_wrk(url, script, clients, args.warmup, args.wrk_threads)
    before_metrics = _scrape(running.metrics_url)
    before_cpu = _cpu_by_role(running.frontend_pid)
    before_busy, before_children = _busy_seconds(), _children_cpu()
    load = os.getloadavg()[0]
    res = run_wrk(url, script, clients, args.duration, args.wrk_threads)
    wrk_cpu = _children_cpu() - before_children
    busy = _busy_seconds() - before_busy
    after_cpu = _cpu_by_role(running.frontend_pid)
    after_metrics = _scrape(running.metrics_url)

    duration = res["duration_us"] / 1e6
    requests = int(res["requests"])
    errors = {k: int(res[k]) for k in ("connect", "read", "write", "status", "timeout") if res[k]}
    ok = max(0, requests - int(res["status"]))
    per = max(requests, 1)
    frontend = after_cpu["frontend"] - before_cpu["frontend"]
    workers = after_cpu["workers"] - before_cpu["workers"]
    cpu = {
        "frontend_ms_per_request": 1e3 * frontend / per,
        "workers_ms_per_request": 1e3 * workers / per,
        "wrk_ms_per_request": 1e3 * wrk_cpu / per,
        "frontend_cores": frontend / duration,
        "workers_cores": workers / duration,
        "wrk_cores": wrk_cpu / duration,
        "machine_busy_cores": busy / duration,
        "other_cores": max(0.0, (busy - frontend - workers - wrk_cpu) / duration),
    }
    point = Point(
        server=running.spec.key,
        kind=kind,
        clients=clients,
        obs_per_request=obs_per_request,
        duration_s=duration,
        requests=requests,
        errors=errors,
        rps=requests / duration,
        obs_per_s=ok * obs_per_request / duration,
        latency_ms={
            "p50": res["p50_us"] / 1e3,
            "p90": res["p90_us"] / 1e3,
            "p99": res["p99_us"] / 1e3,
            "p99.9": res["p999_us"] / 1e3,
            "mean": res["mean_us"] / 1e3,
            "max": res["max_us"] / 1e3,
        },
        loadavg_1m=load,
        cpu=cpu,
        server_side=_server_side(before_metrics, after_metrics),
    )
    return point, warm


def _server_side(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-request means over a point from TorchServe's counters and rlops' latency histogram."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    out: dict[str, float] = {}
    served = delta("ts_inference_requests_total")
    if served > 0:
        # Frontend-measured time from handing a request to a worker until its answer came back, and the
        # time it waited in the model's queue before that.
        out["ts_inference_ms"] = delta("ts_inference_latency_microseconds") / served / 1e3
        out["ts_queue_ms"] = delta("ts_queue_latency_microseconds") / served / 1e3
    handled = delta(f"{rm.INFERENCE_LATENCY}_count")
    if handled > 0:
        # rlops' handler time of the server batch, observed once per request (its metrics are handed over
        # once a second, so this is a mean over the point give or take a second at either end).
        out["handler_ms"] = 1e3 * delta(f"{rm.INFERENCE_LATENCY}_sum") / handled
    return out


@dataclass(frozen=True)
class Settings:
    duration: int
    warmup: int
    clients: tuple[int, ...]
    batch_clients: tuple[int, ...]
    wrk_threads: int
    floor_seconds: float
    server_warmup: int
    """Seconds of load right after a server starts, before any point: the JVM compiles TorchServe's hot
    paths in its first minute (its C2 compiler thread alone took a quarter of a core), which would
    otherwise be charged to the first points."""


def _count_decisions(directory: Path) -> dict[str, int]:
    if not directory.is_dir():
        return {"records": 0, "files": 0, "unfinished_files": 0}
    records = files = 0
    for path in directory.rglob("*.jsonl"):
        files += 1
        with open(path, "rb") as f:
            records += sum(1 for _ in f)
    unfinished = sum(1 for p in directory.rglob("*") if p.is_file() and not p.name.endswith(".jsonl"))
    return {"records": records, "files": files, "unfinished_files": unfinished}


def measure_server(
    running: Running,
    singles: list[bytes],
    batches: list[bytes],
    settings: Settings,
    progress: Progress,
    task: Any,
) -> dict[str, Any]:
    work = running.run_dir
    single_lua = write_lua(work / "single.lua", running.predict_path, running.key, singles)
    batch_lua = write_lua(work / "batch.lua", running.predict_path, running.key, batches)
    check = _check_answers(running, singles[0], batches[0])
    described = _describe(running)
    answered = 1 + BATCH_OBS  # the two checked requests
    url = running.inference_url + running.predict_path
    progress.update(task, description=f"{running.spec.key}: warming up")
    single_share = max(1, round(settings.server_warmup * 2 / 3))
    for script, clients, seconds, per_request in (
        (single_lua, 16, single_share, 1),
        (batch_lua, 4, max(1, settings.server_warmup - single_share), BATCH_OBS),
    ):
        warm = run_wrk(url, script, clients, seconds, settings.wrk_threads)
        answered += max(0, int(warm["requests"]) - int(warm["status"])) * per_request
    points = []
    plan = [("single", c, 1, single_lua) for c in settings.clients]
    plan += [("batch", c, BATCH_OBS, batch_lua) for c in settings.batch_clients]
    for kind, clients, per_request, script in plan:
        progress.update(task, description=f"{running.spec.key}: {kind} × {clients} clients")
        point, warm = measure_point(running, script, kind, clients, per_request, settings)
        points.append(point)
        for r in (warm, {"requests": point.requests, "status": point.errors.get("status", 0)}):
            answered += max(0, int(r["requests"]) - int(r["status"])) * per_request
        progress.advance(task)
    final_metrics: dict[str, float] = {}
    if running.decision_dir is not None:
        time.sleep(1.5)  # the recorder hands its counters over once a second
        final_metrics = _scrape(running.metrics_url)
    return {
        "check": check,
        "described": described,
        "points": points,
        "answered_observations": answered,
        "metrics": {
            k: v for k, v in final_metrics.items() if k.startswith(("rlops_decision", "rlops_fallback"))
        },
    }


# --- reporting ------------------------------------------------------------------------------------------


def _ratio(points: list[Point]) -> None:
    naive = {(p.kind, p.clients): p for p in points if p.server == "naive"}
    for p in points:
        base = naive.get((p.kind, p.clients))
        if base is not None and base.obs_per_s > 0:
            p.ratio_vs_naive = p.obs_per_s / base.obs_per_s


def _at_most(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def targets(points: list[Point]) -> list[dict[str, Any]]:
    """Issue 3's targets for each rlops configuration: value, limit, pass."""
    out = []
    for server in sorted({p.server for p in points if p.server != "naive"}):
        single = {p.clients: p for p in points if p.server == server and p.kind == "single"}
        batch = [p for p in points if p.server == server and p.kind == "batch"]

        def add(target: str, value: float | None, limit: str, ok: bool | None, server: str = server) -> None:
            out.append({"server": server, "target": target, "value": value, "limit": limit, "pass": ok})

        p1, p16, p64 = single.get(1), single.get(16), single.get(64)
        p50_1 = p1.latency_ms["p50"] if p1 else None
        add("1 client p50 (ms)", p50_1, f"≤ {TARGET_P50_1_MS}", _at_most(p50_1, TARGET_P50_1_MS))
        p99_16 = p16.latency_ms["p99"] if p16 else None
        add("16 clients p99 (ms)", p99_16, f"≤ {TARGET_P99_16_MS:g}", _at_most(p99_16, TARGET_P99_16_MS))
        ratio = p64.ratio_vs_naive if p64 else None
        ok_ratio = None if ratio is None else ratio >= TARGET_RATIO_64
        add("64 clients throughput vs naive", ratio, f"≥ {TARGET_RATIO_64:g}×", ok_ratio)
        p99_64 = p64.latency_ms["p99"] if p64 else None
        add("64 clients p99 (ms)", p99_64, f"≤ {TARGET_P99_64_MS:g}", _at_most(p99_64, TARGET_P99_64_MS))
        best = max((p.obs_per_s for p in batch), default=None)
        ok_batch = None if best is None else best >= TARGET_BATCH_OBS_S
        add("batch endpoint observations/s", best, f"≥ {TARGET_BATCH_OBS_S:,.0f}", ok_batch)
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render_markdown(result: dict[str, Any]) -> str:
    points = [Point(**p) for p in result["points"]]
    labels = {s["key"]: s["label"] for s in result["servers"]}
    policy = result["policy"]
    lines = [
        "# Serving load benchmark",
        "",
        f"Run {result['started_at']} on {result['machine']['cpus']} CPUs "
        f"(load average {result['machine']['loadavg_start'][0]:.2f} at the start, "
        f"{result['machine']['loadavg_end'][0]:.2f} at the end); commit {result['machine']['commit']}.",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"wrk {result['settings']['wrk_threads']} thread(s), connections = clients, "
        f"{result['settings']['warmup']} s warm-up and {result['settings']['duration']} s measured per "
        "point; "
        "keep-alive POSTs with the inference token. Latencies are wrk's, in ms. "
        "rlops servers log every decision and collect metrics.",
        "",
        f"Policy: {policy['name']} version {policy['version']} ({policy['algorithm']}, hidden layers "
        f"{policy['hidden']}, {policy['obs_dim']} features, {policy['actions']}). Servers as "
        "TorchServe describes them: "
        + "; ".join(
            f"{key}: {d['workers']} worker(s), batch size {d['batch_size']}, "
            + (
                f"adaptive batcher, up to {d['max_batch_delay_ms']} ms to fill a batch while requests wait"
                if d.get("batcher") == "adaptive"
                else f"TorchServe's batcher, max batch delay {d['max_batch_delay_ms']} ms"
            )
            for key, check in result["checks"].items()
            for d in check["described"]
        )
        + ".",
        "",
        "## Single-observation requests",
        "",
        "| server | clients | requests/s | p50 | p90 | p99 | p99.9 | vs naive | non-2xx | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if p.kind == "single":
            lines.append(
                f"| {labels[p.server]} | {p.clients} | {p.rps:,.0f} | {_fmt(p.latency_ms['p50'])} | "
                f"{_fmt(p.latency_ms['p90'])} | {_fmt(p.latency_ms['p99'])} | "
                f"{_fmt(p.latency_ms['p99.9'])} | "
                f"{_fmt(p.ratio_vs_naive) + '×' if p.ratio_vs_naive else '–'} | "
                f"{sum(p.errors.values())} | {p.loadavg_1m:.2f} |"
            )
    lines += [
        "",
        f"## Batch requests ({BATCH_OBS} observations each)",
        "",
        "| server | clients | requests/s | observations/s | p50 | p99 | vs naive | non-2xx | load 1m |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if p.kind == "batch":
            lines.append(
                f"| {labels[p.server]} | {p.clients} | {p.rps:,.0f} | {p.obs_per_s:,.0f} | "
                f"{_fmt(p.latency_ms['p50'])} | {_fmt(p.latency_ms['p99'])} | "
                f"{_fmt(p.ratio_vs_naive) + '×' if p.ratio_vs_naive else '–'} | "
                f"{sum(p.errors.values())} | {p.loadavg_1m:.2f} |"
            )
    lines += [
        "",
        "## The floor (in-process, one torch thread, no TorchServe)",
        "",
        "| what | observations per call | p50 ms | p99 ms | calls/s | observations/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["floor"]:
        lines.append(
            f"| {row['what']} | {row['observations']} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} | "
            f"{row['calls_per_s']:,.0f} | {row['obs_per_s']:,.0f} |"
        )
    lines += [
        "",
        "## Targets (issue 3)",
        "",
        "| server | target | value | limit | pass |",
        "|---|---|---:|---|---|",
    ]
    for t in result["targets"]:
        verdict = {True: "yes", False: "**no**", None: "–"}[t["pass"]]
        lines.append(
            f"| {labels[t['server']]} | {t['target']} | {_fmt(t['value'])} | {t['limit']} | {verdict} |"
        )
    lines += [
        "",
        "## Where the time goes",
        "",
        "CPU milliseconds per request of TorchServe's Java frontend, its Python workers and wrk; the "
        "machine's busy cores during the point and the share of processes outside the benchmark ('other'). "
        "`ts inference` is TorchServe's own count of the time from handing a request to a worker until "
        "its answer, `queue` the wait before that, `handler` rlops' handler time (means per request).",
        "",
        "| server | kind | clients | frontend ms | workers ms | wrk ms | busy cores | other cores | "
        "ts inference ms | queue ms | handler ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        c, s = p.cpu, p.server_side
        lines.append(
            f"| {labels[p.server]} | {p.kind} | {p.clients} | {c['frontend_ms_per_request']:.3f} | "
            f"{c['workers_ms_per_request']:.3f} | {c['wrk_ms_per_request']:.3f} | "
            f"{c['machine_busy_cores']:.2f} | {c['other_cores']:.2f} | {_fmt(s.get('ts_inference_ms'), 3)} | "
            f"{_fmt(s.get('ts_queue_ms'), 3)} | {_fmt(s.get('handler_ms'), 3)} |"
        )
    lines += ["", "## Decision log", ""]
    for key, log in result["decision_logs"].items():
        lines.append(
            f"- {labels[key]}: {log['records']:,} records in {log['files']} file(s) for "
            f"{log['answered_observations']:,} observations answered within wrk's runs (requests still in "
            f"flight when wrk stops are answered and logged but not counted by wrk); "
            f"dropped (metric): {log['dropped']:.0f}; unfinished files after stop: {log['unfinished_files']}."
        )
    lines += [
        "",
        "For reference, the naive handler measured on this machine when the issue was written: "
        + "; ".join(f"{c} client(s) {r:,} rps, p99 {p99} ms" for c, (r, p99) in EARLIER_NAIVE.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _print_summary(result: dict[str, Any]) -> None:
    labels = {s["key"]: s["label"] for s in result["servers"]}
    table = Table(title="serving benchmark (latencies in ms)", show_lines=False)
    for col in ("server", "kind", "clients", "req/s", "obs/s", "p50", "p99", "vs naive", "load"):
        table.add_column(col, justify="left" if col in ("server", "kind") else "right")
    for raw in result["points"]:
        p = Point(**raw)
        table.add_row(
            p.server,
            p.kind,
            str(p.clients),
            f"{p.rps:,.0f}",
            f"{p.obs_per_s:,.0f}",
            _fmt(p.latency_ms["p50"]),
            _fmt(p.latency_ms["p99"]),
            _fmt(p.ratio_vs_naive) + "×" if p.ratio_vs_naive else "–",
            f"{p.loadavg_1m:.2f}",
        )
    console.print(table, width=max(console.width, 100))
    for t in result["targets"]:
        mark = {True: "[green]pass[/green]", False: "[red]FAIL[/red]", None: "–"}[t["pass"]]
        console.print(f"{mark}  {labels[t['server']]}: {t['target']} = {_fmt(t['value'])} ({t['limit']})")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("torchserve", "rlops-server"):
        with contextlib.suppress(Exception):
            out[dist] = importlib.metadata.version(dist)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        out["java"] = (java.stderr or java.stdout).splitlines()[0]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=30)
        out["wrk"] = (wrk.stdout or wrk.stderr).splitlines()[0]
    return out


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        if done.returncode == 0:
            return done.stdout.strip()
    return "unknown"


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"expected comma-separated positive integers such as 1,16,64, got {text!r}",
                                 param_hint=option)  # fmt: skip
    return values


@app.command()
def main(
    quick: Annotated[
        bool, typer.Option("--quick", help="Plumbing check: 3 s points, 1 s warm-up, fewer batch points.")
    ] = False,
    duration: Annotated[
        int | None, typer.Option("--duration", min=1, help="Seconds measured per point.")
    ] = None,
    warmup: Annotated[int | None, typer.Option("--warmup", min=1, help="Warm-up seconds per point.")] = None,
    server_warmup: Annotated[
        int | None,
        typer.Option("--server-warmup", min=1, help="Seconds of load after each server starts (default 20)."),
    ] = None,
    clients: Annotated[str, typer.Option("--clients", help="Clients for single requests.")] = "1,16,64",
    batch_clients: Annotated[
        str | None, typer.Option("--batch-clients", help="Clients for batch requests (default 1,4,16).")
    ] = None,
    wrk_threads: Annotated[
        int,
        typer.Option(
            "--wrk-threads",
            min=1,
            max=2,
            help="wrk threads (at most the connections). One drives 64 connections far below its limit and "
            "leaves the CPU to the server.",
        ),
    ] = 1,
    servers: Annotated[
        str,
        typer.Option("--servers", help=f"Which servers, of {', '.join(s.key for s in SERVERS)}."),
    ] = DEFAULT_SERVERS,
    registry: Annotated[
        Path | None,
        typer.Option(
            "--registry", file_okay=False, help="Serve this registry's champion instead of training."
        ),
    ] = None,
    env: Annotated[
        str,
        typer.Option(
            "--env", help=f"{ENV_ID} (Discrete actions) or {BOX_ENV_ID} (Box actions) for the trained policy."
        ),
    ] = ENV_ID,
    name: Annotated[
        str | None, typer.Option("--name", help="Policy name (default: cartpole, or pendulum for Box).")
    ] = None,
    train_steps: Annotated[
        int | None, typer.Option("--train-steps", min=1, help="BC steps of the served policy (default 100).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", file_okay=False, help="Where the results go (default: benchmarks/results/serving[-box])."
        ),
    ] = None,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep the working directory (servers' logs, decisions).")
    ] = False,
) -> None:
    """Run the serving load benchmark (see the module docstring)."""
    if shutil.which("wrk") is None:
        raise typer.BadParameter("wrk is not installed (Debian: apt-get install -y wrk)", param_hint="wrk")
    if env not in (ENV_ID, BOX_ENV_ID):
        raise typer.BadParameter(f"{env!r}: use {ENV_ID} or {BOX_ENV_ID}", param_hint="--env")
    box = env == BOX_ENV_ID
    name = name or ("pendulum" if box else "cartpole")
    out = out or RESULTS / ("serving-box" if box else "serving")
    wanted = [s.strip() for s in servers.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in {spec.key for spec in SERVERS}]
    if unknown or not wanted:
        raise typer.BadParameter(
            f"unknown server(s) {unknown}; known: {', '.join(s.key for s in SERVERS)}", param_hint="--servers"
        )
    settings = Settings(
        duration=duration or (3 if quick else 10),
        warmup=warmup or (1 if quick else 2),
        clients=_int_list(clients, "--clients"),
        batch_clients=_int_list(batch_clients or ("1,4" if quick else "1,4,16"), "--batch-clients"),
        wrk_threads=wrk_threads,
        floor_seconds=0.5 if quick else 2.0,
        server_warmup=server_warmup if server_warmup is not None else (4 if quick else 20),
    )
    specs = [s for s in SERVERS if s.key in wanted]
    # SIGTERM ends the run like Ctrl-C does, through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rlops-serving-bench-"))
    console.print(f"working directory {work}; load average {load_start[0]:.2f}")
    try:
        registry_dir, policy, version_dir = prepare_policy(
            work, registry.resolve() if registry else None, name, train_steps or (20 if quick else 100), env
        )
        card = json.loads((version_dir / "model-card.json").read_text(encoding="utf-8"))
        singles, batches = request_bodies(card)
        console.print("the floor: forward pass and handlers in-process")
        floor = measure_floor(version_dir, work, singles, batches, settings.floor_seconds)
        points: list[Point] = []
        decision_logs: dict[str, dict[str, Any]] = {}
        checks: dict[str, Any] = {}
        per_server = len(settings.clients) + len(settings.batch_clients)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("servers", total=per_server * len(specs))
            for spec in specs:
                progress.update(task, description=f"{spec.key}: starting")
                server = (
                    naive_server(work, version_dir, spec)
                    if spec.naive
                    else rlops_server(work, registry_dir, policy, spec)
                )
                with server as running:
                    measured = measure_server(running, singles, batches, settings, progress, task)
                points += measured["points"]
                checks[spec.key] = {"described": measured["described"], **measured["check"]}
                if running.decision_dir is not None:
                    # Counted after the stop: a clean stop writes every queued decision.
                    decision_logs[spec.key] = {
                        **_count_decisions(running.decision_dir),
                        "answered_observations": measured["answered_observations"],
                        # A counter that was never incremented is not exported at all.
                        "dropped": measured["metrics"].get(rm.DECISION_LOG_DROPPED, 0.0),
                        "logged_metric": measured["metrics"].get(rm.DECISIONS_LOGGED, 0.0),
                    }
        _ratio(points)
        result = {
            "started_at": started.isoformat(timespec="seconds"),
            "wall_s": (dt.datetime.now(dt.UTC) - started).total_seconds(),
            "command": shlex.join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
            "machine": {
                "cpus": psutil.cpu_count(),
                "platform": platform.platform(),
                "loadavg_start": list(load_start),
                "loadavg_end": list(os.getloadavg()),
                "commit": _commit(),
                "versions": _versions(),
            },
            "settings": asdict(settings),
            "policy": {
                "name": policy,
                "version": card["version"],
                "algorithm": card.get("algorithm"),
                "hidden": (card.get("hyperparameters") or {}).get("hidden"),
                "obs_dim": card["policy"]["input"]["shape"][1],
                "actions": (
                    f"{card['action_space']['shape'][0]}-dimensional Box actions"
                    if card["action_space"]["type"] == "Box"
                    else f"{card['action_space']['n']} actions"
                ),
            },
            "servers": [asdict(s) for s in specs],
            "floor": floor,
            "points": [asdict(p) for p in points],
            "targets": targets(points),
            "decision_logs": decision_logs,
            "checks": checks,
            "earlier_naive": {str(k): {"rps": v[0], "p99_ms": v[1]} for k, v in EARLIER_NAIVE.items()},
        }
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out / "results.md").write_text(render_markdown(result), encoding="utf-8")
        _print_summary(result)
        console.print(f"wrote {out / 'results.json'} and {out / 'results.md'} in {result['wall_s']:.0f} s")
    except BenchError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(1) from e
    finally:
        if keep_work:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app()
