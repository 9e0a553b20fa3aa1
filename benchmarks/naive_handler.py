"""The baseline of ``benchmarks/serving.py``: the seed's naive TorchServe handler for a policy.

A plain ``BaseHandler`` subclass, as the seed wrote it: ``BaseHandler.initialize`` loads ``policy.pt``
(TorchScript), each request body is json-loaded into a tensor, the model runs once on the server batch,
and every request is answered with the argmax of its scores. No validation, no exploration, no decision
log, no custom metrics: what a first TorchServe deployment of a policy looks like, and what the
benchmark compares rlops' handler with.

Besides ``{"observation": [...]}`` it accepts ``{"observations": [[...], ...]}`` (answered with
``{"actions": [...]}``) so that the batch endpoint has a baseline too. A policy with Box actions (its
model card, archived beside ``policy.pt``, says so) is answered with the network's output, the action
vector. TorchServe imports this file as the archive's handler module, which must define exactly one class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from ts.torch_handler.base_handler import BaseHandler


class NaivePolicyHandler(BaseHandler):
    """Observations in, argmax actions (or Box action vectors) out; ``inference`` and ``handle`` are
    BaseHandler's."""

    def initialize(self, context: Any) -> None:
        super().initialize(context)
        card = Path(context.system_properties.get("model_dir", ".")) / "model-card.json"
        self.box = card.is_file() and json.loads(card.read_text())["action_space"]["type"] == "Box"

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
        actions = data.tolist() if self.box else data.argmax(dim=1).tolist()
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
