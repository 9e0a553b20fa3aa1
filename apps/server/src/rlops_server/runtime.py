"""The serving core: load a policy version, validate requests, choose actions. No TorchServe here.

A policy version directory holds ``policy.pt`` (TorchScript: ``forward(obs) -> scores`` and
``action_probs(obs, temperature, epsilon) -> probs``), ``model-card.json`` and ``SHA256SUMS`` (the
artifact contract, :mod:`rlops_contracts.artifact`). :meth:`PolicyRuntime.load` refuses a directory whose
card is invalid or whose files, the card included, do not match their recorded sha256.

Requests are checked by :mod:`rlops_server.requests` (4xx with reasons) before the policy runs.
:meth:`PolicyRuntime.decide` takes the parsed requests of
a whole server batch and runs the policy once on all their observations. The action distribution comes
from the policy's own ``action_probs`` (the rule is written once, inside ``policy.pt``); a mask zeroes
disallowed actions and the rest is renormalised; the action is sampled from that distribution and its
probability is the propensity. Non-finite model outputs get the fallback action, flagged.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rlops_contracts import POLICY_FILE
from rlops_contracts.artifact import verify_policy_dir
from rlops_contracts.card import ArtifactError

from rlops_server.requests import ParsedRequest, RequestParser
from rlops_server.settings import ServingSettings

DRIFT_CHUNK_CELLS = 1 << 22
"""Comparisons per chunk when binning observations (bounds the temporary boolean array to 4 MiB)."""


class PolicyLoadError(RuntimeError):
    """A policy directory that must not be served: missing files, an invalid card, a sha256 mismatch."""


@dataclass
class Decisions:
    """What :meth:`PolicyRuntime.decide` chose for every observation of a server batch, in order."""

    observations: np.ndarray
    """float32 [n, obs_dim]: the observations of all requests, concatenated."""
    actions: np.ndarray
    """int64 [n]"""
    propensities: np.ndarray
    """float64 [n]: probability of the chosen action under the served (masked) distribution."""
    fallback: np.ndarray
    """bool [n]: the action is the fallback (non-finite model output or a failed forward pass)."""
    probabilities: np.ndarray
    """float64 [n, n_actions]: the served distribution (a point mass on fallback rows)."""
    scores: np.ndarray | None
    """float32 [n, n_actions]: what forward() returned; None when the forward pass raised."""
    offsets: list[int]
    """Start index of each request's observations."""
    nonfinite: int
    """Observations whose model outputs were not finite."""
    errors: int
    """Observations answered with the fallback because the forward pass raised."""
    time: float
    """Unix time of the decision."""


# --- the runtime -----------------------------------------------------------------------------------


_UUID_ARRAY_FROM = 8


def uuid4_batch(k: int) -> list[str]:
    """``k`` random UUIDs (RFC 4122 version 4) as strings, from one read of the OS's random source.

    uuid.uuid4() reads the random source once per id; for a batch of thousands that dominated the cost.
    For a few ids, uuid.uuid4() is the cheaper of the two (the array work costs about as much as three).
    """
    if k < _UUID_ARRAY_FROM:
        return [str(uuid.uuid4()) for _ in range(k)]
    raw = np.frombuffer(os.urandom(16 * k), dtype=np.uint8).reshape(k, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.tobytes().hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * k, 32)
    ]


