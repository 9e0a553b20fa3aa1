"""Start, stop and inspect a local TorchServe (Java 17) that serves rlops archives.

Everything of one server lives in its run directory (mode 0700: it holds the keys)::

    <run_dir>/config.properties   server config (.config)
    <run_dir>/metrics.yaml        metrics config (.metrics_config)
    <run_dir>/log4j2.xml          the frontend's logging, quiet on the request path (.config)
    <run_dir>/model-store/        the archives it loads
    <run_dir>/key_file.json       TorchServe's token keys (written by TorchServe, mode 0600)
    <run_dir>/logs/               TorchServe's logs (ts_log.log, model_log.log, access_log.log …), each
                                  rolled over by size into ``<name>.<date>.<n>.log.gz`` (.config)
    <run_dir>/torchserve.out      the launcher's and the frontend's console output; the previous start's
                                  is torchserve.out.1 (… .5, older ones deleted)
    <run_dir>/tmp/                TorchServe's pid file and unpacked archives
    <run_dir>/state.json          what rlops started: pid, URLs, models (written once ready)

Configs, state and logs are mode 0640: the owner writes, the group reads, others nothing. TorchServe runs
with umask 027, so what it writes (logs, unpacked archives, the decision log of its workers) is not
readable by others either (:mod:`rlops_server.runfiles`).

TorchServe's launcher keeps its pid file in the temporary directory, one per machine by default, and
``torchserve --stop`` stops whatever that file names. Giving every server its own ``TMPDIR`` (and
working directory, where the key file goes) keeps two servers on one machine, such as a test and a
demo, from stopping each other.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
from rlops_contracts.durable import replace_atomic

from rlops_server.backend import ServeError
from rlops_server.runfiles import CONFIG_MODE, DIR_MODE, PRIVATE_DIR_MODE, RUN_UMASK, open_console_log
from rlops_server.torchserve.config import (
    ADAPTIVE,
    DELAY,
    LOG_CONFIG_FILE,
    LOG_MAX_BYTES,
    PROPERTIES_FILE,
    ServerConfig,
    install_batcher,
    write_log_config,
    write_properties,
)
from rlops_server.torchserve.metrics_config import write_metrics_config

STATE_FILE = "state.json"
KEY_FILE = "key_file.json"
CONSOLE_FILE = "torchserve.out"
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"


@dataclass
class ModelVersionState:
    name: str
    version: str
    alias: str | None
    archive: str
    batcher: str
    """How its workers batch: one of rlops_server.torchserve.config.BATCHERS."""


@dataclass
class ServerState:
    """What ``state.json`` records about a running server."""

    pid: int
    create_time: float
    run_dir: str
    inference_url: str
    management_url: str
    metrics_url: str
    key_file: str | None
    models: list[ModelVersionState] = field(default_factory=list)
    started_at: float = 0.0
    decision_log_dir: str | None = None

    @classmethod
    def read(cls, run_dir: Path) -> ServerState | None:
        path = run_dir / STATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            # A state file written before the batcher was recorded: TorchServe's own was the only one.
            data["models"] = [ModelVersionState(**{"batcher": DELAY, **m}) for m in data.get("models", [])]
            return cls(**data)
        except (ValueError, TypeError) as e:
            raise ServeError(
                f"{path}: not a server state file ({e}); remove it if no server runs there"
            ) from e

    def write(self, run_dir: Path) -> None:
        replace_atomic(run_dir / STATE_FILE, json.dumps(asdict(self), indent=2) + "\n", mode=CONFIG_MODE)


# --- HTTP ------------------------------------------------------------------------------------------


def read_keys(run_dir: Path) -> dict[str, str]:
    """TorchServe's current keys (``management``, ``inference``, ``API``) from the run dir's key file."""
    path = run_dir / KEY_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(f"{path}: not TorchServe's key file: {e}") from e
    return {k: v["key"] for k, v in data.items() if isinstance(v, dict) and "key" in v}


def inference_token(run_dir: Path) -> Callable[[], str | None]:
    """The inference key of the server in ``run_dir`` as a function that reads it afresh: a
    :class:`rlops_server.client.PolicyClient` given it keeps working across a restart."""
    return lambda: read_keys(run_dir).get("inference")


# --- processes -------------------------------------------------------------------------------------


def _frontend(state: ServerState) -> psutil.Process | None:
    """The server's Java process, if it still runs (and is the same process, not a reused pid)."""
    try:
        proc = psutil.Process(state.pid)
        if abs(proc.create_time() - state.create_time) > 1.0 or FRONTEND_CLASS not in proc.cmdline():
            return None
        return proc
    except psutil.Error:
        return None


