"""What an rlops handler changes in TorchServe 0.12's Python worker, and why (measured in docs/benchmarks.md).

TorchServe is final upstream (0.12.0), so the worker code these replace will not change under them;
both are installed by :meth:`rlops_server.handler.PolicyHandler.initialize` and tested against a real
TorchServe in the server's integration tests.
"""

from __future__ import annotations

import logging
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
    worker has answered the load, so no byte has been read past.
    """

    CHUNK = 1 << 16

    def __init__(self) -> None:
        self._conn: Any = None
        self._buf = bytearray()
        self._pos = 0

    def __call__(self, conn: Any, length: int) -> bytearray:
        if conn is not self._conn:
            if self._pos < len(self._buf):
                raise RuntimeError("the worker's socket changed with unread bytes buffered")
            self._conn, self._buf, self._pos = conn, bytearray(), 0
        while len(self._buf) - self._pos < length:
            if self._pos:
                del self._buf[: self._pos]
                self._pos = 0
            pkt = conn.recv(max(self.CHUNK, length - len(self._buf)))
            if not pkt:
                logging.info("Frontend disconnected.")
                sys.exit(0)
            self._buf += pkt
        end = self._pos + length
        out = self._buf[self._pos : end]
        self._pos = end
        return out


def install_frame_reader() -> FrameReader:
    """Make the worker read the frontend's frames through a :class:`FrameReader`; returns it."""
    reader = FrameReader()
    otf_message_handler._retrieve_buffer = reader
    return reader
