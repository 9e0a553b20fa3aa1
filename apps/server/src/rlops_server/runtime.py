"""The serving core: load a policy version, validate requests, choose actions. No TorchServe here.

A policy version directory holds ``policy.pt``, ``model-card.json`` and ``SHA256SUMS`` (the artifact
contract, :mod:`rlops_contracts.artifact`). :meth:`PolicyRuntime.load` refuses a directory whose card is
invalid or whose files, the card included, do not match their recorded sha256. ``policy.pt`` is
TorchScript, for a Discrete action space ``forward(obs) -> scores`` and ``action_probs(obs, temperature,
epsilon) -> probs``; for a Box action space (card ``policy.score_kind`` = ``action``) ``forward(obs) ->
action`` [B, k], ``act(obs, std) -> (action [B, k], log_density [B])`` (NaN log-density when std <= 0)
and, for ``return: ["scores"]``, ``pre_squash(obs)`` [B, k].

Requests are checked by :mod:`rlops_server.requests` (4xx with reasons) before the policy runs.
:meth:`PolicyRuntime.decide` takes the parsed requests of
a whole server batch and runs the policy once on all their observations. The action distribution comes
from the policy's own ``action_probs`` (the rule is written once, inside ``policy.pt``); a mask zeroes
disallowed actions and the rest is renormalised; the action is sampled from that distribution and its
probability is the propensity. Non-finite model outputs get the fallback action, flagged.

A Box policy decides a server batch with one ``act`` call per exploration noise ``std`` in it (usually
one); the answer carries the action (k floats, inside the bounds) and its log-density (null when
deterministic). Its fallback, for non-finite actions or log-densities and failed passes, is the card's
``reference.actions.mean`` (the mean training action) clipped into the action bounds, with a null
log-density. Both kinds share the batching, the fallback accounting, the ids and the answer envelope.
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rlops_contracts import POLICY_FILE
from rlops_contracts.artifact import verify_policy_dir
from rlops_contracts.card import ArtifactError

from rlops_server.metrics import ReferenceBins
from rlops_server.requests import ParsedRequest, RequestParser
from rlops_server.settings import ServingSettings


class PolicyLoadError(RuntimeError):
    """A policy directory that must not be served: missing files, an invalid card, a sha256 mismatch."""


@dataclass
class Decisions:
    """What :meth:`PolicyRuntime.decide` chose for every observation of a server batch, in order."""

    observations: np.ndarray
    """float32 [n, obs_dim]: the observations of all requests, concatenated."""
    actions: np.ndarray
    """int64 [n] (Discrete) or float32 [n, k] (Box, raw action units inside the bounds)."""
    propensities: np.ndarray
    """float64 [n]: probability of the chosen action under the served (masked) distribution; NaN for Box."""
    fallback: np.ndarray
    """bool [n]: the action is the fallback (non-finite model output or a failed forward pass)."""
    probabilities: np.ndarray
    """float64 [n, n_actions]: the served distribution (a point mass on fallback rows); [n, 0] for Box."""
    scores: np.ndarray | None
    """float32 [n, n_actions]: what forward() returned; None when the forward pass raised. Box: the
    pre-squash mean [n, k], computed only when a request asked for scores (else None)."""
    offsets: list[int]
    """Start index of each request's observations."""
    nonfinite: int
    """Observations whose model outputs were not finite."""
    errors: int
    """Observations answered with the fallback because the forward pass raised."""
    time: float
    """Unix time of the decision."""
    log_densities: np.ndarray | None = None
    """Box: float64 [n], log-density of each action under the served distribution, NaN where unknown
    (std 0, fallback). None for Discrete."""


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
        self.obs_shape: tuple[int, ...] = tuple(card["observation_space"]["shape"])
        self.obs_dim: int = card["policy"]["input"]["shape"][1]
        self.score_kind: str = card["policy"]["score_kind"]
        selection = card["policy"]["selection"]
        self.temperature = float(selection["temperature"])
        self.epsilon = float(selection["epsilon"])
        self.std = float(selection.get("std", 0.0))
        self._rng = np.random.default_rng(settings.seed)
        self.observation_bins = ReferenceBins(card["reference"]["observation"]["bins"])
        """The card's observation reference bins (drift per feature)."""
        self.drift_bins = self.observation_bins.bins
        """Bins per feature."""
        space = card["action_space"]
        self.continuous: bool = space["type"] == "Box"
        """A Box action space: actions are float vectors (see the module docstring)."""
        if self.continuous:
            self._init_box(card, settings)
        else:
            self._init_discrete(card, settings)
        self.requests = RequestParser(
            self.obs_shape,
            self.n_actions,
            self.temperature,
            self.epsilon,
            settings.max_batch_observations,
            action_dim=self.action_dim if self.continuous else None,
            std=self.std,
        )

    def _init_box(self, card: dict[str, Any], settings: ServingSettings) -> None:
        space = card["action_space"]
        self.n_actions = 0
        self.action_dim: int = int(space["shape"][0])
        self.action_low = np.asarray(space["low"], dtype=np.float32)
        self.action_high = np.asarray(space["high"], dtype=np.float32)
        if settings.fallback_action is not None:
            raise PolicyLoadError(
                f"fallback_action {settings.fallback_action} is an action index, for Discrete policies; "
                f"{self.name} has a Box action space, whose fallback is the card's reference.actions.mean "
                "clipped into the bounds (leave fallback_action null)"
            )
        if settings.seed is not None:
            # act() draws its noise from torch's generator, which is per process: one policy per worker.
            torch.manual_seed(settings.seed)
        mean = np.asarray(card["reference"]["actions"]["mean"], dtype=np.float32)
        self.fallback_box = np.clip(mean, self.action_low, self.action_high)
        """float32 [k]: the fallback action, the mean training action clipped into the bounds."""
        self.action_bins: ReferenceBins | None = ReferenceBins(card["reference"]["actions"]["bins"])
        """Box: the card's action reference bins (drift per dimension)."""

    def _init_discrete(self, card: dict[str, Any], settings: ServingSettings) -> None:
        self.n_actions = int(card["action_space"]["n"])
        self.action_dim = 1
        self.action_bins = None
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
        # Policies exported before scores_and_probs existed need two passes (forward, action_probs).
        self._one_pass = hasattr(self.module, "scores_and_probs")

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
        box = card["action_space"]["type"] == "Box"
        needed = "act" if box else "action_probs"
        if not hasattr(module, needed):
            signature = "act(obs, std)" if box else "action_probs(obs, temperature, epsilon)"
            raise PolicyLoadError(
                f"{model_dir / POLICY_FILE}: has no exported {signature} method, which a policy with a "
                f"{card['action_space']['type']} action space needs"
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
        if self.continuous:
            self._self_check_box(model_dir, probe)
            return
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

    def _self_check_box(self, model_dir: Path, probe: torch.Tensor) -> None:
        try:
            action = self.module.forward(probe)
            explored, logp = self.module.act(probe, 0.5)
        except RuntimeError as e:
            raise PolicyLoadError(f"{model_dir / POLICY_FILE}: fails on a zero observation: {e}") from e
        expected = (1, self.action_dim)
        shapes = (tuple(action.shape), tuple(explored.shape), tuple(logp.shape))
        if shapes != (expected, expected, (1,)):
            raise PolicyLoadError(
                f"{model_dir / POLICY_FILE}: forward and act output shapes {shapes[0]}, {shapes[1]} and "
                f"{shapes[2]}, expected {expected}, {expected} and (1,) (an action of the card's "
                f"{self.action_dim} dimension(s) and one log-density per observation)"
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
        if self.continuous:
            return self._decide_box(requests, offsets, obs, x)
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
                for (t, e), rows in _rows_by(requests, offsets, lambda r: (r.temperature, r.epsilon)).items():
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

    def _decide_box(
        self, requests: Sequence[ParsedRequest], offsets: list[int], obs: np.ndarray, x: torch.Tensor
    ) -> Decisions:
        """Actions of a Box policy: one ``act`` call per exploration noise in the batch (see the module
        docstring for the fallback)."""
        n, k = len(obs), self.action_dim
        stds = np.concatenate([np.full(len(r), r.std) for r in requests]) if len(requests) > 1 else None
        scores: np.ndarray | None = None
        failed = False
        try:
            if stds is None or len({r.std for r in requests}) == 1:
                a_t, l_t = self.module.act(x, requests[0].std)
                actions, logp = a_t.numpy(), l_t.numpy().astype(np.float64)
            else:
                actions = np.empty((n, k), dtype=np.float32)
                logp = np.empty(n, dtype=np.float64)
                for std, rows in _rows_by(requests, offsets, lambda r: r.std).items():
                    a_t, l_t = self.module.act(x[torch.from_numpy(rows)], std)
                    actions[rows], logp[rows] = a_t.numpy(), l_t.numpy()
            if any(r.want_scores for r in requests):
                scores = self.module.pre_squash(x).numpy()
        except RuntimeError:
            # A pass that raises on valid input is the model's fault: answer the fallback, counted.
            failed = True
            actions = np.empty((n, k), dtype=np.float32)
            logp = np.full(n, np.nan)
            scores = None
        if failed:
            fallback = np.ones(n, dtype=bool)
        else:
            stochastic = (stds if stds is not None else np.full(n, requests[0].std)) > 0.0
            # A deterministic action has no density (NaN by contract); an explored one must have one.
            fallback = ~(np.isfinite(actions).all(axis=1) & (np.isfinite(logp) | ~stochastic))
        if fallback.any():
            actions[fallback] = self.fallback_box
            logp[fallback] = np.nan
        # tanh keeps actions inside the bounds up to float rounding; the answer must be inside them exactly.
        np.clip(actions, self.action_low, self.action_high, out=actions)
        return Decisions(
            observations=obs,
            actions=actions,
            propensities=np.full(n, np.nan),
            fallback=fallback,
            probabilities=np.empty((n, 0), dtype=np.float64),
            scores=scores,
            offsets=offsets,
            nonfinite=0 if failed else int(fallback.sum()),
            errors=n if failed else 0,
            time=time.time(),
            log_densities=logp,
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
        return self.observation_bins.counts(obs)

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
        fallback = decisions.fallback[start:stop].tolist()
        # Box: the log-density (null when unknown) in place of the propensity.
        if decisions.log_densities is not None:
            chance, chance_key = _nullable(decisions.log_densities[start:stop]), "log_density"
        else:
            chance, chance_key = decisions.propensities[start:stop].tolist(), "propensity"
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
                chance_key: chance[i],
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
        fallback = decisions.fallback[start:stop].tolist()
        episodes = request.episode_ids
        steps = request.steps
        t = decisions.time
        n = len(request)
        none: list[Any] = [None] * n
        # The columns that differ between the kinds: a Box decision has a log-density and a std, a
        # Discrete one a propensity, temperature, epsilon and mask; the other kind's fields are null.
        if decisions.log_densities is not None:
            props, logp, masks = none, _nullable(decisions.log_densities[start:stop]), none
            temperature, epsilon, std = None, None, request.std
        else:
            props, logp = decisions.propensities[start:stop].tolist(), none
            masks = request.masks.astype(np.int8).tolist() if request.masks is not None else none
            temperature, epsilon, std = request.temperature, request.epsilon, None
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
                "log_density": logp[i],
                "temperature": temperature,
                "epsilon": epsilon,
                "std": std,
                "action_mask": masks[i],
                "fallback": fallback[i],
            }
            for i in range(n)
        ]


_Setting = TypeVar("_Setting", bound=Hashable)


def _rows_by(
    requests: Sequence[ParsedRequest], offsets: list[int], setting: Callable[[ParsedRequest], _Setting]
) -> dict[_Setting, np.ndarray]:
    """The batch rows (int64 indices) of each exploration setting that occurs in ``requests``."""
    parts: dict[_Setting, list[np.ndarray]] = {}
    for off, r in zip(offsets, requests, strict=True):
        parts.setdefault(setting(r), []).append(np.arange(off, off + len(r)))
    return {key: np.concatenate(rows) for key, rows in parts.items()}


def _nullable(values: np.ndarray) -> list[float | None]:
    """Floats as JSON can hold them: NaN (unknown) and infinities become null."""
    finite = np.isfinite(values)
    return [v if ok else None for v, ok in zip(values.tolist(), finite.tolist(), strict=True)]


__all__ = ["Decisions", "PolicyLoadError", "PolicyRuntime", "uuid4_batch"]
