"""The serving core: load a policy version, validate requests, choose actions. No TorchServe here.

A policy version directory holds ``policy.pt`` (TorchScript: ``forward(obs) -> scores`` and
``action_probs(obs, temperature, epsilon) -> probs``) and ``model-card.json``. :meth:`PolicyRuntime.load`
refuses a directory whose card is invalid or whose files do not match the sha256 in the card.

Requests are JSON objects, one observation or a batch::

    {"observation": [0.1, 0.0, -0.2, 0.3], "decision_id": "d-1", "episode_id": "e-7", "step": 12,
     "deterministic": false, "temperature": 0.5, "epsilon": 0.05, "action_mask": [1, 0],
     "return": ["probabilities", "scores"]}
    {"observations": [[...], [...]], "decision_ids": [...], "episode_ids": [...], "steps": [...],
     "action_masks": [[...], [...]] | "action_mask": [...], ...}

Every problem with a request raises :class:`RequestError` (status 400, 413 or 422) with a JSON body
that says what was wrong and what is accepted. :meth:`PolicyRuntime.decide` takes the parsed requests of
a whole server batch and runs the policy once on all their observations. The action distribution comes
from the policy's own ``action_probs`` (the rule is written once, inside ``policy.pt``); a mask zeroes
disallowed actions and the rest is renormalised; the action is sampled from that distribution and its
probability is the propensity. Non-finite model outputs get the fallback action, flagged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import reprlib
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import torch
from rlops_contracts import MODEL_CARD_FILE, MODEL_CARD_SCHEMA, POLICY_FILE, load_schema

from rlops_server import metrics as m

MAX_TEMPERATURE = 10.0
"""Largest temperature a request may ask for; above it the distribution is uniform in all but name."""
MAX_ID_LENGTH = 128
"""Longest accepted ``decision_id`` / ``episode_id``."""
MAX_STEP = 2**63 - 1
"""Largest accepted ``step``: the decision log and the dataset hold steps as 64-bit integers."""
RETURN_OPTIONS = ("probabilities", "scores")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ACCEPTED_BODY = (
    "a JSON object as the request body, sent with Content-Type: application/json, such as "
    '{"observation": [...]} or {"observations": [[...], ...]}'
)
DRIFT_CHUNK_CELLS = 1 << 22
"""Comparisons per chunk when binning observations (bounds the temporary boolean array to 4 MiB)."""

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 40, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
MAX_FIELDS_SHOWN = 10


def _utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: JSON's ``\\ud800`` escapes decode to lone surrogates,
    which no UTF-8 log line can hold (the record would be answered but never written)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: Any) -> str:
    """A value from a request as an error message shows it: cut short. An answer that echoed a request of
    megabytes would exceed TorchServe's max_response_size, and the frontend drops the worker for it."""
    return _SHORT.repr(value)


_SINGLE_FIELDS = ("observation", "decision_id", "episode_id", "step", "action_mask")
_BATCH_FIELDS = ("observations", "decision_ids", "episode_ids", "steps", "action_masks", "action_mask")
_COMMON_FIELDS = ("deterministic", "temperature", "epsilon", "return")


class PolicyLoadError(RuntimeError):
    """A policy directory that must not be served: missing files, an invalid card, a sha256 mismatch."""


