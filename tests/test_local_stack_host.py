"""pytest-testinfra checks of the running local stack, started the way a user starts it.

One scenario for the module, in a temporary folder on free ports, through the ``rlops`` command:
``rlops feedback serve`` (the reward service), ``rlops serve start`` (TorchServe with a tiny policy of the
server tests, its logs rolling over at 1 KiB), a few decisions and rewards, both stopped and started again;
then ``rlops stack up`` (Prometheus, Alertmanager and the actions webhook, whose log rolls over at 2 KiB),
``rlops stack down`` and ``rlops stack up`` again. What the first runs left behind is read right after they
stop and right after the restarts; then testinfra's local host (``ss``, ``ps``, ``stat``) checks what runs:

- every process (and child) runs as the invoking user;
- every socket they listen on is on loopback, none on 0.0.0.0 or ``::``;
- secrets and the folders holding them are the owner's only, configs and logs are not readable by others;
- every log rotates: TorchServe's by size into numbered archives, the stack's console logs and
  TorchServe's on each start, the webhook's by size, the decision and reward logs on each stop.

The fixture stops everything it started in its ``finally``, whatever failed.
"""

from __future__ import annotations

import contextlib
import gzip
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import testinfra
from rlops_server.client import PolicyClient
from rlops_server.decision_log import TMP_SUFFIX, complete_files
from rlops_server.http import request_json
from rlops_server.torchserve import process
from rlops_stack import local
from server_testkit import free_ports, write_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
POLICY = "toy"
TS_LOG_MAX_BYTES = 1024
WEBHOOK_LOG_MAX_BYTES = 2048
LINE_SLACK = 4096
"""A log may pass its size limit by the one event that triggers the roll-over."""
STACK = (local.PROMETHEUS, local.ALERTMANAGER, local.WEBHOOK)
CONSOLE_LOGS = ("serve/torchserve.out", *(f"stack/logs/{name}.log" for name in STACK))


@dataclass
class Running:
    root: Path
    run_dir: Path
    stack_root: Path
    logs: Path
    """Log root of the decision log and the reward service."""
    ports: dict[str, int]
    services: dict[str, subprocess.Popen[bytes]]
    """The reward service now running (started by the test, like a user in a second terminal)."""
    answered: dict[int, list[str]] = field(default_factory=dict)
    """Decision ids answered by the first and the second start of TorchServe."""
    after_first_stop: dict[str, dict[str, bytes]] = field(default_factory=dict)
    """Files of each log folder (decisions, rewards) right after the first stop, by name."""
    console_before: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    """Each console log (relative to root) as its first run left it: (inode, content)."""
    console_kept: dict[str, tuple[int, bytes] | None] = field(default_factory=dict)
    """``<log>.1`` of each console log right after the restart (None: there was none)."""


def rlops(*args: object, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "rlops_cli.main", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (
        f"rlops {' '.join(cmd[3:])}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"
    )
    return proc.stdout


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)
    return value


