"""The baseline of ``benchmarks/serving.py``: the seed's naive TorchServe handler for a policy.

A plain ``BaseHandler`` subclass, as the seed wrote it: ``BaseHandler.initialize`` loads ``policy.pt``
(TorchScript), each request body is json-loaded into a tensor, the model runs once on the server batch,
and every request is answered with the argmax of its scores. No validation, no exploration, no decision
log, no custom metrics: what a first TorchServe deployment of a policy looks like, and what the
benchmark compares rlops' handler with.

Besides ``{"observation": [...]}`` it accepts ``{"observations": [[...], ...]}`` (answered with
``{"actions": [...]}``) so that the batch endpoint has a baseline too. TorchServe imports this file as
the archive's handler module, which must define exactly one class.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler


class NaivePolicyHandler(BaseHandler):
    """Observations in, argmax actions out; ``initialize``, ``inference`` and ``handle`` are BaseHandler's."""

    def preprocess(self, data: list[dict[str, Any]]) -> torch.Tensor:
        rows: list[list[float]] = []
        # Observations per request, for postprocess to split the batch's answers again.
        self.sizes: list[int | None] = []
        for request in data:
            body: Any = request.get("body")
            if body is None:
                body = request.get("data")
            # TorchServe decodes application/json bodies itself; anything else arrives as bytes.
            if isinstance(body, bytes | bytearray | str):
                body = json.loads(body)
            if "observations" in body:
                rows.extend(body["observations"])
                self.sizes.append(len(body["observations"]))
            else:
                rows.append(body["observation"])
                self.sizes.append(None)
        return torch.tensor(rows, dtype=torch.float32)

    def postprocess(self, data: torch.Tensor) -> list[dict[str, Any]]:
        actions = data.argmax(dim=1).tolist()
        answers: list[dict[str, Any]] = []
        start = 0
        for size in self.sizes:
            if size is None:
                answers.append({"action": actions[start]})
                start += 1
            else:
                answers.append({"actions": actions[start : start + size]})
                start += size
        return answers
