"""Security of what runs, checked against the real processes: TorchServe (Java) and the reward service.

- the management API refuses a request without its key, or with the inference key;
- no model can be registered from a URL (the model API is off), not even with the management key;
- inference, management and metrics listen on 127.0.0.1 only by default;
- a policy.pt or model card changed by one byte after publishing is refused when the archive is built
  and, inside an archive, when a worker starts; the message names the file and both hashes;
- the reward service refuses a missing or wrong token and malformed bodies with 4xx.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import read_checksums, sha256_bytes
from rlops_server import serving
from rlops_server.backend import ServeError
from rlops_server.plan import ServePlan
from rlops_server.torchserve import process
from rlops_server.torchserve.archive import ArchiveError, build_archive
from rlops_server.torchserve.backend import start_server
from rlops_server.torchserve.config import METRICS_FILE, ModelSettings, ServedModel, ServerConfig
from server_testkit import OBS_DIM, free_ports, write_registry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def call(method: str, url: str, token: str | None = None, body: bytes | None = None) -> tuple[int, str]:
    """(status, body); a connection that is refused counts as status 0."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            return 0, str(e.reason)
        raise


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)  # Java listens on ::ffff:127.0.0.1 for 127.0.0.1
    return (mapped or address).is_loopback


@dataclass
class Running:
    run_dir: Path
    registry: Path
    status: serving.ServerStatus
    management_url: str

    def keys(self) -> dict[str, str]:
        return process.read_keys(self.run_dir)


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("security")
    registry = write_registry(root / "registry")
    port, management, metrics, grpc, _ = free_ports(5)
    plan = ServePlan(
        policy="toy",
        registry=registry,
        run_dir=root / "serve",
        port=port,
        management_port=management,
        metrics_port=metrics,
        grpc_port=grpc,
        decision_log_dir=None,
        timeout_s=300,
    )
    try:
        status = serving.start(plan)
        yield Running(plan.run_dir.resolve(), registry, status, f"http://127.0.0.1:{management}")
    finally:
        serving.stop(plan.run_dir)


def refused(answer: tuple[int, str]) -> bool:
    """TorchServe 0.12 answers a missing or wrong key with 400 and an InvalidKeyException (not 401)."""
    code, body = answer
    return code in (400, 401) and "key" in body.lower()


def test_the_management_api_refuses_requests_without_its_key(torchserve: Running) -> None:
    keys = torchserve.keys()
    models = f"{torchserve.management_url}/models"
    assert refused(call("GET", models))
    assert refused(call("GET", models, token="not-the-key"))
    assert refused(call("GET", models, token=keys["inference"]))
    assert refused(call("PUT", f"{models}/toy/1?min_worker=3", token=keys["inference"]))
    code, body = call("GET", models, token=keys["management"])
    assert code == 200, body
    assert [m["modelName"] for m in json.loads(body)["models"]] == ["toy"]


def test_inference_refuses_requests_without_its_key(torchserve: Running) -> None:
    url = f"{torchserve.status.inference_url}/predictions/toy"
    body = json.dumps({"observation": [0.1] * OBS_DIM}).encode()
    assert refused(call("POST", url, body=body))
    assert refused(call("POST", url, token=torchserve.keys()["management"], body=body))
    assert call("POST", url, token=torchserve.keys()["inference"], body=body)[0] == 200


@pytest.mark.parametrize(
    "source",
    ["https://torchserve.pytorch.org/mar_files/squeezenet1_1.mar", "file:///etc/passwd", "toy-v1.mar"],
)
def test_no_model_can_be_registered_over_the_api(torchserve: Running, source: str) -> None:
    token = torchserve.keys()["management"]
    code, body = call("POST", f"{torchserve.management_url}/models?url={source}&model_name=evil", token=token)
    assert 400 <= code < 500, body
    assert "evil" not in call("GET", f"{torchserve.management_url}/models", token=token)[1]


