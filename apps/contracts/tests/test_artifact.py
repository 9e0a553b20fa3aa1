"""Policy directories and their hashes, the registry reader, and the durable writes under them."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from rlops_contracts import MODEL_CARD_FILE, POLICY_FILE
from rlops_contracts.artifact import (
    CHECKSUMS_FILE,
    read_checksums,
    seal,
    sha256_file,
    verify_policy_dir,
)
from rlops_contracts.card import ArtifactError, CardError, read_card, validate_card
from rlops_contracts.durable import atomic_file, replace_atomic
from rlops_contracts.registry import RegistryError, RegistryReader, parse_ref, resolve_policy_ref
from test_schema import CARD


def _card(**changes: Any) -> dict[str, Any]:
    card = copy.deepcopy(CARD)
    card.update(files={}, **changes)
    return card


def _policy_dir(
    path: Path, card: dict[str, Any] | None = None, payload: bytes = b"torchscript bytes"
) -> Path:
    path.mkdir(parents=True)
    (path / POLICY_FILE).write_bytes(payload)
    seal(path, card or _card())
    return path


def test_seal_records_every_file_and_sha256sum_agrees(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path / "p")
    card = verify_policy_dir(d)
    assert card["files"] == {POLICY_FILE: "sha256:" + hashlib.sha256(b"torchscript bytes").hexdigest()}
    assert set(read_checksums(d)) == {POLICY_FILE, MODEL_CARD_FILE}
    # The file is coreutils' format: sha256sum checks it as it is.
    done = subprocess.run(["sha256sum", "-c", CHECKSUMS_FILE], cwd=d, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("victim", [POLICY_FILE, MODEL_CARD_FILE])
def test_one_changed_byte_is_refused_naming_the_file_and_both_hashes(tmp_path: Path, victim: str) -> None:
    d = _policy_dir(tmp_path / "p")
    recorded = read_checksums(d)[victim]
    data = bytearray((d / victim).read_bytes())
    # A byte inside a string value: the card stays valid JSON and valid against the schema.
    at = data.index(b"cartpole") if victim == MODEL_CARD_FILE else 0
    data[at] ^= 0x01
    (d / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as e:
        verify_policy_dir(d)
    message = str(e.value)
    assert str(d / victim) in message
    assert f"recorded {recorded}" in message
    assert f"file {sha256_file(d / victim)}" in message


def test_a_card_and_checksums_that_disagree_are_refused(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path / "p")
    card = json.loads((d / MODEL_CARD_FILE).read_text())
    card["files"][POLICY_FILE] = "sha256:" + "0" * 64
    (d / MODEL_CARD_FILE).write_text(json.dumps(card))
    sums = (d / CHECKSUMS_FILE).read_text().splitlines()
    sums = [
        f"{sha256_file(d / MODEL_CARD_FILE).removeprefix('sha256:')}  {MODEL_CARD_FILE}"
        if line.endswith(MODEL_CARD_FILE)
        else line
        for line in sums
    ]
    (d / CHECKSUMS_FILE).write_text("\n".join(sums) + "\n")
    with pytest.raises(ArtifactError, match=r"model-card\.json and SHA256SUMS disagree about policy\.pt"):
        verify_policy_dir(d)


def test_missing_or_malformed_checksums_are_refused(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path / "p")
    (d / CHECKSUMS_FILE).write_text("not a checksum line\n")
    with pytest.raises(ArtifactError, match=r"SHA256SUMS, line 1: .* \(sha256sum's format\)"):
        verify_policy_dir(d)
    (d / CHECKSUMS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"no SHA256SUMS, so model-card\.json cannot be checked"):
        verify_policy_dir(d)
    with pytest.raises(ArtifactError, match="no such policy directory"):
        verify_policy_dir(tmp_path / "nowhere")


def _bins(card: dict[str, Any], edges: list[float]) -> dict[str, Any]:
    card["reference"]["observation"]["bins"][0]["edges"] = edges
    card["reference"]["observation"]["bins"][0]["proportions"] = [1.0 / (len(edges) + 1)] * (len(edges) + 1)
    return card


def _broken_cards() -> list[tuple[str, dict[str, Any], str]]:
    """Cards that serving cannot use, each with the field its error must name."""
    dim = CARD["policy"]["input"]["shape"][1]
    cases = []
    c = copy.deepcopy(CARD)
    c["policy"]["input"]["shape"] = [-1, dim, 1]
    cases.append(("three-entry input shape", c, r"card\.policy\.input\.shape: expected \[-1, n_features\]"))
    c = copy.deepcopy(CARD)
    c["observation_space"]["shape"] = [dim + 1]
    cases.append(("shape and features differ", c, r"card\.policy\.input\.shape: \d+ features but"))
    c = copy.deepcopy(CARD)
    c["observation_space"]["low"] = c["observation_space"]["low"][:-1]
    cases.append(("short space bound", c, r"card\.observation_space\.low: \d+ entries"))
    c = copy.deepcopy(CARD)
    c["reference"]["observation"]["std"] = c["reference"]["observation"]["std"][:-1]
    cases.append(("short reference", c, r"card\.reference\.observation\.std: \d+ entries"))
    c = copy.deepcopy(CARD)
    c["reference"]["observation"]["bins"][0]["proportions"].append(0.0)
    cases.append(("bins without matching proportions", c, r"bins\[0\]: \d+ edges need"))
    cases.append(
        (
            "unsorted edges",
            _bins(copy.deepcopy(CARD), [0.5, -0.5]),
            r"bins\[0\]\.edges: must be finite and ascending",
        )
    )
    cases.append(
        (
            "non-finite edge",
            _bins(copy.deepcopy(CARD), [-0.5, float("inf")]),
            r"bins\[0\]\.edges: must be finite and ascending",
        )
    )
    c = copy.deepcopy(CARD)
    c["reference"]["actions"]["proportions"] = [1.0]
    cases.append(("action proportions", c, r"card\.reference\.actions\.proportions: 1 entries"))
    return cases


@pytest.mark.parametrize(("label", "card", "message"), _broken_cards(), ids=[c[0] for c in _broken_cards()])
def test_cross_field_rules(label: str, card: dict[str, Any], message: str) -> None:
    validate_card(copy.deepcopy(CARD))
    with pytest.raises(CardError, match=message):
        validate_card(card)


def test_read_card_names_the_file(tmp_path: Path) -> None:
    d = _policy_dir(tmp_path / "p")
    (d / MODEL_CARD_FILE).write_text('{"schema_version": NaN}')
    with pytest.raises(CardError, match=r"model-card\.json: not valid JSON: NaN is not valid JSON"):
        read_card(d)
    with pytest.raises(CardError, match=r"not a policy directory: no model-card\.json"):
        read_card(tmp_path)


# --- the registry reader ---------------------------------------------------------------------------


def _registry(root: Path) -> Path:
    for version in (1, 2):
        _policy_dir(root / "cartpole" / str(version), _card(version=version), payload=b"v%d" % version)
    (root / "cartpole" / "aliases.json").write_text(json.dumps({"champion": 1, "candidate": 2}))
    (root / "cartpole" / ".tmp-3-abc").mkdir()  # a writer that died: never a version
    return root


def test_registry_reader_lists_resolves_and_verifies(tmp_path: Path) -> None:
    reg = RegistryReader(_registry(tmp_path / "reg"))
    assert [(s.name, s.versions, s.aliases) for s in reg.list()] == [
        ("cartpole", [1, 2], {"champion": 1, "candidate": 2})
    ]
    assert reg.resolve_version("cartpole", "candidate") == 2
    assert reg.resolve("cartpole", 1) == tmp_path / "reg" / "cartpole" / "1"
    assert reg.verify("cartpole", "champion")["version"] == 1
    assert resolve_policy_ref("cartpole@2", tmp_path / "reg") == tmp_path / "reg" / "cartpole" / "2"
    assert parse_ref("cartpole@champion") == ("cartpole", "champion")
    assert parse_ref("cartpole") is None


def test_registry_reader_refusals(tmp_path: Path) -> None:
    root = _registry(tmp_path / "reg")
    reg = RegistryReader(root)
    with pytest.raises(RegistryError, match=r"unknown policy 'hopper' .* known policies: cartpole"):
        reg.versions("hopper")
    with pytest.raises(RegistryError, match="invalid policy name"):
        reg.versions("../etc")
    with pytest.raises(RegistryError, match=r"has no version 7; versions: 1, 2"):
        reg.resolve_version("cartpole", 7)
    with pytest.raises(RegistryError, match=r"no version or alias 'staging'"):
        reg.resolve_version("cartpole", "staging")
    (root / "cartpole" / "aliases.json").write_text('{"champion": 9}')
    with pytest.raises(RegistryError, match="champion points at missing version 9"):
        reg.resolve_version("cartpole", "champion")
    os.chmod(root / "cartpole" / "2" / MODEL_CARD_FILE, 0o644)
    card = json.loads((root / "cartpole" / "2" / MODEL_CARD_FILE).read_text())
    card["version"] = 1
    seal(root / "cartpole" / "2", card, replace=True)
    with pytest.raises(
        RegistryError, match=r"card says 'cartpole' version 1, but it is 'cartpole' version 2"
    ):
        reg.verify("cartpole", 2)


# --- durable writes --------------------------------------------------------------------------------


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = replace_atomic(tmp_path / "state.json", "old\n")

    def crash_mid_write() -> None:
        with atomic_file(target) as f:
            f.write(b"half of the new con")
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError, match="crash"):
        crash_mid_write()
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    replace_atomic(target, b"new\n", mode=0o600)
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o600
