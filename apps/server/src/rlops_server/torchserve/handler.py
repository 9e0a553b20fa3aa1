"""TorchServe handler for an rlops policy: a thin layer over :class:`rlops_server.runtime.PolicyRuntime`.

TorchServe hands over a server batch (a list of requests, up to the model's ``batchSize``). Each request
is validated on its own; the valid ones are decided together with one pass of the policy; every
request gets its own answer, so a bad request is answered 4xx with a JSON body while the others in the
same batch succeed. Decisions go to the decision log (a bounded queue written by a background thread)
and metrics are collected in memory and emitted by a background thread, both off the request path.

The archive carries this file as its handler (TorchServe imports it as the module ``handler``, which
must define exactly one class); everything else comes from the ``rlops_server`` package installed in
the worker's Python environment.

Settings come from the ``handler:`` section of the archive's model-config yaml
(:class:`rlops_server.settings.ServingSettings`); ``RLOPS_DECISION_LOG_DIR`` overrides where decisions are
logged.
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ts.metrics.metric_cache_errors import MetricsCacheKeyError
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

from rlops_server import metrics as m
from rlops_server.decision_log import DecisionLog
from rlops_server.requests import ParsedRequest, RequestError
from rlops_server.runtime import Decisions, PolicyLoadError, PolicyRuntime, uuid4_batch
from rlops_server.settings import ServingSettings
from rlops_server.torchserve import worker
from rlops_server.torchserve.archive import VERSION_KEY, server_version

log = logging.getLogger(__name__)

DECISION_LOG_ENV = "RLOPS_DECISION_LOG_DIR"
JSON_TYPE = "application/json"

Parsed = ParsedRequest | RequestError


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _encode(body: Any) -> bytes:
    return _ENCODER.encode(body).encode()


def _internal_error(message: str) -> RequestError:
    return RequestError(500, "internal_error", message, "the same request again; this is the server's fault")


def _emitter(metrics_cache: Any) -> m.Emit:
    """``emit`` for TorchServe: the rlops metrics declared in the metrics config, looked up once."""
    declared = {}
    for spec in m.SPECS:
        try:
            declared[spec.name] = metrics_cache.get_metric(spec.name, MetricTypes(spec.kind))
        except MetricsCacheKeyError as e:
            raise PolicyLoadError(
                f"metric {spec.name} ({spec.kind}) is not declared in TorchServe's metrics config; start "
                "TorchServe with the metrics_config that rlops writes "
                "(rlops_server.torchserve.metrics_config.write_metrics_config)"
            ) from e

    def emit(name: str, value: float, labels: list[str]) -> None:
        declared[name].add_or_update(value, labels)

    return emit


class PolicyHandler(BaseHandler):
    """Validates, batches and answers policy requests; see the module docstring."""

    def initialize(self, context: Any) -> None:
        model_dir = Path(context.system_properties["model_dir"])
        yaml_config = context.model_yaml_config or {}
        section = dict(yaml_config.get("handler") or {})
        built_by = section.pop(VERSION_KEY, None)
        if built_by is not None and built_by != server_version():
            raise PolicyLoadError(
                f"{context.model_name}: the archive was built by rlops-server {built_by}, but this worker "
                f"runs {server_version()}; rebuild it with rlops serve archive so the handler matches"
            )
        settings = ServingSettings.from_mapping(
            section, source=f"{context.model_name}: model-config yaml, handler section"
        )
        logging.getLogger().setLevel(settings.worker_log_level)
        for name in ("ts.metrics", "rlops_server", __name__):
            logging.getLogger(name).setLevel(logging.INFO)
        self.runtime = PolicyRuntime.load(model_dir, settings)
        manifest_version = ((context.manifest or {}).get("model") or {}).get("modelVersion")
        if (
            manifest_version is not None
            and self.runtime.version is not None
            and str(manifest_version) != str(self.runtime.version)
        ):
            raise PolicyLoadError(
                f"{model_dir}: the archive is version {manifest_version} but its model card says version "
                f"{self.runtime.version}; rebuild the archive with rlops serve archive"
            )
        log_dir = os.environ.get(DECISION_LOG_ENV) or settings.decision_log_dir
        self.decision_log = (
            DecisionLog(
                Path(log_dir),
                max_queue=settings.decision_log_max_queue,
                write_through=settings.decision_log_write_through,
            )
            if log_dir
            else None
        )
        worker.without_prediction_time(context.metrics)
        worker.install_frame_reader()
        self.recorder = m.MetricsRecorder(
            _emitter(context.metrics),
            self.runtime.name,
            self.runtime.version,
            self.runtime.n_actions,
            self.runtime.drift_counts,
            self.runtime.drift_bins,
            values=self.runtime.score_kind == "q_values",
            flush_seconds=settings.metrics_flush_seconds,
            decision_log=self.decision_log,
            reference=(
                self.runtime.observation_bins.proportions,
                self.runtime.card["reference"]["actions"].get("proportions", []),
            ),
            action_bins=self.runtime.action_bins,
        ).start()
        # TorchServe 0.12 has no unload hook: a worker ends when the frontend closes its socket
        # (sys.exit) or on a signal. Turn SIGTERM into a normal exit so that queued decisions are written.
        atexit.register(self.shutdown)
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
            signal.SIG_DFL,
            None,
        ):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        self.context = context
        self.initialized = True
        # What exists now (torch, the policy, TorchServe's worker) lives as long as the worker: take it
        # out of the garbage collector's view, so that a full collection scans only what requests left
        # behind instead of pausing a request for every object torch ever made.
        gc.collect()
        gc.freeze()
        log.info(
            "rlops policy %s version %s ready: %d features, %s, decision log %s",
            self.runtime.name,
            self.runtime.version,
            self.runtime.obs_dim,
            f"Box actions of {self.runtime.action_dim} dimension(s)"
            if self.runtime.continuous
            else f"{self.runtime.n_actions} actions",
            log_dir or "off",
        )

    def shutdown(self) -> None:
        """Write every queued decision, then emit the last metrics. Idempotent."""
        if self.decision_log is not None:
            self.decision_log.close()
        self.recorder.close()

    # --- the request path ----------------------------------------------------------------------------

    def preprocess(self, data: list[dict[str, Any]]) -> list[Parsed]:
        """One parsed request or the RequestError that answers it, per request of the batch."""
        parsed: list[Parsed] = []
        for row in data:
            body = row.get("body")
            if body is None:
                body = row.get("data")
            try:
                if body is None and row:
                    raise RequestError(
                        400,
                        m.R_MALFORMED_JSON,
                        "the request has no body: it arrived as form fields or query parameters (curl -d "
                        "sends a form unless a Content-Type header says otherwise)",
                        "a JSON object as the request body, sent with Content-Type: application/json",
                    )
                parsed.append(self.runtime.parse(body if body is not None else b""))
            except RequestError as e:
                parsed.append(e)
            except Exception:  # a bug here must cost one request, not the batch
                log.exception("parsing a request failed unexpectedly")
                parsed.append(_internal_error("the request could not be parsed because of a server error"))
        return parsed

    def inference(self, data: list[ParsedRequest], *args: Any, **kwargs: Any) -> Decisions:
        return self.runtime.decide(data)

    def postprocess(self, data: tuple[list[Parsed], Decisions | None]) -> list[bytes]:
        """Answers in request order; logs decisions and counts rejections."""
        parsed, decisions = data
        runtime = self.runtime
        # The batch's new decision ids in one draw, and its log records in one hand-over.
        fresh = iter(uuid4_batch(sum(runtime.ids_needed(p) for p in parsed if isinstance(p, ParsedRequest))))
        records: list[dict[str, Any]] = []
        out: list[bytes] = []
        index = 0
        for idx, p in enumerate(parsed):
            self.context.set_response_content_type(idx, JSON_TYPE)
            if isinstance(p, RequestError):
                self.context.set_response_status(code=p.status, phrase=p.reason, idx=idx)
                self.recorder.record_rejected(p.reason)
                out.append(_encode(p.body()))
                continue
            assert decisions is not None  # parsed requests exist, so decide() ran
            ids = runtime.decision_ids(p, fresh)
            out.append(_encode(runtime.answer(p, decisions, index, ids)))
            if self.decision_log is not None:
                records += runtime.records(p, decisions, index, ids)
            index += 1
        if records and self.decision_log is not None:
            self.decision_log.encode_and_write(records)
        if decisions is not None:
            self.recorder.record_batch(decisions)
        return out

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        start = time.perf_counter()
        self.context = context
        try:
            parsed = self.preprocess(data)
            valid = [p for p in parsed if isinstance(p, ParsedRequest)]
            decisions = self.inference(valid) if valid else None
            out = self.postprocess((parsed, decisions))
        except Exception:
            # Bad input never gets here (it is a RequestError per request); this is a server bug.
            log.exception("handling a batch of %d requests failed", len(data))
            error = _internal_error("the server failed while answering this request")
            out = []
            for idx in range(len(data)):
                context.set_response_content_type(idx, JSON_TYPE)
                context.set_response_status(code=500, phrase=error.reason, idx=idx)
                out.append(_encode(error.body()))
        self.recorder.record_latency(time.perf_counter() - start, len(data))
        return out
