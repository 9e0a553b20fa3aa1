"""Fixtures for the server tests: tiny TorchScript policies with valid model cards, in a registry layout.

The policies are built here, not by the trainer (the server never imports it): an ``nn.Module`` with the
same interface as the trainer's export, ``forward(obs) -> scores`` and an exported
``action_probs(obs, temperature, epsilon)``. Its scores are easy to predict: ``sign * obs[:, :3]``
(three actions), and NaN for every row whose last feature is >= 1000 (to exercise the fallback path).

Box policies (:class:`TinyBoxPolicy`, :func:`write_box_policy_dir`) have the interface of the trainer's
``ContinuousPolicyModule``: ``pre_squash(obs) = sign * obs[:, :2]`` (NaN on poisoned rows), ``forward``
the squashed action ``mid + half * tanh(pre_squash)`` inside :data:`BOX_LOW`/:data:`BOX_HIGH`, ``act(obs,
std)`` with the exact log-density of the squashed Gaussian, ``log_prob(obs, action, std)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import warnings
from pathlib import Path
from typing import Any

# One torch thread per process: the CI box has two cores and parallel BLAS only contends.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from rlops_contracts.artifact import seal
from torch import nn

torch.set_num_threads(1)

OBS_DIM = 4
N_ACTIONS = 3
POISON = 1000.0
"""Rows whose last feature is at least this get NaN scores."""
EDGES = [-1.0, 0.0, 1.0]
"""Reference bin edges of every feature: bins (-inf,-1) [-1,0) [0,1) [1,inf)."""
ACTION_PROPORTIONS = [0.2, 0.5, 0.3]
"""Reference action proportions: the default fallback action is 1."""


class TinyPolicy(nn.Module):
    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign
        self.poison = POISON

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self._scores(obs)

    def _scores(self, obs: torch.Tensor) -> torch.Tensor:
        scores = self.sign * obs[:, :3]
        poisoned = obs[:, 3:4] >= self.poison
        return torch.where(poisoned, torch.full_like(scores, float("nan")), scores)

    @torch.jit.export
    def action_probs(self, obs: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
        scores = self.forward(obs)
        n = scores.shape[-1]
        if temperature > 0.0:
            probs = torch.softmax(scores / temperature, dim=-1)
        else:
            probs = torch.nn.functional.one_hot(scores.argmax(dim=-1), n).to(scores.dtype)
        return (1.0 - epsilon) * probs + epsilon / n


BOX_DIM = 2
BOX_LOW = [-1.0, 0.0]
BOX_HIGH = [1.0, 4.0]
BOX_EDGES = [[-0.5, 0.0, 0.5], [1.0, 2.0, 3.0]]
"""Reference bin edges per action dimension (four bins each, a quarter of the training actions in each)."""
BOX_MEAN = [0.25, 3.0]
"""The card's mean training action (the fallback, clipped into the bounds)."""


