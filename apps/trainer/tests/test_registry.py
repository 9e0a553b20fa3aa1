"""Registry: versions, aliases, the promotion rules, rollback, concurrency and crash safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import sha256_file
from rlops_contracts.registry import resolve_policy_ref
from rlops_trainer import registry as registry_module
from rlops_trainer.commands import registry as command
from rlops_trainer.gate import decide
from rlops_trainer.ope import Estimate
from rlops_trainer.registry import Registry, RegistryError
from test_export import make_policy_dir
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three exported policy directories (different weights)."""
    root = tmp_path_factory.mktemp("sources")
    return [make_policy_dir(root, seed=s) for s in range(3)]


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def gate(
    promote: bool, incumbent: int | None, reason: str = "lower bound beats the incumbent"
) -> dict[str, Any]:
    return {"promote": promote, "incumbent_version": incumbent, "reason": reason, "margin": 5.0}


def test_publish_creates_immutable_versions_and_moves_candidate(reg: Registry, sources: list[Path]) -> None:
    before = {p.name: p.read_bytes() for p in sources[0].iterdir()}
    assert reg.publish(sources[0], "toy") == 1
    assert reg.publish(sources[1], "toy") == 2
    assert reg.versions("toy") == [1, 2]
    assert reg.aliases("toy") == {"candidate": 2}
    assert reg.resolve("toy", "candidate") == reg.root / "toy" / "2"
    assert reg.resolve("toy", 1) == reg.root / "toy" / "1"
    card = reg.card("toy", "candidate")
    assert card["name"] == "toy"
    assert card["version"] == 2
    assert card["evaluation"] is None
    assert [e["event"] for e in card["lineage"]] == ["trained", "published"]
    assert card["files"] == {POLICY_FILE: sha256_file(sources[1] / POLICY_FILE)}
    module, loaded_card = reg.load("toy", "2")
    assert loaded_card == card
    assert module(torch.zeros(2, 4)).shape == (2, 3)
    assert oct((reg.resolve("toy", 1) / POLICY_FILE).stat().st_mode & 0o777) == "0o444"
    assert {p.name: p.read_bytes() for p in sources[0].iterdir()} == before  # the source is untouched
    history = reg.history("toy")
    assert [(h["action"], h["alias"], h["from"], h["to"]) for h in history] == [
        ("publish", "candidate", None, 1),
        ("publish", "candidate", 1, 2),
    ]
    assert all(h["who"] and h["at"].endswith("Z") for h in history)


def test_publish_records_evaluation_and_gate(reg: Registry, sources: list[Path]) -> None:
    evaluation = {"estimates": [{"estimator": "fqe", "value": 180.0, "lower": 170.0, "upper": 190.0}]}
    v = reg.publish(sources[0], "toy", evaluation=evaluation, gate=gate(True, None))
    card = reg.card("toy", v)
    assert card["evaluation"] == evaluation
    assert card["gate"] == gate(True, None)
    assert [e["event"] for e in card["lineage"]] == ["trained", "gate", "published"]
    assert card["lineage"][1]["promote"] is True


def test_publish_takes_decisions_of_the_gate(reg: Registry, sources: list[Path]) -> None:
    def estimate(value: float, half_width: float) -> Estimate:
        return Estimate("dr", value, value - half_width, value + half_width, 0.95, n_episodes=100)

    vs_behavior = decide(estimate(200.0, 10.0), None, estimate(100.0, 1.0), margin=5.0).to_dict()
    v1 = reg.publish(sources[0], "toy", gate=vs_behavior)
    assert reg.card("toy", v1)["gate"]["incumbent_version"] is None
    assert reg.card("toy", v1)["gate"]["reason"].startswith("promoted: DR lower bound 190")
    reg.promote("toy", v1)
    vs_champion = decide(
        estimate(250.0, 10.0), estimate(200.0, 10.0), estimate(100.0, 1.0), incumbent_label="toy@1"
    )
    v2 = reg.publish(sources[1], "toy", gate=vs_champion.to_dict())
    assert reg.card("toy", v2)["gate"]["incumbent_version"] == 1
    assert reg.promote("toy", v2) == v1
    unresolved = decide(estimate(250.0, 10.0), estimate(200.0, 10.0), estimate(100.0, 1.0)).to_dict()
    with pytest.raises(RegistryError, match=r"'incumbent_version' is missing.*label: 'champion'"):
        reg.publish(sources[2], "toy", gate=unresolved)
    reg.publish(sources[2], "toy", gate=unresolved | {"incumbent_version": 2})


