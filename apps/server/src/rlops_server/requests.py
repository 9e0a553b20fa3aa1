"""Policy requests: what a request may say, checked field by field, before any model runs.

Requests are JSON objects, one observation or a batch::

    {"observation": [0.1, 0.0, -0.2, 0.3], "decision_id": "d-1", "episode_id": "e-7", "step": 12,
     "deterministic": false, "temperature": 0.5, "epsilon": 0.05, "action_mask": [1, 0],
     "return": ["probabilities", "scores"]}
    {"observations": [[...], [...]], "decision_ids": [...], "episode_ids": [...], "steps": [...],
     "action_masks": [[...], [...]] | "action_mask": [...], ...}

A policy with a Box action space takes ``std`` (exploration noise before the tanh squashing, in
``[0, MAX_STD]``) or ``deterministic: true`` instead of ``temperature``/``epsilon``, has no action masks,
and its ``return`` may ask only for ``scores``: the pre-squash mean, one value per action dimension
(the action is ``mid + half * tanh(scores)`` when deterministic). A field of the other kind of policy is
refused 422, naming it and what this policy accepts.

Every problem raises :class:`RequestError` (status 400, 413 or 422) with a JSON body that says what was
wrong and what is accepted. A :class:`RequestParser` knows the served policy's shapes and defaults.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rlops_server import metrics as m

MAX_TEMPERATURE = 10.0
"""Largest temperature a request may ask for; above it the distribution is uniform in all but name."""
MAX_ID_LENGTH = 128
"""Longest accepted ``decision_id`` / ``episode_id``."""
MAX_STEP = 2**63 - 1
"""Largest accepted ``step``: the decision log and the dataset hold steps as 64-bit integers."""
MAX_STD = 10.0
"""Largest ``std`` a Box request may ask for. It is in pre-squash units: beyond about 3 nearly every
draw already lands close to a bound, so larger values only spread draws between the two bounds."""
RETURN_OPTIONS = ("probabilities", "scores")
BOX_RETURN_OPTIONS = ("scores",)
ACCEPTED_BODY = (
    "a JSON object as the request body, sent with Content-Type: application/json, such as "
    '{"observation": [...]} or {"observations": [[...], ...]}'
)
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 40, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
MAX_FIELDS_SHOWN = 10


def writable_utf8(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8: JSON's ``\\ud800`` escapes decode to lone surrogates,
    which no UTF-8 log line can hold (the record would be answered but never written)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _deterministic(req: dict[str, Any]) -> bool:
    """The request's ``deterministic`` flag (false when absent); anything but a boolean is refused."""
    deterministic = req.get("deterministic", False)
    if not isinstance(deterministic, bool):
        raise _reject(
            422,
            m.R_BAD_OPTION,
            f"'deterministic' is {shown(deterministic)}",
            "'deterministic': true or false",
        )
    return deterministic


def shown(value: Any) -> str:
    """A value from a request as an error message shows it: cut short. An answer that echoed a request of
    megabytes would exceed a server's response limit (TorchServe's max_response_size: the frontend drops
    the worker for it) or turn a large bad request into a larger answer."""
    return _SHORT.repr(value)


_SINGLE_FIELDS = ("observation", "decision_id", "episode_id", "step", "action_mask")
_BATCH_FIELDS = ("observations", "decision_ids", "episode_ids", "steps", "action_masks", "action_mask")
_COMMON_FIELDS = ("deterministic", "temperature", "epsilon", "std", "return")
_DISCRETE_ONLY = ("temperature", "epsilon", "action_mask", "action_masks")
"""Fields that only a policy with a Discrete action space accepts."""
_BOX_ONLY = ("std",)
"""Fields that only a policy with a Box action space accepts."""


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
    std: float = 0.0
    """Box policies: exploration noise before the tanh squashing (0: the deterministic action)."""

    def __len__(self) -> int:
        return len(self.observations)


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