class TinyBoxPolicy(nn.Module):
    """A Box policy of two dimensions with the trainer's ContinuousPolicyModule methods."""

    def __init__(self, sign: float) -> None:
        super().__init__()
        self.sign = sign
        self.poison = POISON
        low, high = torch.tensor(BOX_LOW), torch.tensor(BOX_HIGH)
        # Plain tensor attributes (not buffers): TorchScript keeps them, and mypy sees tensors.
        self.action_mid = (high + low) / 2.0
        self.action_half = (high - low) / 2.0

    @torch.jit.export
    def pre_squash(self, obs: torch.Tensor) -> torch.Tensor:
        u = self.sign * obs[:, :2]
        poisoned = obs[:, 3:4] >= self.poison
        return torch.where(poisoned, torch.full_like(u, float("nan")), u)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.action_mid + self.action_half * torch.tanh(self.pre_squash(obs))

    def _log_density(self, z: torch.Tensor, u: torch.Tensor, std: float) -> torch.Tensor:
        # N(u, std) at z, minus log |d action / d z| = log(half * (1 - tanh(z)^2)), summed over dimensions.
        gaussian = -0.5 * ((z - u) / std) ** 2 - math.log(std) - 0.5 * math.log(2.0 * math.pi)
        jacobian = torch.log(self.action_half) + torch.log1p(-(torch.tanh(z) ** 2))
        return (gaussian - jacobian).sum(dim=-1)

    @torch.jit.export
    def act(self, obs: torch.Tensor, std: float) -> tuple[torch.Tensor, torch.Tensor]:
        u = self.pre_squash(obs)
        if std <= 0.0:
            return self.action_mid + self.action_half * torch.tanh(u), torch.full(u.shape[:-1], float("nan"))
        z = u + std * torch.randn_like(u)
        return self.action_mid + self.action_half * torch.tanh(z), self._log_density(z, u, std)

    @torch.jit.export
    def log_prob(self, obs: torch.Tensor, action: torch.Tensor, std: float) -> torch.Tensor:
        u = self.pre_squash(obs)
        if std <= 0.0:
            return torch.full(u.shape[:-1], float("nan"))
        z = torch.atanh(((action - self.action_mid) / self.action_half).clamp(-1.0 + 1e-6, 1.0 - 1e-6))
        return self._log_density(z, u, std)


class BusyTinyPolicy(TinyPolicy):
    """TinyPolicy that also spends compute in proportion to the rows of a call: ``work`` products of a
    (rows, 256) by (256, 256) matrix, about a millisecond per iteration at 1024 rows. A large batch keeps
    the worker busy while a one-observation request costs nothing worth measuring."""

    def __init__(self, sign: float, work: int) -> None:
        super().__init__(sign)
        self.work = work
        self.weight = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16.0

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = obs[:, :1].expand(-1, 256)
        for _ in range(self.work):
            h = torch.tanh(h @ self.weight)
        # h is bounded by tanh, so 0 * h adds exactly zero, and keeps the work from being optimised away.
        return self._scores(obs) + 0.0 * h[:, :3]


class OnePassTinyPolicy(TinyPolicy):
    """TinyPolicy that also exports ``scores_and_probs``, as policies exported by rlops do."""

    @torch.jit.export
    def scores_and_probs(
        self, obs: torch.Tensor, temperature: float, epsilon: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(obs), self.action_probs(obs, temperature, epsilon)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_card(
    name: str,
    version: int | None,
    policy_sha: str,
    score_kind: str = "q_values",
    temperature: float = 0.0,
    epsilon: float = 0.0,
) -> dict[str, Any]:
    now = "2025-01-01T00:00:00Z"
    fingerprint = "sha256:" + "0" * 64
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "created_at": now,
        "algorithm": "test",
        "hyperparameters": {},
        "dataset": {
            "fingerprint": fingerprint,
            "env_id": "Toy-v0",
            "n_transitions": 100,
            "n_episodes": 4,
            "source": "test",
            "behavior_policy": "random",
        },
        "observation_space": {
            "type": "Box",
            "shape": [OBS_DIM],
            "dtype": "float32",
            "low": ["-inf"] * OBS_DIM,
            "high": ["inf"] * OBS_DIM,
        },
        "action_space": {"type": "Discrete", "n": N_ACTIONS},
        "policy": {
            "file": "policy.pt",
            "score_kind": score_kind,
            "input": {"dtype": "float32", "shape": [-1, OBS_DIM]},
            "selection": {"temperature": temperature, "epsilon": epsilon},
            "torch_version": torch.__version__,
        },
        "training": {"steps": 1, "wall_time_s": 0.1, "device": "cpu", "final_metrics": {}},
        "evaluation": None,
        "gate": None,
        "reference": {
            "observation": {
                "n": 100,
                "mean": [0.0] * OBS_DIM,
                "std": [1.0] * OBS_DIM,
                "min": [-2.0] * OBS_DIM,
                "max": [2.0] * OBS_DIM,
                "bins": [{"edges": EDGES, "proportions": [0.25] * 4} for _ in range(OBS_DIM)],
            },
            "actions": {"n": 100, "proportions": ACTION_PROPORTIONS},
        },
        "lineage": [
            {
                "event": "trained",
                "at": now,
                "algorithm": "test",
                "dataset_fingerprint": fingerprint,
                "steps": 1,
            }
        ],
        "files": {"policy.pt": policy_sha},
    }