def test_publish_rejects_bad_input(reg: Registry, sources: list[Path], tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="invalid policy name 'a/b'"):
        reg.publish(sources[0], "a/b")
    with pytest.raises(RegistryError, match="'promote' must be true or false"):
        reg.publish(sources[0], "toy", gate={"promote": "yes", "incumbent_version": None})
    with pytest.raises(RegistryError, match="'incumbent_version' is missing"):
        reg.publish(sources[0], "toy", gate={"promote": True})
    with pytest.raises(RegistryError, match="not a policy directory"):
        reg.publish(tmp_path, "toy")
    tampered = make_policy_dir(tmp_path, seed=0)
    with open(tampered / POLICY_FILE, "ab") as f:
        f.write(b"\0")
    with pytest.raises(
        RegistryError, match=r"cannot publish .*policy\.pt: sha256 does not match .*SHA256SUMS \(recorded "
    ):
        reg.publish(tampered, "toy")
    assert reg.list() == []


def test_unknown_names_versions_and_aliases_list_what_exists(reg: Registry, sources: list[Path]) -> None:
    with pytest.raises(RegistryError, match=r"unknown policy 'toy'.*none, the registry is empty"):
        reg.versions("toy")
    reg.publish(sources[0], "toy")
    reg.publish(sources[0], "other")
    with pytest.raises(RegistryError, match=r"unknown policy 'nope'.*known policies: other, toy"):
        reg.resolve("nope", "1")
    for write in (
        lambda: reg.promote("nope", 1),
        lambda: reg.set_alias("nope", "x", 1),
        lambda: reg.rollback("nope", "r"),
    ):
        with pytest.raises(RegistryError, match="unknown policy 'nope'"):
            write()
    assert reg.names() == ["other", "toy"]  # failed writes create nothing
    with pytest.raises(RegistryError, match="'toy' has no version 7; versions: 1"):
        reg.resolve("toy", "7")
    with pytest.raises(
        RegistryError, match="no version or alias 'champion'; aliases: candidate → 1; versions: 1"
    ):
        reg.resolve("toy", "champion")
    summary = reg.list()
    assert [(s.name, s.versions, s.aliases) for s in summary] == [
        ("other", [1], {"candidate": 1}),
        ("toy", [1], {"candidate": 1}),
    ]


def test_promotion_follows_the_gate(reg: Registry, sources: list[Path]) -> None:
    v1 = reg.publish(sources[0], "toy", gate=gate(True, None))
    v2 = reg.publish(sources[1], "toy", gate=gate(True, None))
    v3 = reg.publish(sources[2], "toy", gate=gate(False, 1, "lower bound 120.0 < incumbent 150.0 + margin 5"))
    v4 = reg.publish(sources[2], "toy")
    v5 = reg.publish(sources[2], "toy", gate=gate(True, 1))

    assert reg.promote("toy", v1) is None
    assert reg.aliases("toy")["champion"] == v1
    with pytest.raises(RegistryError, match="already the champion"):
        reg.promote("toy", v1)
    with pytest.raises(
        RegistryError, match="compared it with no champion, but the champion is now version 1"
    ):
        reg.promote("toy", v2)
    with pytest.raises(RegistryError, match=r"gate rejected it: lower bound 120\.0 < incumbent 150\.0"):
        reg.promote("toy", v3)
    with pytest.raises(RegistryError, match="no gate decision"):
        reg.promote("toy", v4)
    assert reg.aliases("toy")["champion"] == v1

    assert reg.promote("toy", "candidate") == v1  # candidate is v5, evaluated against champion v1
    assert reg.aliases("toy")["champion"] == v5

    with pytest.raises(RegistryError, match="past the gate needs a reason"):
        reg.promote("toy", v3, require_gate=False)
    assert (
        reg.promote("toy", v3, require_gate=False, force_reason="incident 42: v5 misbehaves", who="oncall")
        == v5
    )
    last = reg.history("toy")[-1]
    assert last["action"] == "promote"
    assert last["from"] == v5
    assert last["to"] == v3
    assert last["forced"] is True
    assert last["reason"] == "incident 42: v5 misbehaves"
    assert last["who"] == "oncall"
    # Promotions live in the history, never in the published card.
    assert [e["event"] for e in reg.card("toy", v3)["lineage"]] == ["trained", "gate", "published"]