def test_every_port_listens_on_loopback_only_by_default(torchserve: Running) -> None:
    state = process.running_state(torchserve.run_dir)
    assert state is not None
    frontend = psutil.Process(state.pid)
    listening = [
        c.laddr
        for p in [frontend, *frontend.children(recursive=True)]
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    ports = {torchserve.status.inference_url.rsplit(":", 1)[1], torchserve.management_url.rsplit(":", 1)[1]}
    ports.add(torchserve.status.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert ports <= {str(a.port) for a in listening}, listening
    assert all(loopback(a.ip) for a in listening), listening


# --- a changed byte -------------------------------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


@pytest.mark.parametrize("victim", [POLICY_FILE, MODEL_CARD_FILE])
def test_a_changed_byte_in_the_registry_is_refused_at_archive(tmp_path: Path, victim: str) -> None:
    registry = write_registry(tmp_path / "registry")
    path = registry / "toy" / "1" / victim
    recorded = read_checksums(path.parent)[victim]
    data = path.read_bytes()
    path.write_bytes(_flip(data, data.index(b'"toy"') + 1 if victim == MODEL_CARD_FILE else len(data) // 2))
    with pytest.raises(ArchiveError) as refused:
        build_archive(registry, "toy", 1, tmp_path / "store")
    assert str(path) in str(refused.value)
    assert f"recorded {recorded}" in str(refused.value)
    assert f"file {sha256_bytes(path.read_bytes())}" in str(refused.value)


@pytest.mark.parametrize("victim", [POLICY_FILE, MODEL_CARD_FILE])
def test_a_changed_byte_in_an_archive_stops_the_worker(tmp_path: Path, victim: str) -> None:
    registry = write_registry(tmp_path / "registry", candidate=False)
    store = tmp_path / "serve" / "model-store"
    built = build_archive(registry, "toy", 1, store)
    with zipfile.ZipFile(built.path) as z:
        members = {name: z.read(name) for name in z.namelist()}
    recorded = read_checksums(registry / "toy" / "1")[victim]
    original = members[victim]
    # In the card, a byte of the name "toy" (still valid JSON and a valid card); in policy.pt, one inside.
    at = original.index(b'"toy"') + 1 if victim == MODEL_CARD_FILE else len(original) // 2
    members[victim] = _flip(original, at)
    with zipfile.ZipFile(built.path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    port, management, metrics, grpc, grpc_management = free_ports(5)
    settings = ModelSettings()
    config = ServerConfig(
        model_store=store,
        metrics_config=tmp_path / "serve" / METRICS_FILE,
        models=(ServedModel("toy", "1", built.path.name, settings),),
        inference_port=port,
        management_port=management,
        metrics_port=metrics,
        grpc_inference_port=grpc,
        grpc_management_port=grpc_management,
    )
    served = [process.ModelVersionState("toy", "1", "champion", built.path.name, settings.batcher)]
    with pytest.raises(ServeError) as refused:
        start_server(tmp_path / "serve", config, served, timeout_s=45)
    message = str(refused.value)
    assert process.running_state(tmp_path / "serve") is None
    assert f"{victim}: sha256 does not match" in message, message[-3000:]
    assert f"recorded {recorded}" in message
    assert f"file {sha256_bytes(members[victim])}" in message


# --- the reward service ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def feedback(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("feedback")
    (port,) = free_ports(1)
    env = {**os.environ, "RLOPS_FEEDBACK_TOKEN": "s3cret-token"}
    cmd = [sys.executable, "-m", "rlops_cli.main", "feedback", "serve", "--dir", str(root / "logs")]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while call("GET", f"{url}/healthz")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the reward service did not start: {proc.stderr.read() if proc.stderr else ''}"
                )
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


REWARD = {"decision_id": "d-1", "reward": 1.0, "terminated": False, "truncated": False}


@pytest.mark.parametrize(
    ("token", "body", "expected"),
    [
        (None, json.dumps(REWARD).encode(), 401),
        ("wrong-token", json.dumps(REWARD).encode(), 401),
        ("s3cret-token", b'{"decision_id": "d-1", "reward": ', 400),
        ("s3cret-token", json.dumps({**REWARD, "reward": "one"}).encode(), 422),
        ("s3cret-token", json.dumps({"reward": 1.0}).encode(), 422),
        ("s3cret-token", b"[1, 2, 3]", 400),
    ],
    ids=[
        "no token",
        "wrong token",
        "truncated JSON",
        "reward not a number",
        "no decision id",
        "not an object",
    ],
)
def test_the_reward_service_refuses_what_it_must(
    feedback: str, token: str | None, body: bytes, expected: int
) -> None:
    code, text = call("POST", f"{feedback}/rewards", token=token, body=body)
    assert code == expected, text
    assert "error" in json.loads(text)


def test_the_reward_service_takes_a_good_reward_with_its_token(feedback: str) -> None:
    code, text = call("POST", f"{feedback}/rewards", token="s3cret-token", body=json.dumps(REWARD).encode())
    assert 200 <= code < 300, text