def make_box_card(
    name: str, version: int | None, policy_sha: str, std: float = 0.0, mean: list[float] | None = None
) -> dict[str, Any]:
    """A card for a Box policy as the model card contract has it (score_kind action, selection.std,
    per-dimension action reference)."""
    card = make_card(name, version, policy_sha)
    card["action_space"] = {
        "type": "Box",
        "shape": [BOX_DIM],
        "dtype": "float32",
        "low": BOX_LOW,
        "high": BOX_HIGH,
    }
    card["policy"]["score_kind"] = "action"
    card["policy"]["selection"] = {"temperature": 0.0, "epsilon": 0.0, "std": std}
    card["reference"]["actions"] = {
        "n": 100,
        "mean": mean if mean is not None else BOX_MEAN,
        "std": [0.5, 1.0],
        "min": BOX_LOW,
        "max": BOX_HIGH,
        "bins": [{"edges": e, "proportions": [0.25] * 4} for e in BOX_EDGES],
    }
    return card


def write_box_policy_dir(
    path: Path,
    name: str = "reacher",
    version: int | None = 1,
    sign: float = 1.0,
    std: float = 0.0,
    mean: list[float] | None = None,
) -> Path:
    """A Box policy directory (:class:`TinyBoxPolicy`, its card, SHA256SUMS) at ``path``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        scripted = torch.jit.script(TinyBoxPolicy(sign).eval())
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    data = buf.getvalue()
    path.mkdir(parents=True, exist_ok=True)
    (path / "policy.pt").write_bytes(data)
    seal(path, make_box_card(name, version, sha256(data), std, mean))
    return path


def write_policy_dir(
    path: Path,
    name: str = "toy",
    version: int | None = 1,
    sign: float = 1.0,
    score_kind: str = "q_values",
    temperature: float = 0.0,
    epsilon: float = 0.0,
    one_pass: bool = False,
    work: int = 0,
) -> Path:
    """A policy directory (policy.pt, model-card.json, SHA256SUMS) at ``path``; ``one_pass`` exports
    ``scores_and_probs`` too; ``work`` makes it a :class:`BusyTinyPolicy`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        module: TinyPolicy
        if work:
            module = BusyTinyPolicy(sign, work)
        else:
            module = OnePassTinyPolicy(sign) if one_pass else TinyPolicy(sign)
        scripted = torch.jit.script(module.eval())
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    data = buf.getvalue()
    path.mkdir(parents=True, exist_ok=True)
    (path / "policy.pt").write_bytes(data)
    seal(path, make_card(name, version, sha256(data), score_kind, temperature, epsilon))
    return path


def write_registry(root: Path, name: str = "toy", candidate: bool = True) -> Path:
    """A registry with version 1 (champion, greedy on +obs) and version 2 (candidate, greedy on -obs)."""
    write_policy_dir(root / name / "1", name, 1, sign=1.0)
    aliases = {"champion": 1}
    if candidate:
        write_policy_dir(
            root / name / "2", name, 2, sign=-1.0, score_kind="logits", temperature=1.0, epsilon=0.1
        )
        aliases["candidate"] = 2
    (root / name / "aliases.json").write_text(json.dumps(aliases), encoding="utf-8")
    return root


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    return write_policy_dir(tmp_path / "policy")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_registry(tmp_path_factory.mktemp("registry"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports
