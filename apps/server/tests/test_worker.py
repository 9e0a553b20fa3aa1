"""What the handler changes in TorchServe's Python worker: the buffered frame reader, no PredictionTime."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from rlops_server import worker
from ts.protocol import otf_message_handler as otf


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def installed() -> Iterator[worker.FrameReader]:
    original = otf._retrieve_buffer
    yield worker.install_frame_reader()
    otf._retrieve_buffer = original


def _field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def _request(request_id: bytes, headers: dict[bytes, bytes], body: bytes) -> bytes:
    """One request of an inference frame, as TorchServe's frontend encodes it."""
    out = _field(request_id)
    for name, value in headers.items():
        out += _field(name) + _field(value)
    out += struct.pack("!i", -1)
    out += _field(b"body") + _field(b"application/json") + _field(body)
    out += struct.pack("!i", -1)
    return out


def _frame(*requests: bytes) -> bytes:
    return b"I" + b"".join(requests) + struct.pack("!i", -1)


def test_the_reader_cuts_fields_from_one_receive(sockets: tuple[socket.socket, socket.socket]) -> None:
    sender, conn = sockets
    reader = worker.FrameReader()
    sender.sendall(b"abcdefgh")
    first = reader(conn, 3)
    assert isinstance(first, bytearray)
    assert (first, reader(conn, 5)) == (bytearray(b"abc"), bytearray(b"defgh"))


def test_a_field_split_over_several_sends_is_read_whole(sockets: tuple[socket.socket, socket.socket]) -> None:
    sender, conn = sockets
    reader = worker.FrameReader()
    payload = bytes(range(256)) * 1000  # larger than one receive

    def send() -> None:
        for i in range(0, len(payload), 7001):
            sender.sendall(payload[i : i + 7001])

    thread = threading.Thread(target=send)
    thread.start()
    got = reader(conn, len(payload))
    thread.join()
    assert got == payload


def test_the_worker_reads_frames_as_before_through_the_reader(
    sockets: tuple[socket.socket, socket.socket], installed: worker.FrameReader
) -> None:
    sender, conn = sockets
    first = _request(b"r-1", {b"Content-Type": b"application/json"}, b'{"observation": [1, 2]}')
    second = _request(b"r-2", {}, b'{"observation": [3, 4]}')
    # Two frames in one send: the first read takes both from the socket, the second comes from the buffer.
    sender.sendall(_frame(first, second) + _frame(second))
    cmd, batch = otf.retrieve_msg(conn)
    assert cmd == b"I"
    assert [r["requestId"] for r in batch] == [b"r-1", b"r-2"]
    assert batch[0]["headers"] == [{"name": b"Content-Type", "value": b"application/json"}]
    assert [r["parameters"][0]["value"] for r in batch] == [{"observation": [1, 2]}, {"observation": [3, 4]}]
    sender.sendall(_frame(first))
    assert [r["requestId"] for r in otf.retrieve_msg(conn)[1]] == [b"r-2"]
    assert [r["requestId"] for r in otf.retrieve_msg(conn)[1]] == [b"r-1"]


def test_a_closed_frontend_ends_the_worker(sockets: tuple[socket.socket, socket.socket]) -> None:
    sender, conn = sockets
    reader = worker.FrameReader()
    sender.sendall(b"ab")
    sender.close()
    with pytest.raises(SystemExit):
        reader(conn, 4)


def test_another_socket_with_bytes_still_buffered_is_refused(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    sender, conn = sockets
    reader = worker.FrameReader()
    sender.sendall(b"abcdef")
    reader(conn, 2)
    other, _peer = socket.socketpair()
    try:
        with pytest.raises(RuntimeError, match="unread bytes"):
            reader(other, 1)
    finally:
        other.close()
        _peer.close()


class _Cache:
    def __init__(self) -> None:
        self.timed: list[tuple[Any, ...]] = []

    def add_time(self, name: str, value: float, idx: str | None = None, unit: str = "ms") -> None:
        self.timed.append((name, value, idx, unit))


def test_prediction_time_is_not_sent_and_other_timings_are() -> None:
    cache = _Cache()
    worker.without_prediction_time(cache)
    cache.add_time("PredictionTime", 1.5)
    cache.add_time("MyHandlerTime", 2.0, unit="s")
    assert cache.timed == [("MyHandlerTime", 2.0, None, "s")]
