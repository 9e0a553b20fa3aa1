"""What an rlops handler changes in TorchServe 0.12's Python worker, and why (measured in docs/benchmarks.md).

TorchServe is final upstream (0.12.0), so the worker code these replace will not change under them;
they are installed by :meth:`rlops_server.torchserve.handler.PolicyHandler.initialize`, checked against
TorchServe's own reader in the unit tests and against a real TorchServe in the integration tests.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from typing import Any

from ts.protocol import otf_message_handler
from ts.service import PREDICTION_METRIC


def without_prediction_time(metrics_cache: Any) -> None:
    """Stop TorchServe's worker from sending its ``PredictionTime`` gauge, one log line per batch.

    The worker formats that line (with a ``gethostname`` call) after every batch and the frontend
    parses it, about a tenth of the worker's time at 16 clients; what it measures, the time of the
    last batch, ``rlops_inference_latency_seconds`` counts per bucket over every batch. Other
    ``add_time`` calls (a handler's own) pass through.
    """
    add_time = metrics_cache.add_time

    def filtered(name: str, *args: Any, **kwargs: Any) -> None:
        if name != PREDICTION_METRIC:
            add_time(name, *args, **kwargs)

    metrics_cache.add_time = filtered


class FrameReader:
    """Reads the frontend's frames from the worker's socket through a buffer.

    TorchServe 0.12's worker reads each field of a request frame (id, every header's name and value,
    the body, their lengths) with its own ``recv``: about thirty system calls a request. This reader
    takes whatever the socket holds in one call and cuts the fields from it, returning them as the
    worker's own reader does (a ``bytearray``; a closed socket ends the worker). It is installed in
    place of ``ts.protocol.otf_message_handler._retrieve_buffer``, through which the worker reads
    everything it receives, once the model is loaded: the frontend sends nothing more until the
    worker has answered the load, so no byte has been read past. Its :meth:`inference_msg` replaces
    ``_retrieve_inference_msg`` too: cutting a whole batch's requests from the buffer in one pass
    takes less than half the time of reading them field by field (a frame of eight requests with
    five headers each, received and parsed: 80–135 µs against 200–380 µs on a 2-core machine).
    """

    CHUNK = 1 << 16

    def __init__(self) -> None:
        self._conn: Any = None
        self._buf = bytearray()
        self._pos = 0

    def __call__(self, conn: Any, length: int) -> bytearray:
        self._switch(conn)
        while len(self._buf) - self._pos < length:
            self._receive(conn, length)
        end = self._pos + length
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def inference_msg(self, conn: Any) -> list[dict[str, Any]]:
        """The requests of one inference frame (after its command byte), as TorchServe's
        ``_retrieve_inference_msg`` returns them, cut from the buffer in one pass.

        A frame that is not all there yet is parsed again once more bytes have arrived; the
        frontend writes a batch in one piece, so that is rare.
        """
        self._switch(conn)
        decode = os.environ.get("TS_DECODE_INPUT_REQUEST") in (None, "true")
        while True:
            try:
                requests, self._pos = _parse_inference(self._buf, self._pos, decode)
                return requests
            except _Incomplete:
                self._receive(conn, len(self._buf) - self._pos + 1)

    def _switch(self, conn: Any) -> None:
        if conn is not self._conn:
            if self._pos < len(self._buf):
                raise RuntimeError("the worker's socket changed with unread bytes buffered")
            self._conn, self._buf, self._pos = conn, bytearray(), 0

    def _receive(self, conn: Any, wanted: int) -> None:
        """Receive more bytes (at least one) into the buffer, dropping what was read already."""
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        pkt = conn.recv(max(self.CHUNK, wanted - len(self._buf)))
        if not pkt:
            logging.info("Frontend disconnected.")
            sys.exit(0)
        self._buf += pkt


class _Incomplete(Exception):
    """The buffer ends inside the frame being parsed."""


_INT = struct.Struct("!i")


def _parse_inference(buf: bytearray, pos: int, decode: bool) -> tuple[list[dict[str, Any]], int]:
    """Parse the request list of an inference frame starting at ``pos``; returns it and the end.

    Layout (TorchServe 0.12, ``otf_message_handler``): per request its id, then (name, value)
    header pairs until -1, then (name, content type, value) parameters until -1; the list ends
    with -1. Every field is a big-endian int32 length and that many bytes. Written out flat: this
    runs for every request, and a helper call per field costs more than the parsing.
    """
    size = len(buf)
    unpack = _INT.unpack_from
    requests: list[dict[str, Any]] = []
    try:
        while True:
            (n,) = unpack(buf, pos)
            pos += 4
            if n == -1:
                return requests, pos
            request_id = buf[pos : pos + n]
            pos += n
            headers = []
            while True:
                (n,) = unpack(buf, pos)
                pos += 4
                if n == -1:
                    break
                name = buf[pos : pos + n]
                pos += n
                (n,) = unpack(buf, pos)
                value = buf[pos + 4 : pos + 4 + n]
                pos += 4 + n
                headers.append({"name": name, "value": value})
            parameters = []
            while True:
                (n,) = unpack(buf, pos)
                pos += 4
                if n == -1:
                    break
                name = buf[pos : pos + n]
                pos += n
                (n,) = unpack(buf, pos)
                raw_type = buf[pos + 4 : pos + 4 + n]
                pos += 4 + n
                (n,) = unpack(buf, pos)
                raw = buf[pos + 4 : pos + 4 + n]
                pos += 4 + n
                if pos > size:  # a slice past the end comes back short instead of failing
                    raise _Incomplete
                content_type = raw_type.decode("utf-8")
                parameters.append(
                    {
                        "name": name.decode("utf-8"),
                        "contentType": content_type,
                        "value": _decoded(raw, content_type, decode),
                    }
                )
            # No length check needed here: the list's closing -1 was just read inside the buffer, and
            # any slice cut short before it made a later unpack fail (struct.error below).
            requests.append({"requestId": request_id, "headers": headers, "parameters": parameters})
    except struct.error:
        raise _Incomplete from None


def _decoded(raw: bytearray, content_type: str, decode: bool) -> Any:
    """A parameter's value as TorchServe hands it to the handler: JSON parsed, text decoded, else bytes."""
    if decode and content_type == "application/json":
        try:
            return json.loads(raw.decode("utf-8"))
        except Exception:  # TorchServe forwards what it cannot decode as it came
            logging.warning("Failed json decoding of input data. Forwarding encoded payload")
            return raw
    if decode and content_type.startswith("text"):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            logging.warning("Failed utf-8 decoding of input data. Forwarding encoded payload")
            return raw
    return raw


def install_frame_reader() -> FrameReader:
    """Make the worker read the frontend's frames through a :class:`FrameReader`; returns it."""
    reader = FrameReader()
    otf_message_handler._retrieve_buffer = reader
    otf_message_handler._retrieve_inference_msg = reader.inference_msg
    return reader
