from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from rlops_server import decision_log
from rlops_server.decision_log import DECISION_FIELDS, DecisionLog, complete_files


def record(i: int, dim: int = 4, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "decision_id": f"d-{i}",
        "time": 1_700_000_000.0 + i,
        "policy": "cartpole",
        "version": 3,
        "episode_id": f"e-{i // 10}",
        "step": i % 10,
        "observation": [i * 0.25 + k for k in range(dim)],
        "action": i % 2,
        "propensity": 0.75,
        "log_density": None,
        "temperature": 1.0,
        "epsilon": 0.0,
        "std": None,
        "action_mask": None,
        "fallback": False,
    }
    rec.update(extra)
    return rec


def read_back(root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in complete_files(root):
        with open(f, encoding="utf-8") as fh:
            out.extend(json.loads(line) for line in fh)
    return out


class StalledLog(DecisionLog):
    """A log whose writer blocks until ``release`` is set: the queue fills up as on a stuck disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        super().__init__(*args, **kwargs)

    def _write_batch(self, batch: list[dict[str, Any] | bytes]) -> None:
        self.entered.set()
        self.release.wait(30)
        super()._write_batch(batch)


def test_record_fields_are_the_contract() -> None:
    assert tuple(record(0)) == DECISION_FIELDS


def test_clean_shutdown_keeps_every_record(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, max_queue=100_000)
    sent = [record(i) for i in range(5000)]
    for rec in sent:
        assert log.write(rec)
    assert log.close()
    assert read_back(tmp_path / "decisions") == sent
    assert (log.written, log.dropped, log.failed, log.pending) == (5000, 0, 0, 0)
    files = complete_files(tmp_path / "decisions")
    assert len(files) == 1
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert files[0].parent.name == f"date={day}"
    assert files[0].name.startswith(f"{socket.gethostname()}-{os.getpid()}-")
    assert not list((tmp_path / "decisions").rglob("*.tmp"))


def test_queue_full_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    log = StalledLog(tmp_path, max_queue=50)
    assert log.write(record(0))
    assert log.entered.wait(5), "the writer never picked up the first record"
    accepted = [record(i) for i in range(1, 51)]
    for rec in accepted:
        assert log.write(rec)
    t0 = time.perf_counter()
    results = [log.write(record(100 + i)) for i in range(20)]
    elapsed = time.perf_counter() - t0
    assert results == [False] * 20
    assert log.dropped == 20
    assert elapsed < 0.05, f"writes to a full queue took {elapsed * 1e3:.1f} ms; they must return at once"
    log.release.set()
    assert log.close()
    assert read_back(tmp_path / "decisions") == [record(0), *accepted]
    assert log.written == 51


def test_write_does_not_serialise_on_the_callers_thread(tmp_path: Path) -> None:
    # Big records (json.dumps costs 100 µs or more each) against a stalled writer: only the enqueue is timed.
    log = StalledLog(tmp_path, max_queue=10_000)
    log.write(record(0))
    assert log.entered.wait(5)
    big = [record(i, dim=500) for i in range(1000)]
    t0 = time.perf_counter()
    for rec in big:
        log.write(rec)
    per_write = (time.perf_counter() - t0) / len(big)
    log.release.set()
    assert log.close()
    assert per_write < 20e-6, f"write() took {per_write * 1e6:.1f} µs per record"
    assert log.written == 1001


def test_encode_and_write_queues_lines_counts_failures_and_drops(tmp_path: Path) -> None:
    log = StalledLog(tmp_path, max_queue=5)
    assert log.encode_and_write([record(0)]) == 1
    assert log.entered.wait(5), "the writer never picked up the first record"
    # Two unserialisable records are counted at once, on this thread; of six good ones, five fit
    # (the writer holds the first record, so the queue is empty).
    batch = [record(1), record(2, propensity=math.inf), record(3), record(4, observation=object())]
    batch += [record(i) for i in range(5, 9)]
    assert log.encode_and_write(batch) == 5
    assert (log.failed, log.dropped, log.pending) == (2, 1, 5)
    # Lines and records share the queue and keep their order.
    assert log.write(record(9)) is False  # full
    log.release.set()
    assert log.close()
    assert log.encode_and_write([record(10)]) == 0
    assert read_back(tmp_path / "decisions") == [record(i) for i in (0, 1, 3, 5, 6, 7)]
    assert (log.written, log.failed, log.dropped) == (6, 2, 3)


def test_rotation_by_size_gives_complete_files_in_order(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, rotate_bytes=4000)
    sent = [record(i) for i in range(400)]
    for rec in sent:
        log.write(rec)
    assert log.close()
    files = complete_files(tmp_path / "decisions")
    assert len(files) >= 3
    assert files == sorted(log.sealed)
    assert not list((tmp_path / "decisions").rglob("*.tmp"))
    for f in files:
        assert f.read_bytes().endswith(b"\n")
    assert read_back(tmp_path / "decisions") == sent


def test_rotation_by_age(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, rotate_seconds=0.2, flush_seconds=0.05)
    log.write(record(0))
    deadline = time.monotonic() + 5
    while not log.sealed and time.monotonic() < deadline:
        time.sleep(0.02)
    # The first file is sealed by age alone, while the log is still open: readers can take it now.
    assert len(log.sealed) == 1
    assert read_back(tmp_path / "decisions") == [record(0)]
    log.write(record(1))
    assert log.close()
    assert len(complete_files(tmp_path / "decisions")) == 2
    assert read_back(tmp_path / "decisions") == [record(0), record(1)]


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path, max_queue=1_000_000, rotate_bytes=50_000)
    n_threads, per_thread = 4, 2000
    start = threading.Barrier(n_threads)

    def produce(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            assert log.write({"thread": t, "i": i})

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert log.close()
    got = read_back(tmp_path / "decisions")
    assert len(got) == n_threads * per_thread
    for t in range(n_threads):
        # Each producer's records keep their order across rotated files.
        assert [r["i"] for r in got if r["thread"] == t] == list(range(per_thread))


def test_unserialisable_records_are_counted_not_fatal(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.write(record(0))
    log.write(record(1, propensity=math.nan))
    log.write(record(2, observation=object()))
    log.write(record(3))
    assert log.close()
    assert read_back(tmp_path / "decisions") == [record(0), record(3)]
    assert (log.written, log.failed) == (2, 2)


def test_close_is_idempotent_and_refuses_later_writes(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.write(record(0))
    assert log.close()
    assert log.close()
    assert not log.write(record(1))
    assert log.dropped == 1
    assert read_back(tmp_path / "decisions") == [record(0)]


def test_streams_and_prefixes_share_the_writer(tmp_path: Path) -> None:
    with DecisionLog(tmp_path, stream="rewards", file_prefix="part-") as log:
        log.write({"decision_id": "a", "reward": 1.0})
    (f,) = complete_files(tmp_path / "rewards")
    assert f.name.startswith("part-")
    assert read_back(tmp_path / "rewards") == [{"decision_id": "a", "reward": 1.0}]


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_queue"):
        DecisionLog(tmp_path, max_queue=0)
    with pytest.raises(ValueError, match="stream"):
        DecisionLog(tmp_path, stream="../x")


def _src_path() -> str:
    return str(Path(decision_log.__file__).resolve().parents[1])


def test_interpreter_exit_drains_the_queue(tmp_path: Path) -> None:
    # No close(): the atexit hook must write everything that was accepted.
    code = (
        "import sys\n"
        "from rlops_server.decision_log import DecisionLog\n"
        "log = DecisionLog(sys.argv[1], flush_seconds=60, rotate_seconds=600)\n"
        "for i in range(3000):\n"
        "    log.write({'i': i})\n"
    )
    env = {**os.environ, "PYTHONPATH": _src_path()}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, env=env, timeout=60)
    assert [r["i"] for r in read_back(tmp_path / "decisions")] == list(range(3000))
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_dead_process_tmp_file_is_sealed_by_the_next_log(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    day = tmp_path / "decisions" / "date=2026-01-02"
    day.mkdir(parents=True)
    orphan = day / f"{socket.gethostname()}-{pid}-20260102T000000000000Z-000000.jsonl.tmp"
    orphan.write_bytes(b'{"i":0}\n{"i":1}\n{"i":')
    other_host = day / f"elsewhere-{pid}-20260102T000000000000Z-000000.jsonl.tmp"
    other_host.write_bytes(b'{"i":9}\n')
    log = DecisionLog(tmp_path)
    assert log.recovered == [orphan.with_name(orphan.name.removesuffix(".tmp"))]
    log.close()
    assert read_back(tmp_path / "decisions") == [{"i": 0}, {"i": 1}]
    assert other_host.exists(), "files of another host belong to that host's writer"


_KILLED_WRITER = (
    "import sys\n"
    "from rlops_server.decision_log import DecisionLog\n"
    "log = DecisionLog(sys.argv[1], flush_seconds=60, rotate_seconds=600, write_through=sys.argv[2] == '1')\n"
    "for start in range(0, 3000, 10):\n"
    "    log.encode_and_write([{'i': i} for i in range(start, start + 10)])\n"
    "print('answered', flush=True)\n"
    "sys.stdin.read()\n"  # stay alive, as a worker between requests, until killed
)


@pytest.mark.parametrize("write_through", [True, False])
def test_a_killed_writer_keeps_what_write_through_handed_over(tmp_path: Path, write_through: bool) -> None:
    env = {**os.environ, "PYTHONPATH": _src_path()}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(tmp_path), "1" if write_through else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "answered"
    proc.kill()  # SIGKILL: no atexit, no flush, no close
    proc.wait(timeout=30)
    DecisionLog(tmp_path).close()  # the next log seals what the dead one left open
    kept = [r["i"] for r in read_back(tmp_path / "decisions")]
    if write_through:
        assert kept == list(range(3000))
    else:
        # Queued and buffered in the dead process: with a 60 s flush nothing had reached the file.
        assert len(kept) < 3000