class RequestParser:
    """Checks requests against one served policy: its observation shape, actions and selection.

    ``action_dim`` None: a Discrete policy of ``n_actions`` actions; k: a Box policy of k dimensions,
    whose default exploration noise is ``std``.
    """

    def __init__(
        self,
        obs_shape: tuple[int, ...],
        n_actions: int,
        temperature: float,
        epsilon: float,
        max_batch_observations: int,
        *,
        action_dim: int | None = None,
        std: float = 0.0,
    ) -> None:
        self.obs_shape = obs_shape
        self.obs_dim = math.prod(obs_shape)
        self.n_actions = n_actions
        self.temperature = temperature
        self.epsilon = epsilon
        self.action_dim = action_dim
        self.std = std
        self.max_batch_observations = max_batch_observations
        self._accepted_obs = (
            f"'observation': a list of {self.obs_dim} finite numbers (observation shape {list(obs_shape)})"
        )

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
        self._check_policy_kind(req)
        foreign = _BOX_ONLY if self.action_dim is None else _DISCRETE_ONLY
        allowed = tuple(
            f for f in (_BATCH_FIELDS if batch else _SINGLE_FIELDS) + _COMMON_FIELDS if f not in foreign
        )
        unknown = [k for k in req if k not in allowed]
        if unknown:
            raise _reject(
                400,
                m.R_BAD_FIELD,
                f"unknown field(s) {', '.join(shown(k) for k in sorted(unknown)[:MAX_FIELDS_SHOWN])}"
                + (f" and {len(unknown) - MAX_FIELDS_SHOWN} more" if len(unknown) > MAX_FIELDS_SHOWN else ""),
                f"fields of a {'batch' if batch else 'single'} request: {', '.join(allowed)}",
            )
        obs = self._observations(req["observations"] if batch else req["observation"], batch)
        k = len(obs)
        std = 0.0
        if self.action_dim is None:
            temperature, epsilon = self._exploration(req)
        else:
            temperature, epsilon, std = 0.0, 0.0, self._noise(req)
        want = self._return_options(req.get("return"), self.action_dim is not None)
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
            std=std,
        )

    def _check_policy_kind(self, req: dict[str, Any]) -> None:
        """Refuse the fields of the other kind of action space, saying what this policy accepts."""
        if self.action_dim is None:
            foreign = [k for k in _BOX_ONLY if k in req]
            if foreign:
                raise _reject(
                    422,
                    m.R_BAD_OPTION,
                    f"'{foreign[0]}' is for policies with a Box action space; this policy has "
                    f"{self.n_actions} discrete actions",
                    "a Discrete policy accepts 'temperature', 'epsilon', 'deterministic', 'action_mask(s)' "
                    f"and 'return': a list of any of {', '.join(RETURN_OPTIONS)}",
                )
            return
        foreign = [k for k in _DISCRETE_ONLY if k in req]
        if foreign:
            raise _reject(
                422,
                m.R_BAD_OPTION,
                f"'{foreign[0]}' is for policies with a Discrete action space; this policy has a Box "
                f"action space of {self.action_dim} dimension(s)",
                self._accepted_box,
            )

    @property
    def _accepted_box(self) -> str:
        return (
            f"a Box policy accepts 'std' (a number in [0, {MAX_STD:g}]), 'deterministic': true (std 0) "
            "and 'return': ['scores'] (the pre-squash mean); no temperature, epsilon or action masks"
        )

    def _noise(self, req: dict[str, Any]) -> float:
        """The exploration noise of a Box request: its ``std``, 0 when deterministic, else the card's."""
        deterministic = _deterministic(req)
        if deterministic and "std" in req:
            raise _reject(
                422,
                m.R_BAD_OPTION,
                "'deterministic': true cannot be combined with 'std'",
                "'deterministic': true (the mean action), or 'std' to override the exploration noise",
            )
        if deterministic:
            return 0.0
        if "std" in req:
            return self._number(req["std"], "std", 0.0, MAX_STD)
        return self.std

    def _observations(self, value: Any, batch: bool) -> np.ndarray:
        where = "observations" if batch else "observation"
        accepted = (
            self._accepted_obs
            if not batch
            else (
                f"'observations': a list of 1 to {self.max_batch_observations} observations, each a "
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
            if len(value) > self.max_batch_observations:
                raise _reject(
                    413,
                    m.R_BATCH_TOO_LARGE,
                    f"'observations' holds {len(value)} observations, more than this server accepts per "
                    f"request ({self.max_batch_observations})",
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
        deterministic = _deterministic(req)
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
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' is {shown(value)}, out of range", accepted)
        return float(value)

    @staticmethod
    def _return_options(value: Any, box: bool = False) -> tuple[str, ...]:
        accepted = f"'return': a list of any of {', '.join(RETURN_OPTIONS)}"
        if box:
            accepted = "'return': ['scores'] (the pre-squash mean; a Box policy has no probabilities)"
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _reject(422, m.R_BAD_OPTION, f"'return' is {shown(value)}", accepted)
        unknown = [v for v in value if v not in RETURN_OPTIONS]
        if unknown:
            raise _reject(422, m.R_BAD_OPTION, f"'return' asks for unknown {shown(unknown)}", accepted)
        if box and "probabilities" in value:
            raise _reject(
                422,
                m.R_BAD_OPTION,
                "'return' asks for 'probabilities', which a policy with a Box action space does not have",
                accepted,
            )
        return tuple(value)

    @staticmethod
    def _id(value: Any, name: str, allow_int: bool = False) -> str:
        accepted = f"'{name}': a string of 1 to {MAX_ID_LENGTH} characters" + (
            " or an integer" if allow_int else ""
        )
        if allow_int and type(value) is int:
            return str(value)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LENGTH:
            what = shown(value) if not isinstance(value, str) else f"a string of {len(value)} characters"
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' is {what}", accepted)
        if not writable_utf8(value):
            raise _reject(422, m.R_BAD_OPTION, f"'{name}' holds a lone surrogate (\\ud800-\\udfff)", accepted)
        return value

    @staticmethod
    def _step(value: Any, name: str) -> int:
        if type(value) is not int or not 0 <= value <= MAX_STEP:
            raise _reject(
                422, m.R_BAD_OPTION, f"'{name}' is {shown(value)}", f"'{name}': an integer in [0, 2^63 - 1]"
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
