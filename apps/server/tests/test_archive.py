"""Model archives built from the registry: what the .mar holds, and what is refused."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml
from rlops_contracts.artifact import read_checksums, sha256_file
from rlops_server.commands.serve import app
from rlops_server.settings import ServingSettings
from rlops_server.torchserve.archive import (
    VERSION_KEY,
    ArchiveError,
    archive_file_name,
    build_archive,
    check_archive,
    handler_source,
    server_version,
)
from rlops_server.torchserve.config import ModelSettings
from server_testkit import write_registry
from typer.testing import CliRunner


def test_archive_holds_policy_card_handler_and_config(registry: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    built = build_archive(
        registry,
        "toy",
        "champion",
        store,
        model_settings=ModelSettings(batch_size=8, max_batch_delay_ms=2, min_workers=1, max_workers=2),
        serving=ServingSettings(max_batch_observations=64),
    )
    assert (built.name, built.version, built.path) == ("toy", 1, store / archive_file_name("toy", 1))
    assert sorted(p.name for p in store.iterdir()) == ["toy-v1.mar"], "staging files left in the store"
    with zipfile.ZipFile(built.path) as z:
        names = set(z.namelist())
        assert names == {
            "policy.pt",
            "model-card.json",
            "SHA256SUMS",
            "handler.py",
            "model-config.yaml",
            "MAR-INF/MANIFEST.json",
        }
        assert z.read("policy.pt") == (registry / "toy" / "1" / "policy.pt").read_bytes()
        assert z.read("model-card.json") == (registry / "toy" / "1" / "model-card.json").read_bytes()
        assert z.read("SHA256SUMS") == (registry / "toy" / "1" / "SHA256SUMS").read_bytes()
        assert z.read("handler.py") == handler_source().read_bytes()
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert manifest["model"] == {
        "modelName": "toy",
        "serializedFile": "policy.pt",
        "handler": "handler.py",
        "modelVersion": "1",
        "configFile": "model-config.yaml",
    }
    assert config["batchSize"] == 8
    assert config["maxBatchDelay"] == 2
    assert (config["minWorkers"], config["maxWorkers"]) == (1, 2)
    assert config["deviceType"] == "cpu"
    assert config["handler"]["max_batch_observations"] == 64
    assert config["handler"][VERSION_KEY] == server_version()


def test_two_versions_of_one_model(registry: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    a = build_archive(registry, "toy", "champion", store)
    b = build_archive(registry, "toy", "candidate", store)
    assert (a.version, b.version) == (1, 2)
    assert check_archive(b.path, "toy", 2)["model"]["modelName"] == "toy"  # type: ignore[index]
    # Rebuilding replaces the archive in place.
    again = build_archive(registry, "toy", 2, store)
    assert again.path == b.path
    assert sorted(p.name for p in store.iterdir()) == ["toy-v1.mar", "toy-v2.mar"]


def test_batch_delay_of_zero_is_refused() -> None:
    # TorchServe reads maxBatchDelay 0 as "not set" and falls back to 100 ms.
    config = ModelSettings(batch_size=1, max_batch_delay_ms=1).model_config(ServingSettings())
    assert config["maxBatchDelay"] == 1
    with pytest.raises(ValueError, match=r"max_batch_delay_ms must be an integer in \[1, 10000\]"):
        ModelSettings(max_batch_delay_ms=0)


def test_unknown_versions_and_aliases_are_refused(registry: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(ArchiveError, match=r"has no version 9; versions: 1, 2"):
        build_archive(registry, "toy", "9", store)
    with pytest.raises(
        ArchiveError, match=r"no version or alias 'staging'; aliases: candidate → 2, champion → 1"
    ):
        build_archive(registry, "toy", "staging", store)
    with pytest.raises(ArchiveError, match=r"unknown policy 'cartpole' in registry .*; known policies: toy"):
        build_archive(registry, "cartpole", "champion", store)
    assert not store.exists() or not any(store.iterdir())


@pytest.mark.parametrize("victim", ["policy.pt", "model-card.json"])
def test_a_file_changed_by_one_byte_after_publishing_is_not_archived(tmp_path: Path, victim: str) -> None:
    reg = write_registry(tmp_path / "registry")
    path = reg / "toy" / "1" / victim
    recorded = read_checksums(path.parent)[victim]
    data = bytearray(path.read_bytes())
    # In the card, a byte of the policy's name in "name": "toy": still valid JSON and a valid card.
    at = data.index(b'"toy"') + 1 if victim == "model-card.json" else len(data) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError) as e:
        build_archive(reg, "toy", 1, tmp_path / "store")
    message = str(e.value)
    assert "version 1 cannot be archived" in message
    assert str(path) in message
    assert f"recorded {recorded}" in message
    assert f"file {sha256_file(path)}" in message
    assert not (tmp_path / "store" / "toy-v1.mar").exists()


def test_card_must_name_the_registry_version(tmp_path: Path) -> None:
    reg = write_registry(tmp_path / "registry", candidate=False)
    shutil.copytree(reg / "toy" / "1", reg / "toy" / "3")
    with pytest.raises(
        ArchiveError, match=r"card says 'toy' version 1, but it is 'toy' version 3 in the registry"
    ):
        build_archive(reg, "toy", 3, tmp_path / "store")


def test_cli_archive_and_start_errors(registry: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    store = tmp_path / "store"
    result = runner.invoke(
        app, ["archive", "toy", "candidate", "--registry", str(registry), "--store", str(store)]
    )
    assert result.exit_code == 0, result.output
    assert (store / "toy-v2.mar").is_file()
    no_champion = write_registry(tmp_path / "fresh")
    (no_champion / "toy" / "aliases.json").write_text('{"candidate": 2}')
    result = runner.invoke(app, ["start", "--registry", str(no_champion), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "has no champion to serve" in result.output
    result = runner.invoke(app, ["archive", "nope", "1", "--registry", str(registry), "--store", str(store)])
    assert result.exit_code == 2
    assert "unknown policy 'nope'" in result.output
