"""The continuous-learning loop, one iteration at a time: logs → join → train → gate → canary → decision.

``run_once`` does at most one iteration:

1. **new data**: complete decision files under ``<logs>/decisions`` that no earlier iteration consumed
   and that are older than ``reward_wait`` (rewards arrive after their decisions). They are joined with
   every reward so far; with fewer than ``min_new_transitions`` rewarded transitions nothing happens and
   the files wait for the next run.
2. **join**: the training data is the join of every decision file consumed so far plus the new ones
   (or the last ``max_decision_files`` of them), as one dataset.
3. **train**: the offline algorithm and settings of the config, in the implementation for the joined
   data's action space (Discrete or Box: the served policy's); its checkpoints make a crashed run resume.
4. **gate**: the candidate and the champion are valued off-policy on that data
   (:mod:`rlops_delivery.opegate`); a candidate the gate rejects ends the iteration unpublished.
5. **publish**: into the registry, with the evaluation and the gate decision in its model card.
6. **canary**: TorchServe is restarted with champion and candidate if it does not serve the candidate,
   then :class:`rlops_delivery.rollout.Rollout` promotes or rolls it back. Without a canary (Kubernetes,
   where Argo Rollouts runs it) the iteration ends here, ``handed_off`` with the candidate alias set.

Every iteration is a folder (data, training run, policy, gate result) and an entry in the state file,
which says which stage it reached: a run that died resumes at the stage it was in. Files are marked
consumed only when their iteration ends, whatever its outcome, so each file trains one iteration's
candidate first (later iterations train on it again as part of the window).

What happened is recorded where it belongs: the model card's lineage says how the candidate was trained
(its ``trained`` event carries the iteration, the decision files and transition counts) and gated;
promotion, rollback and their evidence go to the registry's history and rollout records.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rlops_contracts.artifact import seal
from rlops_contracts.card import CardError, read_card
from rlops_contracts.durable import replace_atomic
from rlops_server.decision_log import DECISIONS_STREAM, complete_files
from rlops_trainer.algos import implementation
from rlops_trainer.card import utc_now
from rlops_trainer.export import ExportError, write_policy_dir
from rlops_trainer.hyperparams import apply_overrides
from rlops_trainer.registry import Registry, RegistryError
from rlops_trainer.training import RunOptions

from rlops_delivery import opegate
from rlops_delivery.config import LoopConfig, LoopError, text_value

STATE_FILE = "state.json"
ITERATIONS_DIR = "iterations"

# Stages of an iteration, in order; an iteration's ``stage`` is the last one it completed.
JOINED, TRAINED, GATED, PUBLISHED, DONE = "joined", "trained", "gated", "published", "done"

# Outcomes of a finished iteration.
PROMOTED, ROLLED_BACK, REJECTED_BY_GATE, REJECTED_BY_OPE = (
    "promoted",
    "rolled_back",
    "rejected_by_gate",
    "rejected",
)


# --- config ----------------------------------------------------------------------------------------------


# --- state -----------------------------------------------------------------------------------------------


@dataclass
class LoopState:
    policy: str
    consumed: list[str] = field(default_factory=list)
    """Decision files (absolute paths) that trained a finished iteration, in the order consumed."""
    iterations: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path, policy: str) -> LoopState:
        if not path.is_file():
            return cls(policy)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            state = cls(**data)
        except (ValueError, TypeError) as e:
            raise LoopError(f"{path}: not a loop state file ({e}); move it away to start afresh") from None
        if state.policy != policy:
            raise LoopError(f"{path}: holds the loop of {state.policy!r}, not {policy!r}")
        return state

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomic(path, json.dumps(asdict(self), indent=2) + "\n")

    @property
    def current(self) -> dict[str, Any] | None:
        """The unfinished iteration, if a run died in one."""
        if self.iterations and self.iterations[-1]["stage"] != DONE:
            return self.iterations[-1]
        return None


# --- the iteration ----------------------------------------------------------------------------------------


@dataclass
class Paths:
    logs: Path
    registry: Path
    state_dir: Path
    serve_run_dir: Path


Canary = Callable[[int], dict[str, Any]]
"""Run the canary of a published version; returns the rollout record as JSON."""

HANDED_OFF = "handed_off"
"""Outcome of an iteration whose canary is left to the platform (Argo Rollouts on Kubernetes)."""


class Loop:
    def __init__(
        self,
        config: LoopConfig,
        paths: Paths,
        *,
        canary: Canary | None,
        load_candidate: Callable[[int], str],
        report: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.paths = paths
        self.canary = canary
        self.load_candidate = load_candidate
        self.report = report
        self.clock = clock
        self.dir = Path(paths.state_dir) / config.policy
        self.state_path = self.dir / STATE_FILE
        self.state = LoopState.read(self.state_path, config.policy)

    def _save(self) -> None:
        self.state.write(self.state_path)

    def new_files(self) -> list[Path]:
        """Complete, unconsumed decision files old enough for their rewards to have come back."""
        root = Path(self.paths.logs) / DECISIONS_STREAM
        if not root.is_dir():
            return []
        consumed = set(self.state.consumed)
        cutoff = self.clock() - self.config.reward_wait_s
        return [
            p.resolve()
            for p in complete_files(root)
            if str(p.resolve()) not in consumed and p.stat().st_mtime <= cutoff
        ]

    def run_once(self) -> dict[str, Any]:
        """At most one iteration (resuming one that a crash interrupted); returns its entry, or a
        ``{"outcome": "waiting", ...}`` note when there is not enough new data."""
        it = self.state.current
        if it is None:
            it = self._start()
            if "stage" not in it:
                return it
        else:
            self.report(f"resuming iteration {it['id']} after stage {it['stage']}")
        work = self.dir / ITERATIONS_DIR / it["id"]
        if it["stage"] == JOINED:
            self._train(it, work)
        if it["stage"] == TRAINED:
            self._gate(it, work)
        if it["stage"] == GATED:
            self._publish(it, work)
        if it["stage"] == PUBLISHED:
            self._canary(it)
        return it

    def _start(self) -> dict[str, Any]:
        """A new iteration joined and recorded, or a note saying why there is none."""
        new = self.new_files()
        if not new:
            waiting: dict[str, Any] = {
                "outcome": "waiting",
                "reason": "no new complete decision files old enough for rewards",
            }
            self.report(waiting["reason"])
            return waiting
        iteration_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        work = self.dir / ITERATIONS_DIR / iteration_id
        work.mkdir(parents=True, exist_ok=True)
        # The new files alone say how much new experience there is.
        try:
            fresh = opegate.join_logs(
                self.paths.logs, self.config.policy, self.paths.registry, work / "new.parquet", new
            )
        except opegate.OPEGateError as e:
            work.rmdir()
            waiting = {
                "outcome": "waiting",
                "reason": f"{len(new)} new decision files, nothing to train on: {e}",
            }
            self.report(str(waiting["reason"]))
            return waiting
        (work / "new.parquet").unlink(missing_ok=True)
        if fresh.transitions < self.config.min_new_transitions:
            waiting = {
                "outcome": "waiting",
                "reason": f"{fresh.transitions} new transitions in {len(new)} decision files; "
                f"{self.config.min_new_transitions} are needed to retrain",
                "new_files": len(new),
                "new_transitions": fresh.transitions,
            }
            work.rmdir()
            self.report(str(waiting["reason"]))
            return waiting
        window = [*self.state.consumed, *map(str, new)]
        if self.config.max_decision_files:
            window = window[-self.config.max_decision_files :]
        stats = opegate.join_logs(
            self.paths.logs,
            self.config.policy,
            self.paths.registry,
            work / "data.parquet",
            [Path(p) for p in window],
        )
        it: dict[str, Any] = {
            "id": iteration_id,
            "stage": JOINED,
            "started_at": utc_now(),
            "new_files": [str(p) for p in new],
            "new_transitions": fresh.transitions,
            "training_files": len(window),
            "transitions": stats.transitions,
            "episodes": stats.episodes,
            "served_versions": stats.versions,
        }
        self.state.iterations.append(it)
        self._save()
        self.report(
            f"iteration {iteration_id}: {fresh.transitions} new transitions in {len(new)} decision files; "
            f"training on {stats.transitions} transitions from {len(window)} files"
        )
        return it

    def _train(self, it: dict[str, Any], work: Path) -> None:
        data = opegate.load_dataset(work / "data.parquet")
        kind = "Box" if data.meta.is_continuous else "Discrete"
        try:
            config_cls, train_fn = implementation(self.config.algorithm, data.meta.is_continuous)
            cfg = apply_overrides(
                config_cls(), [f"{k}={text_value(v)}" for k, v in self.config.train.items()]
            )
        except ValueError as e:
            raise LoopError(
                f"the joined logs of {self.config.policy} have {kind} actions: {e}".replace("--set ", "")
                + "; change algorithm or train in the loop config"
            ) from None
        self.report(f"training {self.config.algorithm} ({kind} actions) for {cfg.steps} steps")
        result = train_fn(cfg, data, RunOptions(out_dir=work / "run", resume=True, progress=False))
        try:
            policy_dir = write_policy_dir(result, data, work / "policy", self.config.policy)
            card = read_card(policy_dir)
            card["lineage"][0]["loop"] = {
                "iteration": it["id"],
                "decision_files": it["training_files"],
                "new_decision_files": len(it["new_files"]),
                "new_transitions": it["new_transitions"],
                "transitions": it["transitions"],
                "served_versions": it["served_versions"],
                "logs": str(Path(self.paths.logs).resolve()),
            }
            seal(policy_dir, card, replace=True)
        except (ExportError, CardError) as e:
            raise LoopError(f"exporting the trained policy failed: {e}") from None
        it.update(
            stage=TRAINED,
            algorithm=self.config.algorithm,
            action_space=kind,
            steps=result.steps,
            fingerprint=result.dataset_fingerprint,
        )
        self._save()

    def _gate(self, it: dict[str, Any], work: Path) -> None:
        self.report("OPE gate: the candidate against the champion on the joined served logs")
        data = opegate.load_dataset(work / "data.parquet")
        result = opegate.gate(
            self.paths.registry, self.config.policy, work / "policy", data, self.config.gate
        )
        (work / "gate.json").write_text(
            json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8"
        )
        it.update(stage=GATED, gate={"promote": result["promote"], "reason": result["reason"]})
        self.report(f"gate: {result['reason']}")
        if not result["promote"]:
            self._finish(it, REJECTED_BY_GATE, result["reason"])
            return
        self._save()

    def _publish(self, it: dict[str, Any], work: Path) -> None:
        reg = Registry(self.paths.registry)
        version = self._published_version(reg, it["id"])
        if version is None:
            result = json.loads((work / "gate.json").read_text(encoding="utf-8"))
            evaluation = {k: result[k] for k in ("estimates", "behavior", "data", "settings")}
            evaluation["source"] = f"rlops loop iteration {it['id']}: OPE on the joined served logs"
            try:
                version = reg.publish(work / "policy", self.config.policy, evaluation, result["gate"])
            except RegistryError as e:
                raise LoopError(f"publishing the candidate failed: {e}") from None
        it.update(stage=PUBLISHED, version=version)
        self._save()
        self.report(f"published {self.config.policy} version {version} (the candidate)")

    def _published_version(self, reg: Registry, iteration: str) -> int | None:
        """The version an earlier, interrupted run of this iteration published, if any."""
        if self.config.policy not in reg.names():
            return None
        for v in reversed(reg.versions(self.config.policy)):
            lineage = reg.card(self.config.policy, v)["lineage"]
            if any(
                e.get("event") == "trained" and (e.get("loop") or {}).get("iteration") == iteration
                for e in lineage
            ):
                return v
        return None

    def _canary(self, it: dict[str, Any]) -> None:
        version = int(it["version"])
        if self.canary is None:
            # On Kubernetes the canary belongs to Argo Rollouts: the iteration ends with the candidate alias.
            self._finish(
                it,
                HANDED_OFF,
                f"version {version} is the registry's candidate; its canary is left to the platform",
            )
            return
        self.report(self.load_candidate(version))
        record = self.canary(version)
        it["rollout"] = {k: record.get(k) for k in ("id", "state", "traffic")} | {
            "reason": (record.get("decision") or {}).get("reason")
        }
        outcome = {"promoted": PROMOTED, "rolled_back": ROLLED_BACK, "rejected": REJECTED_BY_OPE}.get(
            record["state"], record["state"]
        )
        self._finish(it, str(outcome), str(it["rollout"]["reason"] or record["state"]))

    def _finish(self, it: dict[str, Any], outcome: str, reason: str) -> None:
        it.update(stage=DONE, outcome=outcome, reason=reason, finished_at=utc_now())
        self.state.consumed.extend(p for p in it["new_files"] if p not in self.state.consumed)
        self._save()
        self.report(f"iteration {it['id']}: {outcome}: {reason}")