def _read_pid(run_dir: Path) -> int | None:
    pid_file = run_dir / "tmp" / ".model_server.pid"
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _torchserve() -> str:
    """The torchserve launcher of this Python environment (so the workers use this interpreter)."""
    beside = Path(sys.executable).parent / "torchserve"
    if beside.is_file():
        return str(beside)
    found = shutil.which("torchserve")
    if found is None:
        raise ServeError("the torchserve command is not installed; pip install torchserve==0.12.0")
    return found


def _env(run_dir: Path, decision_log_dir: Path | None) -> dict[str, str]:
    tmp = run_dir / "tmp"
    env = dict(os.environ)
    env.update(
        TMPDIR=str(tmp),
        TEMP=str(tmp),
        LOG_LOCATION=str(run_dir / "logs"),
        METRICS_LOCATION=str(run_dir / "logs"),
        # One torch thread per worker: TorchServe runs one worker per core.
        OMP_NUM_THREADS="1",
    )
    if decision_log_dir is not None:
        env["RLOPS_DECISION_LOG_DIR"] = str(decision_log_dir.resolve())
    else:
        env.pop("RLOPS_DECISION_LOG_DIR", None)
    return env


def log_tail(run_dir: Path, lines: int = 40) -> str:
    """The last lines of the server's console output and logs, for error messages."""
    parts = []
    for path in (run_dir / CONSOLE_FILE, run_dir / "logs" / "model_log.log", run_dir / "logs" / "ts_log.log"):
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} ---\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs under {run_dir})"


def running_state(run_dir: Path) -> ServerState | None:
    """The state of the server in ``run_dir`` if it still runs, else None."""
    state = ServerState.read(run_dir)
    if state is None or _frontend(state) is None:
        return None
    return state