def test_rollback_walks_back_through_champions(reg: Registry, sources: list[Path]) -> None:
    for _ in range(3):
        reg.publish(sources[0], "toy")
    with pytest.raises(RegistryError, match="no champion to roll back"):
        reg.rollback("toy", "bad")
    for v in (1, 2, 3):
        reg.promote("toy", v, require_gate=False, force_reason="bootstrap")
    with pytest.raises(RegistryError, match="needs a reason"):
        reg.rollback("toy", " ")
    assert reg.rollback("toy", "latency alert") == 2
    assert reg.rollback("toy", "still bad") == 1
    with pytest.raises(RegistryError, match="no previous champion to roll back to"):
        reg.rollback("toy", "again")
    reg.promote("toy", 3, require_gate=False, force_reason="fixed upstream")
    assert reg.rollback("toy", "no it was not") == 1
    assert reg.champion_stack("toy") == [1]
    assert [h["action"] for h in reg.history("toy") if h["alias"] == "champion"] == [
        "promote",
        "promote",
        "promote",
        "rollback",
        "rollback",
        "promote",
        "rollback",
    ]


def test_rollback_survives_a_lost_history_line(reg: Registry, sources: list[Path]) -> None:
    for v in (1, 2):
        reg.publish(sources[0], "toy")
        reg.promote("toy", v, require_gate=False, force_reason="bootstrap")
    history = reg.root / "toy" / HISTORY
    lines = history.read_text().splitlines(keepends=True)
    history.write_text("".join(lines[:-1]) + lines[-1][:10])  # the last append was cut short
    assert reg.champion_stack("toy") == [1]  # the torn line is ignored, but the alias did move
    assert reg.aliases("toy")["champion"] == 2
    assert reg.rollback("toy", "crash test") == 1
    assert [h["action"] for h in reg.history("toy")] == ["publish", "promote", "publish", "rollback"]


HISTORY = registry_module.HISTORY_FILE


def test_aliases(reg: Registry, sources: list[Path]) -> None:
    reg.publish(sources[0], "toy")
    reg.publish(sources[1], "toy")
    with pytest.raises(RegistryError, match="'champion' moves only through promote"):
        reg.set_alias("toy", "champion", 1)
    with pytest.raises(RegistryError, match="invalid alias 'Prod!'"):
        reg.set_alias("toy", "Prod!", 1)
    assert reg.set_alias("toy", "staging", 1, reason="soak test") is None
    assert reg.set_alias("toy", "staging", "candidate") == 1
    assert reg.resolve("toy", "staging").name == "2"