class PolicyRuntime:
    """A loaded policy version: validates requests and decides actions for batches of them."""

    def __init__(
        self, module: torch.jit.ScriptModule, card: dict[str, Any], settings: ServingSettings
    ) -> None:
        self.module = module
        self.card = card
        self.settings = settings
        self.name: str = card["name"]
        self.version: int | None = card["version"]
        self.n_actions: int = card["action_space"]["n"]
        self.obs_shape: tuple[int, ...] = tuple(card["observation_space"]["shape"])
        self.obs_dim: int = card["policy"]["input"]["shape"][1]
        self.score_kind: str = card["policy"]["score_kind"]
        self.temperature = float(card["policy"]["selection"]["temperature"])
        self.epsilon = float(card["policy"]["selection"]["epsilon"])
        proportions = card["reference"]["actions"]["proportions"]
        default_fallback = int(np.argmax(proportions))
        self.fallback_action = (
            default_fallback if settings.fallback_action is None else settings.fallback_action
        )
        if not 0 <= self.fallback_action < self.n_actions:
            raise PolicyLoadError(
                f"fallback_action {self.fallback_action} is not an action of {self.name} "
                f"(actions 0..{self.n_actions - 1})"
            )
        # Fallback under a mask: the allowed action that comes first in this order.
        order = [self.fallback_action] + [int(a) for a in np.argsort(proportions, kind="stable")[::-1]]
        self._fallback_order = np.array(list(dict.fromkeys(order)), dtype=np.int64)
        self._rng = np.random.default_rng(settings.seed)
        # Policies exported before scores_and_probs existed need two passes (forward, action_probs).
        self._one_pass = hasattr(module, "scores_and_probs")
        bins = card["reference"]["observation"]["bins"]
        width = max(len(b["edges"]) for b in bins) if bins else 0
        edges = np.full((self.obs_dim, width), np.inf)
        for j, b in enumerate(bins):
            edges[j, : len(b["edges"])] = b["edges"]
        self.drift_edges = edges
        """float64 [obs_dim, max_edges]: reference bin edges per feature, padded with +inf."""
        self.drift_bins = np.array([len(b["edges"]) + 1 for b in bins], dtype=np.int64)
        """Bins per feature."""
        self.requests = RequestParser(
            self.obs_shape, self.n_actions, self.temperature, self.epsilon, settings.max_batch_observations
        )

    @classmethod
    def load(cls, model_dir: Path | str, settings: ServingSettings | None = None) -> PolicyRuntime:
        """Load a policy directory after checking every file, the card included, against its sha256
        (:func:`rlops_contracts.artifact.verify_policy_dir`)."""
        model_dir = Path(model_dir)
        try:
            card = verify_policy_dir(model_dir)
        except ArtifactError as e:
            raise PolicyLoadError(str(e)) from e
        # One thread per worker: TorchServe runs a worker per core, and intra-op threads only contend.
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
            )
            try:
                module = torch.jit.load(str(model_dir / POLICY_FILE), map_location="cpu")
            except (RuntimeError, ValueError) as e:
                raise PolicyLoadError(
                    f"{model_dir / POLICY_FILE}: not a loadable TorchScript file: {e}"
                ) from e
        module.eval()
        # No gradients are ever needed: with frozen parameters no call records autograd state, so the
        # request path needs no inference_mode/no_grad context around each call.
        for param in module.parameters():
            param.requires_grad_(False)
        if not hasattr(module, "action_probs"):
            raise PolicyLoadError(
                f"{model_dir / POLICY_FILE}: has no exported action_probs(obs, temperature, epsilon) method"
            )
        try:
            runtime = cls(module, card, settings or ServingSettings())
        except ValueError as e:
            raise PolicyLoadError(f"{model_dir}: {e}") from e
        runtime._self_check(model_dir)
        return runtime

    def _self_check(self, model_dir: Path) -> None:
        """Run the policy once so that a shape mismatch stops the worker at start, not per request."""
        probe = torch.zeros((1, self.obs_dim), dtype=torch.float32)
        try:
            scores = self.module.forward(probe)
            probs = self.module.action_probs(probe, self.temperature, self.epsilon)
        except RuntimeError as e:
            raise PolicyLoadError(f"{model_dir / POLICY_FILE}: fails on a zero observation: {e}") from e
        expected = (1, self.n_actions)
        if tuple(scores.shape) != expected or tuple(probs.shape) != expected:
            raise PolicyLoadError(
                f"{model_dir / POLICY_FILE}: outputs shapes {tuple(scores.shape)} and {tuple(probs.shape)}, "
                f"expected {expected} (one score per action of the card's action space)"
            )

    def parse(self, body: Any) -> ParsedRequest:
        """Validate one request body; raises RequestError saying what is wrong and what is accepted."""
        return self.requests.parse(body)

    # --- deciding ----------------------------------------------------------------------------------

    def decide(self, requests: Sequence[ParsedRequest]) -> Decisions:
        """Choose an action for every observation of ``requests`` with one pass of the policy.

        Only what the answer needs is computed here; entropy, value estimates and drift bins are
        computed later, off the request path, by :class:`rlops_server.metrics.MetricsRecorder`.
        """
        offsets = []
        total = 0
        for r in requests:
            offsets.append(total)
            total += len(r)
        obs = (
            requests[0].observations
            if len(requests) == 1
            else np.concatenate([r.observations for r in requests])
        )
        x = torch.from_numpy(obs)
        n, a = total, self.n_actions
        scores: np.ndarray | None = None
        failed = False
        try:
            # The scores are needed even when only the distribution is answered: a greedy rule turns
            # NaN scores into a finite one-hot distribution (argmax of NaN), which would hide them.
            settings = {(r.temperature, r.epsilon) for r in requests}
            if len(settings) == 1 and self._one_pass:
                ((t, e),) = settings
                s_t, p_t = self.module.scores_and_probs(x, t, e)
                scores, probs = s_t.numpy(), p_t.numpy().astype(np.float64)
            elif len(settings) == 1:
                ((t, e),) = settings
                scores = self.module.forward(x).numpy()
                probs = self.module.action_probs(x, t, e).numpy().astype(np.float64)
            else:
                scores = self.module.forward(x).numpy()
                # Different exploration settings in one server batch: one call per setting.
                probs = np.empty((n, a), dtype=np.float64)
                for t, e in settings:
                    rows = np.concatenate(
                        [
                            np.arange(off, off + len(r))
                            for off, r in zip(offsets, requests, strict=True)
                            if (r.temperature, r.epsilon) == (t, e)
                        ]
                    )
                    probs[rows] = self.module.action_probs(x[torch.from_numpy(rows)], t, e).numpy()
        except RuntimeError:
            # A forward pass that raises on valid input is the model's fault: answer the fallback, counted.
            failed = True
            probs = np.zeros((n, a), dtype=np.float64)
            scores = None

        if scores is None:
            fallback = np.ones(n, dtype=bool)
        else:
            fallback = ~(np.isfinite(probs).all(axis=1) & np.isfinite(scores).all(axis=1))
        masks = self._gather_masks(requests, offsets, n)
        if masks is None and not fallback.any():
            # The common case: no mask, finite outputs.
            mass = probs.sum(axis=1)
        else:
            probs, mass = self._masked(probs, x, scores, masks, fallback)
        nonfinite = 0 if failed else int(fallback.sum())

        cdf = np.cumsum(probs, axis=1)
        u = self._rng.random(n) * mass
        actions = (cdf <= u[:, None]).sum(axis=1)
        np.minimum(actions, a - 1, out=actions)
        propensities = probs[np.arange(n), actions] / mass
        probs /= mass[:, None]
        return Decisions(
            observations=obs,
            actions=actions,
            propensities=propensities,
            fallback=fallback,
            probabilities=probs,
            scores=scores,
            offsets=offsets,
            nonfinite=nonfinite,
            errors=n if failed else 0,
            time=time.time(),
        )

    def _masked(
        self,
        probs: np.ndarray,
        x: torch.Tensor,
        scores: np.ndarray | None,
        masks: np.ndarray | None,
        fallback: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply masks and fallbacks to ``probs`` in place (``fallback`` too); returns it and its row sums."""
        if masks is not None:
            probs *= masks
        probs[fallback] = 0.0
        mass = probs.sum(axis=1)
        # A greedy choice that the mask forbids leaves no mass: take the best allowed score instead.
        empty = np.flatnonzero((mass <= 0.0) & ~fallback)
        if len(empty):
            row_scores = scores[empty] if scores is not None else np.zeros((len(empty), self.n_actions))
            allowed = masks[empty] if masks is not None else np.ones(row_scores.shape, dtype=bool)
            best = np.where(allowed, row_scores, -np.inf).argmax(axis=1)
            probs[empty, best] = 1.0
        rows = np.flatnonzero(fallback)
        if len(rows):
            choice = self._fallback_for(masks[rows] if masks is not None else None, len(rows))
            probs[rows] = 0.0
            probs[rows, choice] = 1.0
        return probs, probs.sum(axis=1)

    def _gather_masks(
        self, requests: Sequence[ParsedRequest], offsets: list[int], n: int
    ) -> np.ndarray | None:
        if all(r.masks is None for r in requests):
            return None
        masks = np.ones((n, self.n_actions), dtype=bool)
        for off, r in zip(offsets, requests, strict=True):
            if r.masks is not None:
                masks[off : off + len(r)] = r.masks
        return masks

    def _fallback_for(self, masks: np.ndarray | None, k: int) -> np.ndarray:
        """The fallback action per row: the configured one, or the most frequent allowed one."""
        if masks is None:
            return np.full(k, self.fallback_action, dtype=np.int64)
        allowed = masks[:, self._fallback_order]
        return self._fallback_order[allowed.argmax(axis=1)]

    def drift_counts(self, obs: np.ndarray) -> np.ndarray:
        """Observations per (feature, reference bin): bin = searchsorted(edges, x, side='right')."""
        width = self.drift_edges.shape[1]
        counts = np.zeros((self.obs_dim, width + 1), dtype=np.int64)
        if width == 0:
            counts[:, 0] = len(obs)
            return counts
        flat_offsets = np.arange(self.obs_dim, dtype=np.int64) * (width + 1)
        chunk = max(1, DRIFT_CHUNK_CELLS // max(1, self.obs_dim * width))
        for start in range(0, len(obs), chunk):
            x = obs[start : start + chunk].astype(np.float64)
            bins = (x[:, :, None] >= self.drift_edges[None, :, :]).sum(axis=2)
            counts += np.bincount((bins + flat_offsets).ravel(), minlength=counts.size).reshape(counts.shape)
        return counts

    # --- answering ---------------------------------------------------------------------------------

    @staticmethod
    def ids_needed(request: ParsedRequest) -> int:
        """How many of ``request``'s observations came without a decision id."""
        given = request.decision_ids
        return len(request) if given is None else sum(1 for d in given if d is None)

    def decision_ids(self, request: ParsedRequest, fresh: Iterator[str] | None = None) -> list[str]:
        """The client's decision ids, with a random (version 4) UUID for every observation that has none.

        The new ids come from ``fresh`` when given (a server batch draws them at once, see
        :func:`uuid4_batch`), else they are drawn here.
        """
        given = request.decision_ids
        if fresh is None:
            fresh = iter(uuid4_batch(self.ids_needed(request)))
        if given is None:
            return [next(fresh) for _ in range(len(request))]
        return [d if d is not None else next(fresh) for d in given]

    def answer(
        self, request: ParsedRequest, decisions: Decisions, index: int, ids: list[str]
    ) -> dict[str, Any]:
        """The JSON answer to ``requests[index]`` of the batch that ``decisions`` came from."""
        start = decisions.offsets[index]
        stop = start + len(request)
        actions = decisions.actions[start:stop].tolist()
        props = decisions.propensities[start:stop].tolist()
        fallback = decisions.fallback[start:stop].tolist()
        probs = decisions.probabilities[start:stop].tolist() if request.want_probabilities else None
        scores: list[list[float] | None] | None = None
        if request.want_scores:
            if decisions.scores is None:  # the forward pass failed: there are no scores to show
                scores = [None] * len(request)
            else:
                rows = decisions.scores[start:stop].astype(np.float64)
                # NaN and inf are not JSON: a row with any of them is answered as null.
                finite = np.asarray(np.isfinite(rows).all(axis=1), dtype=bool)
                scores = [r if finite[i] else None for i, r in enumerate(rows.tolist())]
        items = []
        for i in range(len(request)):
            item: dict[str, Any] = {
                "action": actions[i],
                "propensity": props[i],
                "policy": self.name,
                "version": self.version,
                "decision_id": ids[i],
                "fallback": fallback[i],
            }
            if probs is not None:
                item["probabilities"] = probs[i]
            if scores is not None:
                item["scores"] = scores[i]
            items.append(item)
        return {"decisions": items} if request.batch else items[0]

    def records(
        self, request: ParsedRequest, decisions: Decisions, index: int, ids: list[str]
    ) -> list[dict[str, Any]]:
        """Decision-log records (fields as rlops_server.decision_log.DECISION_FIELDS) for one request."""
        start = decisions.offsets[index]
        stop = start + len(request)
        observations = request.observations.tolist()
        actions = decisions.actions[start:stop].tolist()
        props = decisions.propensities[start:stop].tolist()
        fallback = decisions.fallback[start:stop].tolist()
        masks = request.masks.astype(np.int8).tolist() if request.masks is not None else None
        episodes = request.episode_ids
        steps = request.steps
        t = decisions.time
        return [
            {
                "decision_id": ids[i],
                "time": t,
                "policy": self.name,
                "version": self.version,
                "episode_id": episodes[i] if episodes is not None else None,
                "step": steps[i] if steps is not None else None,
                "observation": observations[i],
                "action": actions[i],
                "propensity": props[i],
                "temperature": request.temperature,
                "epsilon": request.epsilon,
                "action_mask": masks[i] if masks is not None else None,
                "fallback": fallback[i],
            }
            for i in range(len(request))
        ]


__all__ = ["Decisions", "PolicyLoadError", "PolicyRuntime", "uuid4_batch"]