def start(
    run_dir: Path,
    config: ServerConfig,
    models: list[ModelVersionState],
    *,
    decision_log_dir: Path | None = None,
    access_log: bool = False,
    log_max_bytes: int = LOG_MAX_BYTES,
    wait_ready: Callable[[ServerState], None],
) -> ServerState:
    """Start TorchServe with ``config``; ``wait_ready(state)`` returns once it serves (or raises).

    ``config.model_store`` must already hold the archives. On failure the server is stopped again
    and the error carries the tail of its logs.
    """
    run_dir = Path(run_dir).resolve()
    if running_state(run_dir) is not None:
        raise ServeError(f"a server from {run_dir} is already running; stop it first (rlops serve stop)")
    run_dir.mkdir(parents=True, exist_ok=True)
    run_dir.chmod(PRIVATE_DIR_MODE)
    for sub in ("tmp", "logs"):
        (run_dir / sub).mkdir(exist_ok=True)
        (run_dir / sub).chmod(DIR_MODE)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    (run_dir / "tmp" / ".model_server.pid").unlink(missing_ok=True)
    write_metrics_config(config.metrics_config)
    try:
        install_batcher(run_dir, any(m.settings.batcher == ADAPTIVE for m in config.models))
    except OSError as e:
        raise ServeError(f"cannot install rlops' batcher for TorchServe in {run_dir}: {e}") from e
    properties = write_properties(run_dir / PROPERTIES_FILE, config)
    log_config = write_log_config(run_dir / LOG_CONFIG_FILE, access_log=access_log, max_bytes=log_max_bytes)
    for written in (config.metrics_config, properties, log_config):
        written.chmod(CONFIG_MODE)
    cmd = [
        _torchserve(),
        "--start",
        "--ncs",
        "--log-config",
        str(log_config),
        "--model-store",
        str(config.model_store.resolve()),
        "--ts-config",
        str(properties),
    ]
    with open_console_log(run_dir / CONSOLE_FILE) as out:
        launcher = subprocess.Popen(
            cmd,
            cwd=run_dir,
            env=_env(run_dir, decision_log_dir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=RUN_UMASK,
        )
    try:
        launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise ServeError(f"the torchserve launcher did not return within 60 s\n{log_tail(run_dir)}") from None
    pid = _read_pid(run_dir)
    if launcher.returncode != 0 or pid is None:
        raise ServeError(
            f"torchserve did not start (launcher exit {launcher.returncode})\n{log_tail(run_dir)}"
        )
    try:
        proc = psutil.Process(pid)
        state = ServerState(
            pid=pid,
            create_time=proc.create_time(),
            run_dir=str(run_dir),
            inference_url=config.inference_url,
            management_url=config.management_url,
            metrics_url=config.metrics_url,
            key_file=str(run_dir / KEY_FILE) if config.token_auth else None,
            models=models,
            started_at=time.time(),
            decision_log_dir=str(decision_log_dir.resolve()) if decision_log_dir else None,
        )
    except psutil.Error:
        raise ServeError(f"torchserve exited right after starting\n{log_tail(run_dir)}") from None
    try:
        wait_ready(state)
    except BaseException:
        _terminate(run_dir, state, timeout_s=15.0)
        raise
    state.write(run_dir)
    return state


def alive(state: ServerState) -> bool:
    """The server's frontend process still runs."""
    return _frontend(state) is not None


def _workers(frontend: psutil.Process) -> list[psutil.Process]:
    try:
        return [
            p for p in frontend.children(recursive=True) if "model_service_worker" in " ".join(p.cmdline())
        ]
    except psutil.Error:
        return []


def _terminate(run_dir: Path, state: ServerState, timeout_s: float) -> bool:
    """Stop the workers, then the frontend; kill what outlives ``timeout_s``. True if it had to kill.

    TorchServe's own shutdown kills its workers with SIGKILL, which would lose the decisions they still
    have queued. So the workers get SIGTERM first (the handler turns it into a normal exit that writes
    every queued decision); the frontend is stopped once they are gone.
    """
    frontend = _frontend(state)
    if frontend is None:
        return False
    deadline = time.monotonic() + timeout_s
    workers = _workers(frontend)
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, lingering = psutil.wait_procs(workers, timeout=max(1.0, deadline - time.monotonic()))
    try:
        procs = [frontend, *frontend.children(recursive=True), *lingering]
    except psutil.Error:
        procs = [frontend, *lingering]
    subprocess.run(
        [_torchserve(), "--stop"],
        cwd=run_dir,
        env=_env(run_dir, None),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    _, alive = psutil.wait_procs(procs, timeout=max(5.0, deadline - time.monotonic()))
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)
    return bool(alive)


def stop(run_dir: Path, timeout_s: float = 30.0) -> str:
    """Stop the server of ``run_dir``; returns what happened, in words."""
    run_dir = Path(run_dir).resolve()
    state = ServerState.read(run_dir)
    if state is None:
        return f"no server was started from {run_dir}"
    if _frontend(state) is None:
        (run_dir / STATE_FILE).unlink(missing_ok=True)
        return f"the server of {run_dir} (pid {state.pid}) was not running any more"
    killed = _terminate(run_dir, state, timeout_s)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    if killed:
        return (
            f"stopped the server of {run_dir} (pid {state.pid}); it did not exit within {timeout_s:.0f} s "
            "and was killed"
        )
    return f"stopped the server of {run_dir} (pid {state.pid})"