def test_corrupt_registry_files_give_clear_errors(reg: Registry, sources: list[Path]) -> None:
    reg.publish(sources[0], "toy")
    aliases = reg.root / "toy" / registry_module.ALIASES_FILE
    aliases.write_text('{"candidate": 1')
    with pytest.raises(RegistryError, match=r"corrupt aliases file .*aliases\.json: not valid JSON"):
        reg.resolve("toy", "candidate")
    with pytest.raises(RegistryError, match="corrupt aliases file"):
        reg.publish(sources[0], "toy")
    assert reg.versions("toy") == [1]  # nothing was written
    aliases.write_text('{"candidate": "1"}')
    with pytest.raises(RegistryError, match="entry 'candidate': '1' is not an alias → version number"):
        reg.aliases("toy")
    aliases.write_text('{"candidate": 9}')
    with pytest.raises(RegistryError, match="candidate points at missing version 9"):
        reg.resolve("toy", "candidate")
    (reg.root / "toy" / HISTORY).write_text('{"alias": "candidate"}\nnot json\n{}\n')
    with pytest.raises(RegistryError, match=r"corrupt history file .*line 2"):
        reg.history("toy")


def test_tampered_version_refuses_to_load(reg: Registry, sources: list[Path]) -> None:
    reg.publish(sources[0], "toy", gate=gate(True, None))
    reg.publish(sources[1], "toy", gate=gate(True, None))
    reg.promote("toy", 1)
    target = reg.resolve("toy", 2) / POLICY_FILE
    target.chmod(0o644)
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(
        RegistryError,
        match=r"version 2 cannot be loaded: .*policy\.pt: sha256 does not match .*SHA256SUMS \(recorded ",
    ):
        reg.load("toy", "candidate")
    with pytest.raises(RegistryError, match="version 2 cannot be trusted"):
        reg.promote("toy", 2, require_gate=False, force_reason="try")
    reg.load("toy", "champion")  # the intact version still loads


def test_policy_references(reg: Registry, sources: list[Path]) -> None:
    reg.publish(sources[0], "toy")
    assert resolve_policy_ref(str(sources[0]), reg.root) == sources[0]
    assert resolve_policy_ref("toy@candidate", reg.root) == reg.root / "toy" / "1"
    assert resolve_policy_ref("toy@1", reg.root) == reg.root / "toy" / "1"
    with pytest.raises(RegistryError, match="not a directory, nor NAME@VERSION or NAME@ALIAS"):
        resolve_policy_ref("no/such/dir", reg.root)


