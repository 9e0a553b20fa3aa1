"""One artifact contract: every policy directory that serving refuses, the trainer refuses to publish first.

The cards below are written without the contract's checks (with a ``SHA256SUMS`` that matches them), as a
hand edit or another tool would. For each, the server's loader (what a TorchServe worker runs) refuses it,
and ``Registry.publish`` refuses it before anything is written, so no such version can reach serving.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import CHECKSUMS_FILE, checksums_text, sha256_bytes
from rlops_server.runtime import PolicyLoadError, PolicyRuntime
from rlops_server.torchserve.archive import ArchiveError, build_archive
from rlops_trainer.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parent.parent


def _server_testkit() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "rlops_server_testkit", REPO / "apps" / "server" / "tests" / "server_testkit.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


testkit = _server_testkit()
Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = card
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return mutate


def _bins(edges: list[float]) -> Mutation:
    def mutate(card: dict[str, Any]) -> None:
        card["reference"]["observation"]["bins"][0] = {
            "edges": edges,
            "proportions": [1.0 / (len(edges) + 1)] * (len(edges) + 1),
        }

    return mutate


def _drop(path: str, count: int = 1) -> Mutation:
    def mutate(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = card
        for key in parents:
            node = node[key]
        node[last] = node[last][:-count]

    return mutate


D = testkit.OBS_DIM
REFUSED: dict[str, tuple[Mutation, str]] = {
    "input shape with three entries": (_set("policy.input.shape", [-1, D, 1]), r"card\.policy\.input\.shape"),
    "input shape and space disagree": (
        _set("observation_space.shape", [D + 1]),
        r"card\.policy\.input\.shape",
    ),
    "a space bound short": (_drop("observation_space.low"), r"card\.observation_space\.low"),
    "reference mean short": (_drop("reference.observation.mean"), r"card\.reference\.observation\.mean"),
    "reference bins short": (_drop("reference.observation.bins"), r"card\.reference\.observation\.bins"),
    "edges unsorted": (_bins([1.0, 0.0]), r"bins\[0\]\.edges: must be finite and ascending"),
    "edges non-finite": (_bins([0.0, 1e400]), "Infinity is not valid JSON"),
    "action proportions short": (
        _drop("reference.actions.proportions"),
        r"card\.reference\.actions\.proportions",
    ),
    "no actions": (_set("action_space.n", 0), r"card\.action_space\.n"),
    "unknown score kind": (_set("policy.score_kind", "probs"), r"card\.policy\.score_kind"),
    "epsilon above one": (_set("policy.selection.epsilon", 1.5), r"card\.policy\.selection\.epsilon"),
    "unknown field": (_set("owner", "me"), "Additional properties are not allowed"),
}


def _write_unchecked(policy_dir: Path, card: dict[str, Any]) -> None:
    """The card and a matching SHA256SUMS, without the contract's validation."""
    data = (json.dumps(card, indent=2) + "\n").encode()
    (policy_dir / MODEL_CARD_FILE).write_bytes(data)
    digests = {POLICY_FILE: card["files"][POLICY_FILE], MODEL_CARD_FILE: sha256_bytes(data)}
    (policy_dir / CHECKSUMS_FILE).write_bytes(checksums_text(digests))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testkit.write_policy_dir(tmp_path_factory.mktemp("source") / "policy", "toy", None)


def test_the_untouched_policy_is_served_and_published(source: Path, tmp_path: Path) -> None:
    assert PolicyRuntime.load(source).name == "toy"
    assert Registry(tmp_path / "registry").publish(source, "toy") == 1


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_serving_refuses_the_trainer_refuses_first(source: Path, tmp_path: Path, case: str) -> None:
    mutate, message = REFUSED[case]
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    card = copy.deepcopy(json.loads((source / MODEL_CARD_FILE).read_text()))
    mutate(card)
    _write_unchecked(broken, card)

    with pytest.raises(PolicyLoadError, match=message):
        PolicyRuntime.load(broken)
    registry = Registry(tmp_path / "registry")
    with pytest.raises(RegistryError, match=message):
        registry.publish(broken, "toy")
    assert not (tmp_path / "registry" / "toy").exists() or registry.versions("toy") == []


def test_a_version_changed_after_publishing_is_refused_everywhere(source: Path, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    version = registry.publish(source, "toy")
    card_file = registry.resolve("toy", version) / MODEL_CARD_FILE
    card_file.chmod(0o644)
    card_file.write_bytes(card_file.read_bytes().replace(b'"algorithm": "test"', b'"algorithm": "tesT"'))
    with pytest.raises(RegistryError, match=r"model-card\.json: sha256 does not match"):
        registry.verify("toy", version)
    with pytest.raises(ArchiveError, match=r"model-card\.json: sha256 does not match"):
        build_archive(tmp_path / "registry", "toy", version, tmp_path / "store")
    with pytest.raises(PolicyLoadError, match=r"model-card\.json: sha256 does not match"):
        PolicyRuntime.load(card_file.parent)