def inode_and_bytes(path: Path) -> tuple[int, bytes]:
    return path.stat().st_ino, path.read_bytes()


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def start_feedback(r: Running, env: dict[str, str]) -> None:
    out = (r.root / "feedback.out").open("ab")
    cmd = [sys.executable, "-m", "rlops_cli.main", "feedback", "serve", "--dir", str(r.logs)]
    cmd += ["--port", str(r.ports["feedback"])]
    proc = subprocess.Popen(cmd, cwd=r.root, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    out.close()
    r.services["feedback"] = proc

    def healthy() -> bool:
        assert proc.poll() is None, (r.root / "feedback.out").read_text()
        try:
            return request_json("GET", f"http://127.0.0.1:{r.ports['feedback']}/healthz")[0] == 200
        except OSError:
            return False

    wait_for("the reward service answers /healthz", healthy)


def stop_feedback(r: Running) -> None:
    proc = r.services.pop("feedback", None)
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the clean shutdown: the reward log is sealed
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def decide_and_reward(r: Running, n: int) -> list[str]:
    """``n`` decisions from the served policy, each rewarded through the reward service."""
    url = f"http://127.0.0.1:{r.ports['inference']}"
    token = process.inference_token(r.run_dir)
    with PolicyClient(url, POLICY, token=token, timeout=30, retries=0) as client:
        decisions = [client.act([0.1 * i, 0.5, -0.5, 0.2]) for i in range(n)]
    assert not any(d.fallback for d in decisions), decisions
    ids = [d.decision_id for d in decisions]
    body = {"rewards": [{"decision_id": i, "reward": 1.0} for i in ids]}
    status, answer = request_json("POST", f"http://127.0.0.1:{r.ports['feedback']}/rewards", body=body)
    assert (status, answer) == (202, {"accepted": n})
    return ids


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("local-stack")
    registry = write_registry(root / "registry", candidate=False)
    names = ["inference", "management", "metrics", "grpc", "grpc+1", "prometheus", "alertmanager"]
    names += ["webhook", "feedback"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    ports["grpc+1"] = ports["grpc"] + 1  # rlops serve start puts gRPC management on the next port
    r = Running(root, root / "serve", root / "stack", root / "logs", ports, {})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RLOPS_REGISTRY": str(registry)}
    serve_start = (
        "serve", "start", "--name", POLICY, "--registry", registry, "--run-dir", r.run_dir,
        "--port", ports["inference"], "--management-port", ports["management"],
        "--metrics-port", ports["metrics"], "--grpc-port", ports["grpc"],
        "--decision-log-dir", r.logs, "--log-max-bytes", TS_LOG_MAX_BYTES, "--timeout", 240,
    )  # fmt: skip
    stack_up = (
        "stack", "up", "--root", r.stack_root, "--alerts-dir", REPO / "alerts",
        "--prometheus-port", ports["prometheus"], "--alertmanager-port", ports["alertmanager"],
        "--webhook-port", ports["webhook"], "--registry", registry, "--serve-run-dir", r.run_dir,
        "--target", f"torchserve=127.0.0.1:{ports['metrics']}",
        "--target", f"rlops-feedback=127.0.0.1:{ports['feedback']}",
        "--target", f"rlops-actions=127.0.0.1:{ports['webhook']}",
        "--webhook-log-max-bytes", WEBHOOK_LOG_MAX_BYTES, "--timeout", 120,
    )  # fmt: skip
    with contextlib.ExitStack() as cleanup:
        # Run last to first, each whatever the others did: the stack, TorchServe, the reward service.
        cleanup.callback(stop_feedback, r)
        cleanup.callback(process.stop, r.run_dir, 30.0)
        cleanup.callback(local.down, r.stack_root)

        start_feedback(r, env)
        rlops(*serve_start, cwd=root, env=env)
        r.answered[1] = decide_and_reward(r, 5)
        rlops("serve", "stop", "--run-dir", r.run_dir, cwd=root, env=env)
        stop_feedback(r)
        r.after_first_stop = {s: files_of(r.logs / s) for s in ("decisions", "rewards")}
        r.console_before["serve/torchserve.out"] = inode_and_bytes(r.run_dir / process.CONSOLE_FILE)

        start_feedback(r, env)
        rlops(*serve_start, cwd=root, env=env)
        r.answered[2] = decide_and_reward(r, 5)

        rlops(*stack_up, cwd=root, env=env)
        rlops("stack", "down", "--root", r.stack_root, cwd=root, env=env)
        for name in STACK:
            r.console_before[f"stack/logs/{name}.log"] = inode_and_bytes(
                r.stack_root / "logs" / f"{name}.log"
            )
        rlops(*stack_up, cwd=root, env=env)
        for rel in CONSOLE_LOGS:
            kept = root / f"{rel}.1"
            r.console_kept[rel] = inode_and_bytes(kept) if kept.is_file() else None
        yield r


@pytest.fixture(scope="module")
def host() -> Any:
    return testinfra.get_host("local://")


def processes(r: Running) -> dict[str, psutil.Process]:
    """Every process of the running stack and their children, by a label that says which it is."""
    found: dict[str, psutil.Process] = {}
    state = local.StackState.read(r.stack_root)
    assert state is not None, "the stack is not running"
    for component in state.components:
        found[component.name] = psutil.Process(component.pid)
    served = process.running_state(r.run_dir)
    assert served is not None, "TorchServe is not running"
    found["torchserve"] = psutil.Process(served.pid)
    found["feedback"] = psutil.Process(r.services["feedback"].pid)
    for name, proc in list(found.items()):
        for child in proc.children(recursive=True):
            found[f"{name} child {child.pid} ({child.name()})"] = child
    return found


def test_every_process_runs_as_the_invoking_user(running: Running, host: Any) -> None:
    found = processes(running)
    workers = [label for label in found if label.startswith("torchserve child")]
    assert workers, f"no TorchServe worker among {sorted(found)}"
    assert set(STACK) | {"torchserve", "feedback"} <= set(found)
    invoker = host.user()
    assert invoker.uid == os.getuid()
    for label, proc in found.items():
        seen = host.process.get(pid=proc.pid)
        assert (seen.ruid, seen.euid) == (invoker.uid, invoker.uid), (
            f"{label} (pid {proc.pid}: {seen.args}) runs as uid {seen.ruid}/{seen.euid}; "
            f"the invoker is {invoker.name} (uid {invoker.uid})"
        )
        assert seen.user == invoker.name


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # Java's sockets show IPv4 loopback as ::ffff:127.0.0.1
    return address.is_loopback


def test_every_socket_listens_on_loopback_only(running: Running, host: Any) -> None:
    listening: dict[tuple[str, str, int], str] = {}
    for label, proc in processes(running).items():
        for conn in proc.net_connections(kind="inet"):
            if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
                continue
            if conn.type == socket.SOCK_DGRAM and conn.raddr:
                continue  # a connected UDP socket receives from its peer only
            proto = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
            listening[(proto, conn.laddr.ip, conn.laddr.port)] = label
    # Every port the stack was told to use is among them (the check is not vacuous).
    assert set(running.ports.values()) <= {port for _, _, port in listening}, listening
    wrong = [f"{label}: {p}://{ip}:{port}" for (p, ip, port), label in listening.items() if not _loopback(ip)]
    assert wrong == [], "listening beyond loopback:\n" + "\n".join(wrong)
    for proto, ip, port in listening:
        # ss agrees: the socket is there, and nothing listens on that port on every interface.
        assert host.socket(f"{proto}://{ip}:{port}").is_listening, (proto, ip, port)
        assert not host.socket(f"{proto}://0.0.0.0:{port}").is_listening, (proto, port)
        assert not host.socket(f"{proto}://:::{port}").is_listening, (proto, port)


def test_secrets_are_the_owners_and_configs_and_logs_not_readable_by_others(
    running: Running, host: Any
) -> None:
    run_dir, stack = running.run_dir, running.stack_root
    secrets_dir = stack / "secrets"
    owner_only = [
        run_dir / process.KEY_FILE,  # TorchServe's management and inference keys
        *(p for p in secrets_dir.rglob("*") if p.is_file()),  # the webhook's token, receiver secrets
        stack / "alertmanager.yml",  # carries whatever the source config's receivers hold inline
    ]
    owner_only_dirs = [run_dir, secrets_dir, *(p for p in secrets_dir.rglob("*") if p.is_dir())]
    not_for_others = [
        *(run_dir / name for name in ("config.properties", "log4j2.xml", "metrics.yaml", "state.json")),
        *(stack / name for name in ("prometheus.yml", "state.json")),
        *sorted((stack / "rules").glob("*.yaml")),
        stack,
        stack / "logs",
        *sorted((stack / "logs").iterdir()),
        run_dir / "logs",
        *sorted((run_dir / "logs").iterdir()),
        run_dir / process.CONSOLE_FILE,
    ]
    assert any(p.parent == secrets_dir / "rlops-alertmanager" for p in owner_only), owner_only
    problems = []
    me = host.user().name
    for paths, forbidden, rule in (
        (owner_only, 0o077, "0600: the owner's only"),
        (owner_only_dirs, 0o077, "0700: it holds secrets"),
        (not_for_others, 0o007, "no access for others"),
    ):
        for path in paths:
            f = host.file(str(path))
            assert f.exists, path
            if f.mode & forbidden:
                problems.append(f"{path.relative_to(running.root)}: mode {f.mode:04o}, should be {rule}")
            if f.user != me:
                problems.append(f"{path.relative_to(running.root)}: owned by {f.user}, not {me}")
    assert problems == [], "\n".join(problems)


def test_torchserve_logs_roll_over_into_numbered_archives(running: Running, host: Any) -> None:
    logs = running.run_dir / "logs"
    assert host.file(str(logs)).is_directory
    assert f'size="{TS_LOG_MAX_BYTES}"' in (running.run_dir / "log4j2.xml").read_text()
    # Archives are compressed off the logging thread: wait until no plain one is left.
    wait_for("TorchServe's archives are compressed", lambda: not list(logs.glob("ts_log.*.log")), timeout=30)
    archives = sorted(logs.glob("ts_log.*.log.gz"))
    names = [p.name for p in archives]
    # Two starts and a stop write about 10 KiB to ts_log: several roll-overs, each into its own archive
    # (ts_log.<date>.<n>.log.gz), at most five a day (DefaultRolloverStrategy max).
    assert len(archives) >= 2, f"ts_log archives: {names}"
    per_day = Counter(name.split(".")[1] for name in names)
    assert max(per_day.values()) <= 5, f"ts_log archives: {names}"
    for archive in archives:
        size = len(gzip.decompress(archive.read_bytes()))
        assert 0 < size <= TS_LOG_MAX_BYTES + LINE_SLACK, (archive.name, size)
    assert (logs / "ts_log.log").stat().st_size <= TS_LOG_MAX_BYTES + LINE_SLACK


def test_console_logs_rotate_on_each_start(running: Running) -> None:
    for rel in CONSOLE_LOGS:
        inode, before = running.console_before[rel]
        assert before, f"{rel}: the first run wrote nothing"
        assert running.console_kept[rel] == (inode, before), f"{rel}.1 is not the first run's log"
        current = running.root / rel
        assert current.stat().st_ino != inode, f"{rel}: the restart appended to the first run's log"
        assert current.stat().st_size > 0, f"{rel}: the second run wrote nothing"


def test_the_webhook_log_rolls_over_by_size(running: Running) -> None:
    logs = running.stack_root / "logs"
    token = next((running.stack_root / "secrets").rglob("actions-token")).read_text().strip()
    url = f"http://127.0.0.1:{running.ports['webhook']}/alerts"
    # A scale-up of a version TorchServe does not serve: the webhook logs a failed action and acts on nothing.
    alert = {
        "status": "firing",
        "labels": {"alertname": "HostCheck", "action": "scale_up", "policy": POLICY, "version": "99"},
        "annotations": {"summary": "testinfra: log rotation"},
    }
    payload = {"version": "4", "alerts": [alert]}
    LOGGED = b"does not serve version 99"

    def rolled_over() -> bool:
        status, answer = request_json("POST", url, token=token, body=payload, timeout=30)
        assert status == 200, answer
        assert answer["results"][0]["outcome"] == "failed", answer
        return any(LOGGED in p.read_bytes() for p in logs.glob("webhook.log.*"))

    written = (logs / "webhook.log").stat().st_size

    def grown() -> str:
        return f"webhook.log grew from {written} to {(logs / 'webhook.log').stat().st_size} bytes"

    for _ in range(200):
        if rolled_over():
            break
    else:
        raise AssertionError(f"no roll-over after 200 logged actions: {grown()}")
    backups = sorted(logs.glob("webhook.log.*"))
    assert len(backups) <= local.LOG_BACKUPS, [p.name for p in backups]
    assert (logs / "webhook.log").stat().st_size <= WEBHOOK_LOG_MAX_BYTES + LINE_SLACK, grown()
    # The actions still go to the log being written after the roll-over.
    request_json("POST", url, token=token, body=payload, timeout=30)
    wait_for("the current log has the action", lambda: LOGGED in (logs / "webhook.log").read_bytes())


def _ids(text: bytes) -> set[str]:
    return {json.loads(line)["decision_id"] for line in text.splitlines() if line.strip()}


@pytest.mark.parametrize("stream", ["decisions", "rewards"])
def test_decision_and_reward_logs_are_sealed_on_stop_and_a_new_file_follows(
    running: Running, stream: str
) -> None:
    first = running.after_first_stop[stream]
    assert first, f"nothing under {stream}/ after the first stop"
    assert not [name for name in first if name.endswith(TMP_SUFFIX)], (
        f"{stream}: unsealed after stop: {first}"
    )
    assert set().union(*(_ids(text) for text in first.values())) == set(running.answered[1])
    # The first run's files are still there, unchanged; the second run writes its own.
    folder = running.logs / stream
    now = files_of(folder)
    assert {name: now.get(name) for name in first} == first

    def second_run_written() -> bool:
        newer = [text for name, text in files_of(folder).items() if name not in first]
        return set(running.answered[2]) <= set().union(set(), *(_ids(t) for t in newer))

    wait_for(f"the second run's {stream} are in a file of their own", second_run_written, timeout=30)
    assert {p.name for p in complete_files(folder)} >= {n for n in first if not n.endswith(TMP_SUFFIX)}
