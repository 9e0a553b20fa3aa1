"""What the handler changes in TorchServe's Python worker: the buffered frame reader, no PredictionTime."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from rlops_server.torchserve import worker
from ts.protocol import otf_message_handler as otf


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def installed() -> Iterator[worker.FrameReader]:
    original = otf._retrieve_buffer, otf._retrieve_inference_msg
    yield worker.install_frame_reader()
    otf._retrieve_buffer, otf._retrieve_inference_msg = original


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


_END = struct.pack("!i", -1)  # ends a frame's header, parameter and request lists


def _parameters(*params: tuple[bytes, bytes, bytes]) -> bytes:
    return b"".join(_field(n) + _field(t) + _field(v) for n, t, v in params) + _END


# Requests of every kind the frontend sends: JSON, JSON it cannot parse, text, bytes, form fields (several
# parameters), no headers, headers that are not ASCII, an empty body.
_MIXED = [
    _request(b"r-json", {b"Host": b"x", b"Authorization": b"Bearer k"}, b'{"observation": [1.5, -2]}'),
    _request(b"r-bad-json", {b"Content-Type": b"application/json"}, b'{"observation": [1,'),
    _field(b"r-text") + _END + _parameters((b"body", b"text/plain", "héllo".encode())),
    _field(b"r-bytes") + _END + _parameters((b"data", b"application/octet-stream", b"\x00\xff")),
    _field(b"r-form")
    + _field(b"X-Note")
    + _field("naïve".encode())
    + _END
    + _parameters((b"a", b"", b"1"), (b"b", b"text/csv", b"2,3")),
    _request(b"r-empty", {}, b""),
]


class _Pieces:
    """A socket whose receives return the given pieces one after the other."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = list(pieces)

    def recv(self, n: int) -> bytes:
        piece = self.pieces.pop(0) if self.pieces else b""
        assert len(piece) <= n
        return piece


def _torchserve_parse(data: bytes) -> list[Any]:
    """What TorchServe 0.12's own reader makes of an inference frame (without its command byte)."""
    return otf._retrieve_inference_msg(_Pieces([data[i : i + 1] for i in range(len(data))]))


@pytest.mark.parametrize("decode", [None, "true", "false"])
def test_inference_frames_parse_as_torchserve_parses_them(
    decode: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if decode is None:
        monkeypatch.delenv("TS_DECODE_INPUT_REQUEST", raising=False)
    else:
        monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", decode)
    for requests in ([], _MIXED[:1], _MIXED):
        data = _frame(*requests)[1:]
        expected = _torchserve_parse(data)
        assert worker.FrameReader().inference_msg(_Pieces([data])) == expected
        if decode != "false" and expected:
            assert expected[0]["parameters"][0]["value"] == {"observation": [1.5, -2]}


def test_a_frame_cut_anywhere_is_parsed_whole() -> None:
    data = _frame(*_MIXED)[1:]
    expected = _torchserve_parse(data)
    for cut in range(1, len(data)):
        reader = worker.FrameReader()
        assert reader.inference_msg(_Pieces([data[:cut], data[cut:]])) == expected, cut
        assert reader._pos == len(reader._buf)  # nothing left over, nothing read past the frame


def test_frames_back_to_back_in_one_receive_are_read_one_at_a_time() -> None:
    one, two = _frame(_MIXED[0])[1:], _frame(*_MIXED[2:4])[1:]
    reader = worker.FrameReader()
    conn = _Pieces([one + two[:5], two[5:]])
    assert reader.inference_msg(conn) == _torchserve_parse(one)
    assert conn.pieces == [two[5:]]  # the first frame came whole with the first receive
    assert reader.inference_msg(conn) == _torchserve_parse(two)


def test_a_frontend_gone_mid_frame_ends_the_worker() -> None:
    data = _frame(*_MIXED)[1:]
    with pytest.raises(SystemExit):
        worker.FrameReader().inference_msg(_Pieces([data[:-3]]))


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
