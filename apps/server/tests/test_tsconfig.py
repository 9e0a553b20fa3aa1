"""Generated TorchServe configuration: config.properties, log4j2.xml and metrics.yaml."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import ts
import yaml
from rlops_server import metrics as m
from rlops_server.settings import ServingSettings
from rlops_server.torchserve import metrics_config as mc
from rlops_server.torchserve.config import (
    BATCHER_BUILT,
    BATCHER_CLASS,
    ModelSettings,
    ServedModel,
    ServerConfig,
    install_batcher,
    read_properties,
    render_log_config,
    write_properties,
)


def config(tmp_path: Path, **kw: object) -> ServerConfig:
    store = tmp_path / "my store" / "models.d"
    models = (
        ServedModel("toy", "3", "toy-v3.mar", ModelSettings(batch_size=4, max_batch_delay_ms=2)),
        ServedModel("toy", "4", "toy-v4.mar"),
    )
    return ServerConfig(model_store=store, metrics_config=tmp_path / "metrics.yaml", models=models, **kw)  # type: ignore[arg-type]


def test_properties(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, inference_host="0.0.0.0", inference_port=9080, management_port=9081, metrics_port=9082
    )
    props = read_properties(write_properties(tmp_path / "config.properties", cfg))
    assert props["inference_address"] == "http://0.0.0.0:9080"
    assert props["management_address"] == "http://127.0.0.1:9081"
    assert props["grpc_management_address"] == "127.0.0.1"
    assert props["metrics_address"] == "http://127.0.0.1:9082"
    assert props["metrics_mode"] == "prometheus"
    assert props["metrics_config"] == str((tmp_path / "metrics.yaml").resolve())
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["enable_envvars_config"] == "false"
    assert props["disable_system_metrics"] == "true"
    assert props["model_store"] == str(cfg.model_store.resolve())
    # champion first: TorchServe makes the first loaded version the default one
    assert props["load_models"] == "toy=toy-v3.mar,toy=toy-v4.mar"
    assert json.loads(props["models"]) == {
        "toy": {
            "3": {
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 4,
                "maxBatchDelay": 2,
                "responseTimeout": 30,
            },
            "4": {
                "minWorkers": 1,
                "maxWorkers": 1,
                "batchSize": 16,
                "maxBatchDelay": 1,
                "responseTimeout": 30,
            },
        }
    }
    assert cfg.inference_url == "http://127.0.0.1:9080"
    assert cfg.metrics_url == "http://127.0.0.1:9082/metrics"


def test_allowed_urls_match_only_the_model_store(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    pattern = read_properties(write_properties(tmp_path / "config.properties", cfg))["allowed_urls"]
    store = cfg.model_store.resolve()
    assert re.fullmatch(pattern, f"file://{store}/toy-v3.mar")
    assert not re.fullmatch(pattern, f"file://{store.parent}/other/evil.mar")
    assert not re.fullmatch(pattern, "https://example.com/toy.mar")
    # The store path has a space and dots; properties escaping must keep the regex intact.
    text = (tmp_path / "config.properties").read_text()
    assert "\\\\." in text


def test_token_authorization_can_be_turned_off(tmp_path: Path) -> None:
    props = config(tmp_path, token_auth=False).properties()
    assert props["disable_token_authorization"] == "true"
    assert props["management_address"].startswith("http://127.0.0.1:")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"metrics_port": 8080}, r"ports must differ; used twice: \[8080\]"),
        ({"inference_port": 70000}, "inference_port must be a TCP port"),
        ({"job_queue_size": 0}, "job_queue_size must be an integer >= 1"),
        ({"token_expiration_min": 0}, "token_expiration_min must be positive"),
    ],
)
def test_server_config_is_validated(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **kw)


def test_model_settings_are_validated() -> None:
    with pytest.raises(ValueError, match=r"max_workers \(1\) must be >= min_workers \(2\)"):
        ModelSettings(min_workers=2, max_workers=1)
    with pytest.raises(ValueError, match=r"batch_size must be an integer in \[1, 4096\]"):
        ModelSettings(batch_size=0)
    with pytest.raises(ValueError, match=r"batcher must be one of adaptive, delay, got 'fast'"):
        ModelSettings(batcher="fast")


def test_the_adaptive_batcher_is_selected_in_the_archive_config() -> None:
    assert ModelSettings().model_config(ServingSettings())["continuousBatching"] is True
    assert "continuousBatching" not in ModelSettings(batcher="delay").model_config(ServingSettings())


def test_install_batcher_puts_the_class_where_the_frontend_loads_it(tmp_path: Path) -> None:
    installed = install_batcher(tmp_path, needed=True)
    assert installed == tmp_path / "org" / "pytorch" / "serve" / "wlm" / "ContinuousBatching.class"
    assert installed.read_bytes() == BATCHER_BUILT.read_bytes()
    assert installed.read_bytes()[:4] == bytes.fromhex("cafebabe")
    assert [p.name for p in installed.parent.iterdir()] == ["ContinuousBatching.class"]
    # A later start with TorchServe's batcher leaves no class behind to be picked up by mistake.
    assert install_batcher(tmp_path, needed=False) is None
    assert not (tmp_path / BATCHER_CLASS).exists()


def test_the_shipped_batcher_class_is_built_from_its_source(tmp_path: Path) -> None:
    """``make frontend-class`` builds it; this fails when the source changed and the class did not."""
    javac = shutil.which("javac")
    assert javac, "javac is missing: install openjdk-17-jdk-headless (make system does)"
    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    source = BATCHER_BUILT.with_suffix(".java")
    subprocess.run(
        [javac, "--release", "11", "-Xlint:all", "-Werror", "-cp", str(jar), "-d", str(tmp_path), source],
        check=True,
        capture_output=True,
    )
    built = (tmp_path / BATCHER_CLASS).read_bytes()
    assert built == BATCHER_BUILT.read_bytes(), "rebuild it: make frontend-class"


def test_log_config_is_quiet_on_the_request_path() -> None:
    root = ET.fromstring(render_log_config(access_log=False))
    levels = {lg.get("name"): lg.get("level") for lg in root.iter("Logger")}
    assert levels["ACCESS_LOG"] == "off"
    assert levels["org.pytorch.serve.wlm.WorkerThread"] == "warn"
    assert levels["org.pytorch.serve.wlm.BatchAggregator"] == "warn"
    assert levels["org.pytorch.serve"] == "info"
    on = ET.fromstring(render_log_config(access_log=True))
    assert {lg.get("name"): lg.get("level") for lg in on.iter("Logger")}["ACCESS_LOG"] == "info"
    appenders = {a.get("name") for a in root.iter("RollingFile")}
    assert appenders == {"ts_log", "model_log", "access_log"}


def test_every_roll_over_of_a_log_gets_its_own_archive() -> None:
    root = ET.fromstring(render_log_config(max_bytes=4096))
    for appender in root.iter("RollingFile"):
        # A date alone would name every roll-over of one day alike, each overwriting the one before.
        assert appender.get("filePattern", "").endswith(f"/{appender.get('name')}.%d{{yyyy-MM-dd}}.%i.log.gz")
        assert [p.get("size") for p in appender.iter("SizeBasedTriggeringPolicy")] == ["4096"]
    with pytest.raises(ValueError, match="bytes >= 1"):
        render_log_config(max_bytes=0)


def test_metrics_config_keeps_torchserve_metrics_and_adds_ours(tmp_path: Path) -> None:
    default = yaml.safe_load(mc.torchserve_default_metrics_config().read_text())
    written = yaml.safe_load(mc.write_metrics_config(tmp_path / "metrics.yaml").read_text())
    assert written["ts_metrics"] == default["ts_metrics"]
    for kind, entries in default["model_metrics"].items():
        for entry in entries:
            assert entry in written["model_metrics"][kind]
    declared = {e["name"]: (kind, e) for kind, es in written["model_metrics"].items() for e in es}
    for spec in m.SPECS:
        kind, entry = declared[spec.name]
        assert kind == spec.kind
        assert entry["dimensions"][:2] == ["policy", "version"]
        assert spec.name.startswith("rlops_")
    # The latency histogram as its three series, each a counter (see rlops_server.metrics).
    assert m.INFERENCE_LATENCY not in declared
    assert declared[m.LATENCY_BUCKET][1]["dimensions"] == ["policy", "version", "le"]
    assert declared[m.LATENCY_SUM][0] == declared[m.LATENCY_COUNT][0] == "counter"
    assert declared[m.OBSERVATION_DRIFT_BIN][1]["dimensions"] == ["policy", "version", "feature", "bin"]
