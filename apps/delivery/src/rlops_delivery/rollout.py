"""A local canary rollout: move a share of the traffic to the candidate, judge it, promote or roll back.

The steps are shares of the traffic (10 %, 50 %, 100 % by default). In each step below 100 % the
candidate answers that share (:mod:`rlops_delivery.split`) and every check of the analysis
(:mod:`rlops_delivery.analysis`) is measured against Prometheus every ``interval``:

- a check that fails more than ``failure_limit`` times in the rollout rolls it back at once;
- a step passes once it has lasted ``step_min_s`` and the latest measurement passed every check;
- a step that has not passed after ``step_timeout_s`` rolls back: a check that never had enough samples
  is inconclusive, and no traffic is not success;
- Prometheus unreachable (or a query refused) more than ``error_limit`` times in a row rolls back.

When the steps below 100 % have passed the candidate is promoted: TorchServe's default version becomes the
candidate, then the registry's champion alias moves to it (through the registry's gate, or forced with
the reason given at the start). A step of 100 % then keeps measuring the same checks against the previous
champion's recent behaviour; if it fails, ``rlops_stack.actions.rollback`` puts the previous champion
back, in the registry and in TorchServe.

A rollback before promotion sends all traffic back to the champion and points the registry's
``candidate`` alias back at the champion, so that a restarted server does not load the failed version
again. Every decision is recorded with its evidence (:mod:`rlops_delivery.records`).

The checks measured are the analysis file's, as they apply to the two versions' action space
(:func:`rlops_delivery.analysis.for_policies`): for Box policies a check that compares discrete action
distributions is skipped, with its reason in the record's settings, and its per-dimension counterpart over
the binned actions is measured instead.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rlops_contracts import CANDIDATE, CHAMPION
from rlops_contracts.metrics import ACTIONS, INFERENCE_LATENCY
from rlops_server import serving
from rlops_server.backend import ServeError, ServingBackend
from rlops_stack import actions
from rlops_stack.prometheus import PrometheusError
from rlops_trainer.card import utc_now
from rlops_trainer.registry import Registry, RegistryError

from rlops_delivery import records
from rlops_delivery.analysis import (
    FAIL,
    PASS,
    Analysis,
    AnalysisError,
    Measurement,
    QueryFn,
    for_policies,
    scalar,
)
from rlops_delivery.config import DEFAULT_STEPS
from rlops_delivery.records import RolloutRecord
from rlops_delivery.split import Split, write_split

PASSED = "passed"
FAILED = "failed"
INCONCLUSIVE = "inconclusive"
ERROR = "error"


class RolloutError(RuntimeError):
    """The rollout cannot start or could not finish an action; the message says why and what to do."""


@dataclass(frozen=True)
class RolloutSettings:
    steps: tuple[float, ...] = DEFAULT_STEPS
    """Shares of the traffic the candidate answers, one per step (1.0: after promotion)."""
    interval_s: float = 15.0
    """Seconds between two measurements of every check."""
    step_min_s: float = 60.0
    """A step lasts at least this long, even when every check passes sooner."""
    step_timeout_s: float = 600.0
    """A step that has not passed after this long rolls back (not enough traffic to judge)."""
    failure_limit: int = 1
    """Failed measurements of one check allowed in the rollout; one more rolls it back."""
    error_limit: int = 4
    """Measurement rounds in a row that could not reach Prometheus (or whose query it refused)."""

    def __post_init__(self) -> None:
        if not self.steps or any(not (0 < s <= 1) for s in self.steps):
            raise ValueError(f"steps must be shares in (0, 1], got {self.steps}")
        if any(b <= a for a, b in itertools.pairwise(self.steps)):
            raise ValueError(f"steps must increase, got {self.steps}")
        if not (self.interval_s > 0 and math.isfinite(self.interval_s)):
            raise ValueError(f"interval must be a positive number of seconds, got {self.interval_s}")
        if self.step_min_s < 0:
            raise ValueError(f"the minimum step duration must not be negative, got {self.step_min_s}")
        if self.step_timeout_s < max(self.step_min_s, self.interval_s):
            raise ValueError(
                f"the step timeout ({self.step_timeout_s:g} s) must be at least the minimum step duration "
                f"({self.step_min_s:g} s) and the interval ({self.interval_s:g} s)"
            )
        if self.failure_limit < 0 or self.error_limit < 0:
            raise ValueError("failure and error limits must not be negative")

    @classmethod
    def from_analysis(cls, analysis: Analysis, **overrides: Any) -> RolloutSettings:
        """Interval and failure limit from the analysis file, unless overridden."""
        values: dict[str, Any] = {"interval_s": analysis.interval_s, "failure_limit": analysis.failure_limit}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class ServingControl(Protocol):
    """What a rollout needs from serving (the local server: :class:`LocalServing`)."""

    run_dir: Path | None
    """The local server's run directory, handed to ``rlops_stack.actions.rollback``; None: none."""

    def check(self, policy: str, champion: int, candidate: int) -> None:
        """Raise RolloutError unless both versions are served and the champion is the default."""

    def publish_split(self, split: Split | None) -> None: ...

    def make_default(self, policy: str, version: int) -> None: ...

    def record_aliases(self, policy: str, aliases: dict[str, int]) -> None: ...