class RequestError(Exception):
    """A request that cannot be answered; ``body()`` is the JSON answer, ``status`` its HTTP status."""

    def __init__(self, status: int, reason: str, message: str, accepted: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.accepted = accepted

    def body(self) -> dict[str, Any]:
        return {
            "error": self.message,
            "reason": self.reason,
            "status": self.status,
            "accepted": self.accepted,
        }


# --- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingSettings:
    """Per-model serving settings: the ``handler:`` section of the archive's model-config yaml."""

    max_batch_observations: int = 1024
    """Most observations one request may carry (413 above); a server batch may hold several requests."""
    fallback_action: int | None = None
    """Action answered when the model's outputs are not finite; None: the most frequent action in the
    training data (model card ``reference.actions``)."""
    seed: int | None = None
    """Seed of the sampling generator; None: fresh entropy in every worker."""
    metrics_flush_seconds: float = 1.0
    """How often counters and gauges are handed to the metrics backend (latency observations too)."""
    decision_log_dir: str | None = None
    """Where decisions are logged; the RLOPS_DECISION_LOG_DIR environment variable overrides it; None and
    no variable: decisions are not logged."""
    decision_log_max_queue: int = 10000
    """Decisions waiting to be written before new ones are dropped (and counted)."""
    worker_log_level: str = "WARNING"
    """Level of the worker's root logger. TorchServe's worker logs a line per batch at INFO and its
    frontend copies every worker line into its own logs; metrics and rlops messages stay at INFO."""

    def __post_init__(self) -> None:
        problems = []
        if type(self.max_batch_observations) is not int or self.max_batch_observations < 1:
            problems.append(
                f"max_batch_observations must be an integer >= 1, got {self.max_batch_observations!r}"
            )
        if self.fallback_action is not None and (
            type(self.fallback_action) is not int or self.fallback_action < 0
        ):
            problems.append(
                f"fallback_action must be an action index >= 0 or null, got {self.fallback_action!r}"
            )
        if self.seed is not None and type(self.seed) is not int:
            problems.append(f"seed must be an integer or null, got {self.seed!r}")
        flush = self.metrics_flush_seconds
        if isinstance(flush, bool) or not isinstance(flush, int | float) or not 0.01 <= flush <= 60:
            problems.append(f"metrics_flush_seconds must be a number in [0.01, 60], got {flush!r}")
        if self.decision_log_dir is not None and not (
            isinstance(self.decision_log_dir, str) and self.decision_log_dir
        ):
            problems.append(
                f"decision_log_dir must be a non-empty path or null, got {self.decision_log_dir!r}"
            )
        if type(self.decision_log_max_queue) is not int or self.decision_log_max_queue < 1:
            problems.append(
                f"decision_log_max_queue must be an integer >= 1, got {self.decision_log_max_queue!r}"
            )
        if self.worker_log_level not in LOG_LEVELS:
            problems.append(
                f"worker_log_level must be one of {', '.join(LOG_LEVELS)}, got {self.worker_log_level!r}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | None, source: str = "handler settings"
    ) -> ServingSettings:
        """Settings from a mapping (the yaml ``handler:`` section); unknown keys are an error."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        try:
            return cls(**dict(data))
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def to_mapping(self) -> dict[str, Any]:
        return asdict(self)


# --- requests --------------------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedRequest:
    """One validated request: its observations and the options that apply to them."""

    observations: np.ndarray
    """float32 [k, obs_dim]"""
    batch: bool
    """The request used ``observations`` (answered with a list of decisions)."""
    temperature: float
    epsilon: float
    decision_ids: list[str] | None = None
    episode_ids: list[str | None] | None = None
    steps: list[int | None] | None = None
    masks: np.ndarray | None = None
    """bool [k, n_actions]; None: every action allowed."""
    want_probabilities: bool = False
    want_scores: bool = False

    def __len__(self) -> int:
        return len(self.observations)


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


def _reject(status: int, reason: str, message: str, accepted: str) -> RequestError:
    return RequestError(status, reason, message, accepted)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a number in JSON")


def decode_body(body: Any) -> dict[str, Any]:
    """The request object from a body TorchServe handed over: already decoded JSON, bytes or text."""
    if isinstance(body, bytes | bytearray | str):
        if not body:
            raise _reject(400, m.R_MALFORMED_JSON, "the request body is empty", ACCEPTED_BODY)
        try:
            # NaN and Infinity literals are read as numbers (as TorchServe's own decoding does) and then
            # refused as non-finite observations, so a request gets the same answer however it arrived.
            body = json.loads(body)
        except UnicodeDecodeError as e:
            raise _reject(400, m.R_MALFORMED_JSON, f"the body is not UTF-8 text: {e}", ACCEPTED_BODY) from e
        except ValueError as e:
            raise _reject(400, m.R_MALFORMED_JSON, f"the body is not valid JSON: {e}", ACCEPTED_BODY) from e
        except RecursionError as e:
            raise _reject(
                400, m.R_MALFORMED_JSON, "the body is JSON nested too deeply to be read", ACCEPTED_BODY
            ) from e
    if not isinstance(body, dict):
        raise _reject(
            400,
            m.R_NOT_AN_OBJECT,
            f"the body is a JSON {_json_type(body)}, not an object",
            ACCEPTED_BODY,
        )
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# --- the runtime -----------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes, the form model cards use."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


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


def _card_problem(card: dict[str, Any]) -> str | None:
    """The first cross-field inconsistency that serving depends on, or None."""
    dim = card["policy"]["input"]["shape"][1]
    if len(card["policy"]["input"]["shape"]) != 2:
        return f"policy.input.shape: expected [-1, obs_dim], got {card['policy']['input']['shape']}"
    if math.prod(card["observation_space"]["shape"]) != dim:
        shape = card["observation_space"]["shape"]
        return f"policy.input.shape: {dim} features but observation_space.shape is {shape}"
    bins = card["reference"]["observation"]["bins"]
    if len(bins) != dim:
        return f"reference.observation.bins: {len(bins)} entries, expected one per feature ({dim})"
    for j, b in enumerate(bins):
        if len(b["proportions"]) != len(b["edges"]) + 1:
            return (
                f"reference.observation.bins[{j}]: {len(b['edges'])} edges need {len(b['edges']) + 1} "
                f"proportions, got {len(b['proportions'])}"
            )
        if any(not math.isfinite(e) for e in b["edges"]) or any(
            b2 < b1 for b1, b2 in zip(b["edges"], b["edges"][1:], strict=False)
        ):
            return f"reference.observation.bins[{j}].edges: must be finite and sorted ascending"
    n_actions = card["action_space"]["n"]
    if len(card["reference"]["actions"]["proportions"]) != n_actions:
        return (
            f"reference.actions.proportions: {len(card['reference']['actions']['proportions'])} entries, "
            f"expected one per action ({n_actions})"
        )
    return None


def read_card(model_dir: Path) -> dict[str, Any]:
    """The model card of ``model_dir``, valid against the contracts schema; raises PolicyLoadError."""
    path = model_dir / MODEL_CARD_FILE
    if not path.is_file():
        raise PolicyLoadError(
            f"{model_dir}: no {MODEL_CARD_FILE}; a policy version holds {POLICY_FILE} and it"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise PolicyLoadError(f"{path}: not valid JSON: {e}") from e
    validator = jsonschema.Draft202012Validator(load_schema(MODEL_CARD_SCHEMA))
    errors = list(validator.iter_errors(card))
    if errors:
        first = jsonschema.exceptions.best_match(errors)
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.absolute_path)
        raise PolicyLoadError(f"{path}: card{where}: {first.message} ({len(errors)} problem(s) in all)")
    problem = _card_problem(card)
    if problem:
        raise PolicyLoadError(f"{path}: {problem}")
    return dict(card)


def verify_files(model_dir: Path, card: dict[str, Any]) -> None:
    """Every file the card lists must exist and match its sha256; raises PolicyLoadError naming it."""
    for fname, expected in card["files"].items():
        file = model_dir / fname
        if not file.is_file():
            raise PolicyLoadError(f"{file}: listed in {MODEL_CARD_FILE} but missing; refusing to serve")
        actual = sha256_file(file)
        if actual != expected:
            raise PolicyLoadError(
                f"{file}: sha256 does not match {MODEL_CARD_FILE} (card {expected}, file {actual}); "
                "the file was modified or only partly copied, refusing to serve it"
            )


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
        shape = list(self.obs_shape)
        self._accepted_obs = (
            f"'observation': a list of {self.obs_dim} finite numbers (observation shape {shape})"
        )

    @classmethod
    def load(cls, model_dir: Path | str, settings: ServingSettings | None = None) -> PolicyRuntime:
        """Load and check a policy version directory (``policy.pt`` + ``model-card.json``)."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise PolicyLoadError(f"{model_dir}: no such policy directory")
        card = read_card(model_dir)
        verify_files(model_dir, card)
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

    # --- parsing -----------------------------------------------------------------------------------

    def parse(self, body: Any) -> ParsedRequest:
        """Validate one request body; raises RequestError saying what is wrong and what is accepted."""
        req = decode_body(body)
        batch = "observations" in req
        if batch and "observation" in req:
            raise _reject(
                400, m.R_BAD_FIELD, "give 'observation' or 'observations', not both", self._accepted_obs
            )
        if not batch and "observation" not in req:
            raise _reject(
                400,
                m.R_MISSING_OBSERVATION,
                "the request has no 'observation' (or 'observations' for a batch)",
                self._accepted_obs + "; or 'observations': a list of such lists",
            )
        allowed = (_BATCH_FIELDS if batch else _SINGLE_FIELDS) + _COMMON_FIELDS
        unknown = [k for k in req if k not in allowed]
        if unknown:
            raise _reject(
                400,
                m.R_BAD_FIELD,
                f"unknown field(s) {', '.join(_shown(k) for k in sorted(unknown)[:MAX_FIELDS_SHOWN])}"
                + (f" and {len(unknown) - MAX_FIELDS_SHOWN} more" if len(unknown) > MAX_FIELDS_SHOWN else ""),
                f"fields of a {'batch' if batch else 'single'} request: {', '.join(allowed)}",
            )
        obs = self._observations(req["observations"] if batch else req["observation"], batch)
        k = len(obs)
        temperature, epsilon = self._exploration(req)
        want = self._return_options(req.get("return"))
        if batch:
            decision_ids = self._id_list(req, "decision_ids", k)
            episode_ids = self._id_list(req, "episode_ids", k)
            steps = self._step_list(req, k)
            if "action_masks" in req and "action_mask" in req:
                raise _reject(
                    400,
                    m.R_BAD_FIELD,
                    "give 'action_mask' (one for all observations) or 'action_masks', not both",
                    "'action_mask': one mask; 'action_masks': one mask per observation",
                )
            if "action_masks" in req:
                masks = self._masks(req["action_masks"], "action_masks", k)
            elif "action_mask" in req:
                masks = np.broadcast_to(
                    self._masks([req["action_mask"]], "action_mask", 1), (k, self.n_actions)
                )
            else:
                masks = None
        else:
            decision_ids = (
                None if req.get("decision_id") is None else [self._id(req["decision_id"], "decision_id")]
            )
            episode_ids = (
                None if req.get("episode_id") is None else [self._id(req["episode_id"], "episode_id", True)]
            )
            steps = None if req.get("step") is None else [self._step(req["step"], "step")]
            masks = (
                None
                if req.get("action_mask") is None
                else self._masks([req["action_mask"]], "action_mask", 1)
            )
        return ParsedRequest(
            observations=obs,
            batch=batch,
            temperature=temperature,
            epsilon=epsilon,
            decision_ids=decision_ids,
            episode_ids=episode_ids,
            steps=steps,
            masks=masks,
            want_probabilities="probabilities" in want,
            want_scores="scores" in want,
        )

    def _observations(self, value: Any, batch: bool) -> np.ndarray:
        where = "observations" if batch else "observation"
        accepted = (
            self._accepted_obs
            if not batch
            else (
                f"'observations': a list of 1 to {self.settings.max_batch_observations} observations, each a "
                f"list of {self.obs_dim} finite numbers"
            )
        )
        if not isinstance(value, list):
            raise _reject(
                422, m.R_BAD_OBSERVATION, f"'{where}' is a JSON {_json_type(value)}, not an array", accepted
            )
        if batch:
            if not value:
                raise _reject(422, m.R_EMPTY_BATCH, "'observations' is empty", accepted)
            if len(value) > self.settings.max_batch_observations:
                raise _reject(
                    413,
                    m.R_BATCH_TOO_LARGE,
                    f"'observations' holds {len(value)} observations, more than this server accepts per "
                    f"request ({self.settings.max_batch_observations})",
                    accepted + "; split larger batches into several requests",
                )
        try:
            arr = np.asarray(value)
        except ValueError as e:
            raise _reject(
                422, m.R_BAD_OBSERVATION, f"'{where}' is ragged or nested unevenly: {e}", accepted
            ) from e
        if arr.dtype.kind not in "iuf":
            what = {"b": "booleans", "U": "strings", "O": "non-numbers (null, objects or huge integers)"}
            raise _reject(
                422,
                m.R_BAD_OBSERVATION,
                f"'{where}' contains {what.get(arr.dtype.kind, arr.dtype.name)}",
                accepted,
            )
        rows = len(value) if batch else 1
        shape = arr.shape[1:] if batch else arr.shape
        if shape != (self.obs_dim,) and shape != self.obs_shape:
            raise _reject(
                422,
                m.R_BAD_OBSERVATION,
                f"'{where}' holds observations of shape {list(shape)}, expected {self.obs_dim} numbers each"
                if batch
                else f"'observation' has shape {list(shape)}, expected {self.obs_dim} numbers",
                accepted,
            )
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are refused just below
            obs = arr.reshape(rows, self.obs_dim).astype(np.float32, copy=False)
        finite = np.isfinite(obs)
        if not finite.all():
            r, c = (int(i[0]) for i in np.nonzero(~finite))
            position = f"observations[{r}][{c}]" if batch else f"observation[{c}]"
            raise _reject(
                422,
                m.R_NONFINITE_OBSERVATION,
                f"{position} is {arr.reshape(rows, self.obs_dim)[r, c]!r}: not finite in float32",
                accepted + " (NaN, Infinity and values beyond ±3.4e38 are refused)",
            )
        return obs

    def _exploration(self, req: dict[str, Any]) -> tuple[float, float]:
        deterministic = req.get("deterministic", False)
        if not isinstance(deterministic, bool):
            raise _reject(
                422,
                m.R_BAD_OPTION,
                f"'deterministic' is {_shown(deterministic)}",
                "'deterministic': true or false",
            )
        temperature, epsilon = self.temperature, self.epsilon
        if "temperature" in req:
            temperature = self._number(req["temperature"], "temperature", 0.0, MAX_TEMPERATURE)
        if "epsilon" in req:
            epsilon = self._number(req["epsilon"], "epsilon", 0.0, 1.0)
        if deterministic:
            if "temperature" in req or "epsilon" in req:
                raise _reject(
                    422,
                    m.R_BAD_OPTION,
                    "'deterministic': true cannot be combined with 'temperature' or 'epsilon'",
                    "'deterministic': true (greedy), or 'temperature'/'epsilon' overrides",
                )
            return 0.0, 0.0
        return temperature, epsilon

    @staticmethod
    def _number(value: Any, name: str, low: float, high: float) -> float:
        accepted = f"'{name}': a number in [{low:g}, {high:g}]"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' is a JSON {_json_type(value)}", accepted)
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer beyond the range of a float (JSON integers have no limit)
            finite = False
        if not (finite and low <= value <= high):
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' is {_shown(value)}, out of range", accepted)
        return float(value)

    @staticmethod
    def _return_options(value: Any) -> tuple[str, ...]:
        accepted = f"'return': a list of any of {', '.join(RETURN_OPTIONS)}"
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _reject(422, m.R_BAD_OPTION, f"'return' is {_shown(value)}", accepted)
        unknown = [v for v in value if v not in RETURN_OPTIONS]
        if unknown:
            raise _reject(422, m.R_BAD_OPTION, f"'return' asks for unknown {_shown(unknown)}", accepted)
        return tuple(value)

    @staticmethod
    def _id(value: Any, name: str, allow_int: bool = False) -> str:
        accepted = f"'{name}': a string of 1 to {MAX_ID_LENGTH} characters" + (
            " or an integer" if allow_int else ""
        )
        if allow_int and type(value) is int:
            return str(value)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
            shown = _shown(value) if not isinstance(value, str) else f"a string of {len(value)} characters"
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' is {shown}", accepted)
        if not _utf8(value):
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' holds a lone surrogate (\\ud800-\\udfff)", accepted)
        return value

    @staticmethod
    def _step(value: Any, name: str) -> int:
        if type(value) is not int or not 0 <= value <= MAX_STEP:
            raise _reject(
                422, m.R_BAD_OPTION, f"'{name}' is {_shown(value)}", f"'{name}': an integer in [0, 2^63 - 1]"
            )
        return value

    @staticmethod
    def _per_observation(
        req: dict[str, Any], name: str, k: int, items: str, check: Callable[[Any, str], Any]
    ) -> list[Any] | None:
        """``req[name]``: null, or a list with one entry (null or checked by ``check``) per observation."""
        value = req.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != k:
            raise _reject(
                422,
                m.R_BAD_OPTION,
                f"'{name}' must be a list with one entry per observation ({k})",
                f"'{name}': a list of {k} {items} or nulls",
            )
        return [None if v is None else check(v, f"{name}[{i}]") for i, v in enumerate(value)]

    def _id_list(self, req: dict[str, Any], name: str, k: int) -> list[Any] | None:
        allow_int = name == "episode_ids"
        return self._per_observation(req, name, k, "strings", lambda v, n: self._id(v, n, allow_int))

    def _step_list(self, req: dict[str, Any], k: int) -> list[Any] | None:
        return self._per_observation(req, "steps", k, "integers >= 0", self._step)

    def _masks(self, value: Any, name: str, k: int) -> np.ndarray:
        accepted = (
            f"'{name}': {'a list of ' + str(k) + ' masks, each ' if name == 'action_masks' else ''}"
            f"a list of {self.n_actions} values 0/1 or true/false with at least one allowed action"
        )
        if not isinstance(value, list) or len(value) != k:
            raise _reject(422, m.R_BAD_MASK, f"'{name}' must have one mask per observation ({k})", accepted)
        try:
            arr = np.asarray(value)
        except ValueError as e:
            raise _reject(422, m.R_BAD_MASK, f"'{name}' is ragged: {e}", accepted) from e
        if arr.shape != (k, self.n_actions):
            shown = list(arr.shape[1:])
            raise _reject(
                422,
                m.R_BAD_MASK,
                f"'{name}' has shape {shown}, expected {self.n_actions} values per mask",
                accepted,
            )
        if arr.dtype.kind == "b":
            mask = arr
        elif arr.dtype.kind in "iu" and bool(((arr == 0) | (arr == 1)).all()):
            mask = arr.astype(bool)
        else:
            raise _reject(422, m.R_BAD_MASK, f"'{name}' holds values other than 0/1 or true/false", accepted)
        empty = ~mask.any(axis=1)
        if empty.any():
            row = int(np.argmax(empty))
            where = f"{name}[{row}]" if name == "action_masks" else name
            raise _reject(422, m.R_BAD_MASK, f"'{where}' allows no action", accepted)
        return mask

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


__all__ = [
    "Decisions",
    "ParsedRequest",
    "PolicyLoadError",
    "PolicyRuntime",
    "RequestError",
    "ServingSettings",
    "decode_body",
    "read_card",
    "sha256_file",
    "uuid4_batch",
    "verify_files",
]