def test_concurrent_publishes_get_distinct_versions_threads(reg: Registry, sources: list[Path]) -> None:
    results: list[int] = []
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        barrier.wait()
        results.append(reg.publish(sources[i % 3], "toy"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [1, 2, 3, 4, 5, 6]
    assert reg.versions("toy") == [1, 2, 3, 4, 5, 6]
    for v in range(1, 7):
        reg.verify("toy", v)


def _publish_many(root: str, source: str, barrier: Any, out: Any) -> None:
    barrier.wait()
    out.put([Registry(root).publish(Path(source), "toy") for _ in range(3)])


def test_concurrent_publishes_get_distinct_versions_processes(
    reg: Registry, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = registry_module._copy_file

    def slow_copy(src: Path, dst: Path) -> None:
        time.sleep(0.05)  # widen the window in which two writers could pick the same number
        real_copy(src, dst)

    monkeypatch.setattr(registry_module, "_copy_file", slow_copy)
    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_publish_many, args=(str(reg.root), str(sources[i]), barrier, out))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    got = out.get(timeout=60) + out.get(timeout=60)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert len(reg.history("toy")) == 6


CRASHING_PUBLISH = """
import os, sys, time
from pathlib import Path
import rlops_trainer.registry as registry

root, source, marker = sys.argv[1:4]

def half_then_hang(src, dst):
    data = Path(src).read_bytes()
    with open(dst, "xb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    Path(marker).write_text("half written")
    time.sleep(600)

registry._copy_file = half_then_hang
registry.Registry(root).publish(Path(source), "toy")
"""


def test_publish_killed_midway_leaves_no_loadable_version(
    reg: Registry, sources: list[Path], tmp_path: Path
) -> None:
    reg.publish(sources[0], "toy")
    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PUBLISH, str(reg.root), str(sources[1]), str(marker)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the child never reached the middle of its write"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    d = reg.root / "toy"
    stale = [p for p in d.iterdir() if p.name.startswith(registry_module.TMP_PREFIX)]
    assert len(stale) == 1
    assert (stale[0] / POLICY_FILE).stat().st_size < (sources[1] / POLICY_FILE).stat().st_size
    # Readers see only the complete version; the half-written one has no number and no alias.
    assert reg.versions("toy") == [1]
    assert reg.aliases("toy") == {"candidate": 1}
    with pytest.raises(RegistryError, match="has no version 2"):
        reg.load("toy", "2")
    reg.load("toy", "candidate")
    # The next writer gets the next clean number and removes the leftovers.
    assert reg.publish(sources[1], "toy") == 2
    assert not [p for p in d.iterdir() if p.name.startswith(".") and p.name != registry_module.LOCK_FILE]
    _, card = reg.load("toy", "candidate")
    assert card["files"][POLICY_FILE] == sha256_file(sources[1] / POLICY_FILE)


def test_failed_publish_cleans_up(
    reg: Registry, sources: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(src: Path, dst: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry_module, "_copy_file", no_space)
    with pytest.raises(OSError, match="No space left"):
        reg.publish(sources[0], "toy")
    assert sorted(p.name for p in (reg.root / "toy").iterdir()) == [registry_module.LOCK_FILE]
    assert reg.versions("toy") == []


def test_card_on_disk_is_strict_json(reg: Registry, sources: list[Path]) -> None:
    v = reg.publish(
        sources[0], "toy", evaluation={"estimates": [{"value": float("nan")}]}, gate=gate(True, None)
    )
    text = (reg.resolve("toy", v) / MODEL_CARD_FILE).read_text()
    assert json.loads(text)["evaluation"] == {"estimates": [{"value": None}]}


# --- the rlops registry command ---------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setattr(command.console, "width", 200)
    monkeypatch.setenv("RLOPS_REGISTRY", str(tmp_path / "env-registry"))
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(command.app, list(args))

    return invoke


def write_report(path: Path, source: Path, promote: bool, incumbent: int | None) -> Path:
    report = {
        "dataset": "sha256:" + "0" * 64,
        "gamma": 0.99,
        "policies": [
            {"ref": "behavior", "estimates": []},
            {
                "ref": str(source),
                "estimates": [
                    {"estimator": "fqe", "value": 180.0, "lower": 170.5, "upper": 190.0, "confidence": 0.95},
                    {
                        "estimator": "wpdis",
                        "value": 175.0,
                        "lower": 150.0,
                        "upper": 199.0,
                        "confidence": 0.95,
                        "ess": 3.2,
                        "ess_fraction": 0.02,
                        "ess_collapsed": True,
                        "warnings": ["ESS 3.2 of 160 episodes"],
                    },
                ],
                "gate": {
                    "promote": promote,
                    "incumbent_version": incumbent,
                    "reason": "fqe lower bound 170.5 > behaviour 120.0 + margin 5.0",
                },
            },
        ],
    }
    path.write_text(json.dumps(report))
    return path


def test_cli_publish_show_promote_rollback(cli: Any, sources: list[Path], tmp_path: Path) -> None:
    reg = ["--registry", str(tmp_path / "reg")]
    out = cli("list", *reg)
    assert out.exit_code == 0
    assert "has no policies yet" in out.stdout

    report = write_report(tmp_path / "report.json", sources[0], promote=True, incumbent=None)
    out = cli("publish", str(sources[0]), "--name", "toy", "--report", str(report), *reg)
    assert out.exit_code == 0, out.stderr
    assert "published toy version 1" in out.stdout
    assert "gate: promote" in out.stdout
    assert cli("publish", str(sources[1]), "--name", "toy", *reg).exit_code == 0

    out = cli("show", "toy", "1", *reg)
    assert out.exit_code == 0, out.stderr
    for text in (
        "toy version 1",
        "cql",
        "Off-policy evaluation",
        "[170.5, 190] (95%)",
        "ESS collapsed",
        "promote against no champion",
        "trained",
        "published",
        "policy.pt",
        "sha256:",
    ):
        assert text in out.stdout, text
    card = json.loads(cli("show", "toy", "1", "--json", *reg).stdout)
    assert card["evaluation"]["report"]["gamma"] == 0.99
    assert card["evaluation"]["ref"] == str(sources[0])
    assert card["gate"]["promote"] is True

    out = cli("promote", "toy", "2", *reg)
    assert out.exit_code == 2
    assert out.stderr.count("\n") == 1
    assert "cannot promote toy version 2: it has no gate decision" in out.stderr
    out = cli("promote", "toy", "1", *reg)
    assert out.exit_code == 0, out.stderr
    assert "champion is now version 1 (was none)" in out.stdout
    out = cli("promote", "toy", "2", "--force", *reg)
    assert out.exit_code == 2
    assert "--force needs --reason" in out.stderr
    out = cli("promote", "toy", "candidate", "--force", "--reason", "hotfix", *reg)
    assert out.exit_code == 0, out.stderr
    assert "champion is now version 2 (was version 1)" in out.stdout

    out = cli("list", *reg)
    assert "toy" in out.stdout
    assert "1, 2" in out.stdout
    out = cli("show", "toy", *reg)  # the champion by default
    assert "toy version 2  (candidate, champion)" in out.stdout
    assert "promoted" in out.stdout
    assert "forced=yes" in out.stdout

    out = cli("rollback", "toy", "--reason", "error rate", *reg)
    assert out.exit_code == 0, out.stderr
    assert "rolled back from version 2 to version 1" in out.stdout
    out = cli("rollback", "toy", "--reason", "again", *reg)
    assert out.exit_code == 2
    assert "no previous champion" in out.stderr


def test_cli_help(cli: Any) -> None:
    out = cli("--help")
    assert out.exit_code == 0
    for command_name in ("list", "show", "publish", "promote", "rollback"):
        assert command_name in out.stdout
        sub = cli(command_name, "--help")
        assert sub.exit_code == 0
        assert "--registry" in sub.stdout


def test_cli_errors_are_one_line(cli: Any, sources: list[Path], tmp_path: Path) -> None:
    out = cli("show", "nope")
    assert out.exit_code == 2
    assert "unknown policy 'nope'" in out.stderr
    assert str(tmp_path / "env-registry") in out.stderr  # RLOPS_REGISTRY is the default
    assert "Traceback" not in out.stderr + out.stdout
    bad = tmp_path / "bad.json"
    bad.write_text('{"policies": [{"ref": "other"}]}')
    out = cli("publish", str(sources[0]), "--name", "toy", "--report", str(bad))
    assert out.exit_code == 2
    assert "no entry for" in out.stderr
    assert "policies in the report: other" in out.stderr
    bad.write_text("[1, 2]")
    out = cli("publish", str(sources[0]), "--name", "toy", "--report", str(bad))
    assert "expected an object with 'policies'" in out.stderr
    out = cli("publish", str(tmp_path), "--name", "toy")
    assert out.exit_code == 2
    assert "not a policy directory" in out.stderr
    out = cli("rollback", "toy")
    assert out.exit_code == 2  # --reason is required


def test_cli_report_with_relative_ref_and_estimates_by_name(
    cli: Any, sources: list[Path], tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    report = {
        "policies": [
            {
                "ref": os.path.relpath(sources[2], reports),
                "estimates": {"dr": {"value": 42.0, "lower": 40.0, "upper": 44.0, "confidence": 0.9}},
                "gate": {
                    "promote": False,
                    "baseline": "behavior",
                    "reason": "not promoted: DR lower bound 40",
                },
            }
        ]
    }
    (reports / "r.json").write_text(json.dumps(report))
    out = cli("publish", str(sources[2]), "--name", "toy", "--report", str(reports / "r.json"))
    assert out.exit_code == 0, out.stderr
    assert "gate: do not promote: not promoted: DR lower bound 4" in out.stdout
    out = cli("show", "toy", "1")
    assert "[40, 44] (90%)" in out.stdout
    assert "do not promote against no champion" in out.stdout