class LocalServing:
    """The local server started by ``rlops serve start`` from ``run_dir``, through the serving backend."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir: Path | None = Path(run_dir).resolve()

    def _backend(self) -> ServingBackend:
        if self.run_dir is None:
            raise RolloutError("no local server to act on")
        try:
            return serving.connect(self.run_dir)
        except ServeError as e:
            raise RolloutError(str(e)) from None

    def check(self, policy: str, champion: int, candidate: int) -> None:
        try:
            described = self._backend().describe()
        except ServeError as e:
            raise RolloutError(str(e)) from None
        served = described.of(policy)
        for role, version in ((CHAMPION, champion), (CANDIDATE, candidate)):
            entry = served.get(str(version))
            if entry is None:
                raise RolloutError(
                    f"the server from {self.run_dir} does not serve {policy} version {version} (the {role}); "
                    f"it serves {', '.join(sorted(served)) or 'nothing'}. Load it with --restart-serving, or "
                    f"point the registry's candidate alias at it and restart: rlops serve stop --run-dir "
                    f"{self.run_dir} && rlops serve start --name {policy} --run-dir {self.run_dir}"
                )
            if entry.ready_workers == 0:
                raise RolloutError(f"{policy} version {version} (the {role}) has no ready worker")
        default = described.default_version(policy)
        if default != str(champion):
            raise RolloutError(
                f"the server answers {policy} with version {default}, but the registry's champion is "
                f"{champion}; bring them in line first (rlops rollback, or restart serving)"
            )

    def publish_split(self, split: Split | None) -> None:
        if self.run_dir is None:
            raise RolloutError("no local server to publish the traffic split to")
        write_split(self.run_dir, split)

    def make_default(self, policy: str, version: int) -> None:
        try:
            self._backend().set_default(policy, str(version))
        except ServeError as e:
            raise RolloutError(str(e)) from None

    def record_aliases(self, policy: str, aliases: dict[str, int]) -> None:
        self._backend().record_aliases(policy, aliases)


RollbackFn = Callable[..., actions.ActionResult]


class Rollout:
    """One canary of ``candidate`` against the registry's champion; :meth:`run` does it all."""

    def __init__(
        self,
        registry: Path,
        policy: str,
        candidate: int | str,
        *,
        analysis: Analysis,
        settings: RolloutSettings,
        query: QueryFn,
        serving: ServingControl,
        force_reason: str | None = None,
        ope: Callable[[], dict[str, Any]] | None = None,
        report: Callable[[str], None] = lambda line: None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rollback: RollbackFn = actions.rollback,
        who: str | None = None,
    ) -> None:
        self.registry = Registry(registry)
        self.policy = policy
        self.analysis = analysis
        self.settings = settings
        self.query = query
        self.serving = serving
        self.force_reason = force_reason.strip() if force_reason and force_reason.strip() else None
        self.ope = ope
        self.report = report
        self.clock = clock
        self.sleep = sleep
        self.rollback_fn = rollback
        self.who = who
        try:
            aliases = self.registry.aliases(policy)
            if CHAMPION not in aliases:
                raise RolloutError(
                    f"policy {policy!r} has no champion to compare the candidate with; promote one first "
                    "(rlops registry promote)"
                )
            self.champion = aliases[CHAMPION]
            self.candidate = self.registry.resolve_version(policy, candidate)
        except RegistryError as e:
            raise RolloutError(str(e)) from None
        if self.candidate == self.champion:
            raise RolloutError(f"version {self.candidate} of {policy} is already the champion")
        self.gate_problem = self.registry.gate_problem(policy, self.candidate)
        if self.gate_problem and not self.force_reason:
            raise RolloutError(
                f"the registry's gate does not allow promoting {policy} version {self.candidate}: "
                f"{self.gate_problem}; to canary it anyway give a reason (--force-reason), which is recorded"
            )
        try:
            self.checks, self.skipped = for_policies(
                analysis,
                self.registry.card(policy, self.candidate),
                self.registry.card(policy, self.champion),
            )
        except (AnalysisError, RegistryError) as e:
            raise RolloutError(f"cannot canary {policy} version {self.candidate}: {e}") from None
        self.args = {"policy": policy, "candidate": str(self.candidate), "champion": str(self.champion)}
        self.failures: Counter[str] = Counter()
        self.promoted = False
        self.record: RolloutRecord | None = None
        self._started = 0.0

    # --- the whole rollout ---------------------------------------------------------------------------

    def run(self) -> RolloutRecord:
        """Check, canary, decide; returns the final record (also written to the registry)."""
        self.serving.check(self.policy, self.champion, self.candidate)
        with records.locked(self.registry.root, self.policy):
            record = RolloutRecord(
                id=records.new_id(self.candidate),
                policy=self.policy,
                champion=self.champion,
                candidate=self.candidate,
                state=records.RUNNING,
                started_at=utc_now(),
                settings={
                    **asdict(self.settings),
                    "analysis": self.analysis.source,
                    "checks": [c.name for c in self.checks],
                    "skipped_checks": self.skipped,
                },
                forced=self.force_reason if self.gate_problem else None,
            )
            self.record = record
            self._started = self.clock()
            self._save()
            try:
                if self.ope is not None and not self._ope_passes():
                    return record
                for share in self.settings.steps:
                    if share >= 1.0:
                        self._promote()
                    outcome, reason = self._step(share)
                    if outcome != PASSED:
                        if self.promoted:
                            self._undo_promotion(reason)
                        else:
                            self._roll_back(reason)
                        return record
                if not self.promoted:
                    self._promote()
                self._finish(records.PROMOTED, f"every check passed at {self._shares()}", PASS)
                return record
            except BaseException as e:
                if record.state == records.RUNNING:
                    self._interrupted(e)
                raise

    def _shares(self) -> str:
        return ", ".join(f"{100 * s:g} %" for s in self.settings.steps)

    def _save(self) -> None:
        assert self.record is not None
        records.write(self.registry.root, self.record)

    def _ope_passes(self) -> bool:
        assert self.ope is not None
        assert self.record is not None
        self.report("OPE gate on served logs, before any traffic moves")
        result = self.ope()
        self.record.ope = result
        if result.get("promote"):
            self.report(f"OPE gate passed: {result.get('reason')}")
            self._save()
            return True
        self.report(f"OPE gate failed: {result.get('reason')}")
        self._finish(records.REJECTED, f"the OPE gate on served logs said no: {result.get('reason')}", FAIL)
        return False

    # --- one step ----------------------------------------------------------------------------------

    def _measure_all(self) -> list[Measurement]:
        at = self.clock()
        return [c.measure(self.args, self.query, at) for c in self.checks]

    def _step(self, share: float) -> tuple[str, str]:
        """Run one step; (outcome, reason)."""
        assert self.record is not None
        if share < 1.0:
            self.serving.publish_split(
                Split(self.policy, self.champion, self.candidate, share, rollout=self.record.id)
            )
        step: dict[str, Any] = {"share": share, "started_at": utc_now(), "measurements": [], "outcome": None}
        self.record.steps.append(step)
        self._save()
        self.report(
            f"step {len(self.record.steps)}: version {self.candidate} answers {100 * share:g} % "
            "of the traffic"
        )
        start = self.clock()
        errors = 0
        while True:
            self.sleep(self.settings.interval_s)
            elapsed = self.clock() - start
            try:
                round_ = self._measure_all()
            except (PrometheusError, AnalysisError) as e:
                errors += 1
                step["measurements"].append({"at": self.clock(), "error": str(e)})
                self._save()
                self.report(f"  measurement failed ({errors} in a row): {e}")
                if errors > self.settings.error_limit:
                    return self._end_step(step, ERROR, f"{errors} measurements in a row failed: {e}")
                continue
            errors = 0
            step["measurements"].append({"at": round_[0].at, "checks": [m.to_dict() for m in round_]})
            for m in round_:
                if m.verdict == FAIL:
                    self.failures[m.check] += 1
            self.report("  " + "; ".join(f"{m.check} {m.verdict} ({m.detail})" for m in round_))
            over = [c for c, n in self.failures.items() if n > self.settings.failure_limit]
            if over:
                details = "; ".join(f"{m.check}: {m.detail}" for m in round_ if m.check in over)
                return self._end_step(
                    step,
                    FAILED,
                    f"{', '.join(over)} failed more than {self.settings.failure_limit} time(s) ({details})",
                    failed=over,
                )
            if all(m.verdict == PASS for m in round_) and elapsed >= self.settings.step_min_s:
                return self._end_step(step, PASSED, "every check passed")
            if elapsed >= self.settings.step_timeout_s:
                pending = [f"{m.check}: {m.detail}" for m in round_ if m.verdict != PASS]
                return self._end_step(
                    step,
                    INCONCLUSIVE,
                    f"no verdict after {elapsed:.0f} s at {100 * share:g} % ({'; '.join(pending)}): "
                    "not enough traffic to judge the candidate",
                )

    def _end_step(
        self, step: dict[str, Any], outcome: str, reason: str, failed: list[str] | None = None
    ) -> tuple[str, str]:
        step.update(outcome=outcome, reason=reason, ended_at=utc_now())
        if failed:
            step["failed_checks"] = failed
        self._save()
        self.report(f"  step {outcome}: {reason}")
        return outcome, reason

    # --- decisions ---------------------------------------------------------------------------------

    def _last_measurements(self) -> list[dict[str, Any]]:
        assert self.record is not None
        for step in reversed(self.record.steps):
            for m in reversed(step.get("measurements", [])):
                if "checks" in m:
                    return list(m["checks"])
        return []

    def _traffic(self) -> dict[str, Any]:
        """Requests and decisions per version since the rollout started, as Prometheus counts them."""
        window = max(1, math.ceil(self.clock() - self._started + self.settings.interval_s))
        out: dict[str, Any] = {"window_s": window}
        for role, version in (("candidate", self.candidate), ("champion", self.champion)):
            labels = f'policy="{self.policy}",version="{version}"'
            for what, metric in (("requests", f"{INFERENCE_LATENCY}_count"), ("decisions", ACTIONS)):
                expr = f"sum(increase({metric}{{{labels}}}[{window}s])) or vector(0)"
                try:
                    value = scalar(self.query(expr), expr)
                except (PrometheusError, AnalysisError) as e:
                    out.setdefault("errors", []).append(str(e))
                    value = None
                out[f"{role}_{what}"] = value
        c, h = out.get("candidate_requests"), out.get("champion_requests")
        out["candidate_share"] = c / (c + h) if c is not None and h is not None and c + h > 0 else None
        return out

    def _finish(self, state: str, reason: str, outcome: str, **extra: Any) -> None:
        assert self.record is not None
        self.record.state = state
        self.record.finished_at = utc_now()
        self.record.traffic = self._traffic()
        self.record.decision = {
            "outcome": state,
            "verdict": outcome,
            "reason": reason,
            "at": utc_now(),
            "failed_checks": sorted(c for c, n in self.failures.items() if n > self.settings.failure_limit),
            "failures": dict(self.failures),
            "evidence": self._last_measurements(),
            **extra,
        }
        self._save()
        share = self.record.traffic.get("candidate_share")
        answered = "" if share is None else f" (it answered {100 * share:.1f} % of the requests)"
        self.report(f"{state}: {reason}{answered}")

    def _promote(self) -> None:
        """TorchServe first, then the registry: a registry that says champion always has it served."""
        assert self.record is not None
        reason = f"rollout {self.record.id}: canary passed at {self._shares()}"
        if self.gate_problem and self.force_reason:
            reason += f"; forced past the gate ({self.gate_problem}): {self.force_reason}"
        self.serving.make_default(self.policy, self.candidate)
        self.serving.publish_split(None)
        try:
            self.registry.promote(
                self.policy,
                self.candidate,
                require_gate=self.gate_problem is None,
                force_reason=reason,
                who=self.who,
            )
        except RegistryError as e:
            self.serving.make_default(self.policy, self.champion)
            raise RolloutError(f"promoting version {self.candidate} in the registry failed: {e}") from None
        self.promoted = True
        self.serving.record_aliases(self.policy, self.registry.aliases(self.policy))
        self.record.steps.append({"promoted_at": utc_now(), "reason": reason})
        self._save()
        self.report(f"promoted {self.policy} version {self.candidate}: TorchServe's default and the champion")

    def _roll_back(self, reason: str) -> None:
        """Before promotion: all traffic back to the champion, the candidate alias back at it."""
        assert self.record is not None
        self.serving.publish_split(None)
        actions_taken = ["traffic back to the champion"]
        text = f"rollout {self.record.id} rolled back version {self.candidate}: {reason}"
        if self.registry.aliases(self.policy).get(CANDIDATE) == self.candidate:
            self.registry.set_alias(self.policy, CANDIDATE, self.champion, reason=text, who=self.who)
            actions_taken.append(f"candidate alias back to version {self.champion}")
        self._finish(records.ROLLED_BACK, reason, FAIL, actions=actions_taken)

    def _undo_promotion(self, reason: str) -> None:
        """After promotion: the stack's rollback puts the previous champion back everywhere."""
        assert self.record is not None
        result = self.rollback_fn(
            self.registry.root,
            self.policy,
            reason=f"rollout {self.record.id}: {reason}",
            from_version=self.candidate,
            serve_run_dir=self.serving.run_dir,
            who=self.who,
        )
        self._finish(records.ROLLED_BACK, reason, FAIL, actions=[result.to_json()])
        if result.outcome == actions.FAILED:
            raise RolloutError(
                f"rolling back the promotion of version {self.candidate} failed: {result.message}"
            )

    def _interrupted(self, error: BaseException) -> None:
        what = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if self.promoted:
            reason = (
                f"interrupted after promotion ({what}); version {self.candidate} stays champion: "
                f"rlops rollback {self.policy} puts version {self.champion} back"
            )
        else:
            self.serving.publish_split(None)
            reason = f"interrupted ({what}); traffic went back to the champion"
        self._finish(records.ABORTED, reason, FAIL)
