"""The client-side canary split: sticky per episode, follows the split file, safe when it is broken."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rlops_delivery.split import DEFAULT, Split, SplitClient, read_split, split_path, write_split


class _Server(BaseHTTPRequestHandler):
    """Answers like TorchServe: the default version is 1, ``/predictions/<model>/<v>`` answers as v."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    hold = threading.Event()
    """Version 9 answers only once this is set."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        parts = self.path.strip("/").split("/")
        version = int(parts[2]) if len(parts) > 2 else 1
        if version == 9:
            self.hold.wait(30)
        if "observations" in body:
            answer: object = {
                "decisions": [
                    {"action": 0, "propensity": 1.0, "version": version, "decision_id": i}
                    for i in body["decision_ids"]
                ]
            }
        else:
            answer = {"action": 0, "propensity": 1.0, "version": version, "decision_id": body["decision_id"]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_assignment_is_deterministic_and_close_to_the_share() -> None:
    split = Split("p", champion=1, candidate=2, share=0.2, rollout="r1")
    keys = [f"episode-{i}" for i in range(5000)]
    chosen = [split.to_candidate(k) for k in keys]
    assert chosen == [split.to_candidate(k) for k in keys]
    assert 0.18 < sum(chosen) / len(keys) < 0.22
    # A larger share keeps every episode the smaller one sent to the candidate.
    wider = Split("p", 1, 2, 0.5, "r1")
    assert all(wider.to_candidate(k) for k, c in zip(keys, chosen, strict=True) if c)
    # Another rollout picks other episodes.
    other = Split("p", 1, 2, 0.2, "r2")
    assert [other.to_candidate(k) for k in keys] != chosen


def test_split_file_round_trip_and_errors(tmp_path: Path) -> None:
    assert read_split(tmp_path) is None
    split = Split("p", 1, 2, 0.1, "r")
    write_split(tmp_path, split)
    assert read_split(tmp_path) == split
    split_path(tmp_path).write_text("{")
    with pytest.raises(ValueError, match=r"canary.json: not a canary split file"):
        read_split(tmp_path)
    write_split(tmp_path, None)
    assert not split_path(tmp_path).exists()
    with pytest.raises(ValueError, match="share must be a fraction"):
        Split("p", 1, 2, 1.5, "r")


def test_client_follows_the_split_per_episode(url: str, tmp_path: Path) -> None:
    client = SplitClient(url, "p", run_dir=tmp_path, refresh_s=0.0)
    assert {client.act([0.0], episode_id="e0", step=0).version for _ in range(3)} == {1}
    write_split(tmp_path, Split("p", 1, 2, 0.3, "r"))
    versions: dict[str, set[int | str | None]] = {}
    for e in range(300):
        for step in range(3):
            d = client.act([0.0], episode_id=f"e{e}", step=step)
            versions.setdefault(f"e{e}", set()).add(d.version)
    assert all(len(v) == 1 for v in versions.values()), "an episode changed version"
    on_candidate = sum(v == {2} for v in versions.values())
    assert 60 < on_candidate < 120
    stats = client.stats()
    assert stats["routed"] == {DEFAULT: 3 + 3 * (300 - on_candidate), "2": 3 * on_candidate}
    assert stats["requests"] == 3 + 900
    assert stats["answered"] == {"1": 3 + 3 * (300 - on_candidate), "2": 3 * on_candidate}
    # Another policy's split, or none, sends everything to the default version.
    write_split(tmp_path, Split("other", 1, 2, 1.0, "r"))
    assert {client.act([0.0], episode_id=f"e{e}", step=9).version for e in range(50)} == {1}
    client.close()


def test_a_broken_split_file_sends_everything_to_the_default(url: str, tmp_path: Path) -> None:
    split_path(tmp_path).write_text('{"policy": "p"}')
    with SplitClient(url, "p", run_dir=tmp_path, refresh_s=0.0) as client:
        assert {client.act([0.0]).version for _ in range(20)} == {1}


def test_batches_are_split_per_episode_and_keep_their_order(url: str, tmp_path: Path) -> None:
    write_split(tmp_path, Split("p", 1, 7, 0.5, "r"))
    with SplitClient(url, "p", run_dir=tmp_path, refresh_s=0.0) as client:
        episodes = [f"e{i}" for i in range(40)]
        ids = [f"d{i}" for i in range(40)]
        decisions = client.act_batch([[0.0]] * 40, decision_ids=ids, episode_ids=episodes, steps=[0] * 40)
        split = read_split(tmp_path)
        assert split is not None
        assert [d.decision_id for d in decisions] == ids
        assert [d.version for d in decisions] == [7 if split.to_candidate(e) else 1 for e in episodes]


def test_a_split_client_does_not_take_a_version(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="asks the default version"):
        SplitClient("http://127.0.0.1:1", "p", run_dir=tmp_path, version=2)


def test_settle_waits_for_requests_in_flight(url: str, tmp_path: Path) -> None:
    write_split(tmp_path, Split("p", 1, 9, 1.0, "r"))
    _Server.hold.clear()
    with SplitClient(url, "p", run_dir=tmp_path, refresh_s=0.0, timeout=30.0) as client:
        asking = threading.Thread(target=lambda: client.act([0.0], episode_id="e0", step=0))
        asking.start()
        try:
            deadline = time.monotonic() + 10
            while client.stats()["routed"].get("9", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            # Routed and not yet answered: the counts do not compare until it comes back.
            assert client.stats()["routed"] == {"9": 1}
            assert client.stats()["answered"] == {}
            assert client.settle(0.1) is False
        finally:
            _Server.hold.set()
        assert client.settle(10.0) is True
        asking.join(10)
        assert client.stats()["answered"] == {"9": 1}
