"""Each component on its own, under Pulumi's mocks, built from a typed Args: what it registers."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess

import pytest
import yaml
from rlops_infra import config as cfg
from rlops_infra import delivery, monitoring, ray, serving, storage, tenancy, training
from rlops_infra.cluster import Cluster, ClusterArgs
from rlops_infra.files import ROOT as FILES_ROOT
from rlops_infra.files import RepoFiles
from rlops_infra.render import Recorded, run_mocked
from rlops_server.torchserve.config import BATCHER_BUILT

FILES = RepoFiles.load()
IMAGE = "ghcr.io/rlops/rlops-trainer:0.1.0"
SERVER = "ghcr.io/rlops/rlops-server:0.1.0"


def mocked(fn) -> list[Recorded]:
    return run_mocked(fn, "unit", {}, set())


def kinds(recorded: list[Recorded]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in recorded:
        out.setdefault(r.inputs.get("kind", r.type), []).append(r.inputs)
    return out


def test_cluster_from_kubeconfig_has_no_cloud_resources() -> None:
    c = cfg.Cluster(provider="kubeconfig", context="kind-rlops")
    rec = mocked(lambda: Cluster("cluster", ClusterArgs(c, "rlops-unit")))
    types = [r.type for r in rec]
    assert "pulumi:providers:kubernetes" in types
    assert not [t for t in types if t.startswith(("aws:", "eks:", "kubernetes:helm"))]
    (provider,) = [r for r in rec if r.type == "pulumi:providers:kubernetes"]
    assert provider.inputs["context"] == "kind-rlops"


def test_eks_cluster_gpu_groups_scale_from_zero_tainted() -> None:
    c = cfg.Cluster(
        provider="eks",
        eks=cfg.Eks(region="us-west-2"),
        gpu_node_groups=[
            cfg.NodeGroup(name="a10g", instance_types=["g5.xlarge"], max_size=4, gpus_per_node=1),
            cfg.NodeGroup(name="spot", instance_types=["g5.2xlarge"], capacity="spot", max_size=8),
        ],
    )
    rec = mocked(lambda: Cluster("cluster", ClusterArgs(c, "rlops-unit", {"team": "ml"})))
    by_name = {r.name: r.inputs for r in rec}
    assert by_name["cluster-eks"]["skipDefaultNodeGroup"] is True
    assert by_name["cluster-eks"]["name"] == "rlops-unit"
    for group, capacity in (("a10g", "ON_DEMAND"), ("spot", "SPOT")):
        ng = by_name[f"cluster-gpu-{group}"]
        assert ng["gpu"] is True
        assert ng["capacityType"] == capacity
        assert ng["scalingConfig"]["minSize"] == 0
        assert ng["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}]
        assert ng["labels"]["nvidia.com/gpu.present"] == "true"
        assert ng["tags"]["k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"] == "1"
    assert "taints" not in by_name["cluster-system"]
    charts = {r.inputs["chart"]: r.inputs for r in rec if r.type == "kubernetes:helm.sh/v3:Release"}
    assert charts["nvidia-device-plugin"]["version"] == "0.18.2"
    assert charts["cluster-autoscaler"]["values"]["autoDiscovery"]["clusterName"] == "rlops-unit"
    addons = {r.inputs["addonName"] for r in rec if r.type == "aws:eks/addon:Addon"}
    assert addons == {"eks-pod-identity-agent", "aws-ebs-csi-driver", "aws-efs-csi-driver"}


def test_tenancy_quotas_per_team() -> None:
    t = cfg.Tenancy(teams=[cfg.Team(name="team-a", gpus=8, max_jobs=150)])
    rec = kinds(mocked(lambda: tenancy.Tenancy("tenancy", tenancy.TenancyArgs(t, ("monitoring",)))))
    assert {n["metadata"]["name"] for n in rec["Namespace"]} == {"rlops", "monitoring", "team-a"}
    (quota,) = rec["ResourceQuota"]
    assert quota["metadata"]["namespace"] == "team-a"
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "8"
    assert quota["spec"]["hard"]["count/rayjobs.ray.io"] == "150"
    (limits,) = rec["LimitRange"]
    assert limits["spec"]["limits"][0]["defaultRequest"] == {"cpu": "500m", "memory": "1Gi"}


def test_storage_volumes_and_model_store_jobs() -> None:
    s = cfg.Storage(
        data=cfg.Volume(size="1Ti", storage_class="efs", access_mode="ReadWriteMany"),
        models=cfg.Volume(size="100Gi", storage_class="efs", access_mode="ReadWriteMany"),
        classes=[
            cfg.StorageClassSpec(
                name="efs", provisioner="efs.csi.aws.com", parameters={"fileSystemId": "fs-1"}
            )
        ],
    )
    spec = storage.ArchiveSpec("cartpole", (1, 2), workers=2, batch_size=8, max_batch_delay_ms=2)
    rec = kinds(mocked(lambda: storage.Storage("storage", storage.StorageArgs(s, "rlops", SERVER, spec))))
    assert rec["StorageClass"][0]["parameters"] == {"fileSystemId": "fs-1"}
    claims = {c["metadata"]["name"]: c["spec"] for c in rec["PersistentVolumeClaim"]}
    assert claims["rlops-models"]["accessModes"] == ["ReadWriteMany"]
    assert claims["rlops-data"]["resources"]["requests"]["storage"] == "1Ti"
    jobs = {j["metadata"]["name"]: j for j in rec["Job"]}
    assert set(jobs) == {"archive-cartpole-v1", "archive-cartpole-v2"}
    command = jobs["archive-cartpole-v2"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:5] == ["rlops", "serve", "archive", "cartpole", "2"]
    assert command[command.index("--store") + 1] == "/mnt/models/store"
    assert command[command.index("--batcher") + 1] == "adaptive"


RAY = cfg.Ray(ray_version="2.60.0", gpu_workers=cfg.RayWorkers(min_replicas=0, max_replicas=6, gpus=1))


def test_ray_cluster_cpu_head_gpu_workers_from_zero() -> None:
    args = ray.RayArgs(RAY, "rlops", IMAGE, "rlops-data", "rlops-models", {"release": "kps"})
    rec = mocked(lambda: ray.Ray("ray", args))
    (operator,) = [r.inputs for r in rec if r.type == "kubernetes:helm.sh/v3:Release"]
    assert (operator["chart"], operator["version"]) == ("kuberay-operator", "1.7.0")
    assert operator["values"]["metrics"]["serviceMonitor"]["additionalLabels"] == {"release": "kps"}
    objs = kinds(rec)
    (rc,) = objs["RayCluster"]
    head, (workers,) = rc["spec"]["headGroupSpec"], rc["spec"]["workerGroupSpecs"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "tolerations" not in head["template"]["spec"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (0, 6)
    assert workers["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    (pm,) = objs["PodMonitor"]
    assert pm["metadata"]["labels"]["release"] == "kps"


def test_training_rayjob_and_batch_job() -> None:
    jobs = cfg.Training(
        jobs=[
            cfg.TrainingJob(
                name="big", runner="ray", algorithm="cql", data="d.parquet", out="runs/big", ray_workers=3
            ),
            cfg.TrainingJob(
                name="seeds", runner="job", algorithm="iql", data="d.parquet", out="runs/seeds", parallelism=4
            ),
        ]
    )
    args = training.TrainingArgs(jobs, RAY, "rlops", IMAGE, "rlops-data", "rlops-models", {"release": "kps"})
    objs = kinds(mocked(lambda: training.Training("training", args)))
    (pm,) = objs["PodMonitor"]
    assert pm["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["relabelings"] == [
        {"action": "replace", "targetLabel": "job", "replacement": "rlops-trainer"}
    ]
    (rj,) = objs["RayJob"]
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    assert {"name": endpoint["port"], "containerPort": 9108} in head["spec"]["containers"][0]["ports"]
    workers = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert "metadata" not in workers, "the driver runs on the head only"
    assert rj["spec"]["shutdownAfterJobFinishes"] is True
    assert rj["spec"]["ttlSecondsAfterFinished"] == 3600
    assert rj["spec"]["entrypoint"].startswith(
        "rlops train cql --data /mnt/data/d.parquet --out /mnt/models/runs/big"
    )
    assert "--ray-workers 3" in rj["spec"]["entrypoint"]
    assert rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    (job,) = objs["Job"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["parallelism"] == 4
    assert job["spec"]["completionMode"] == "Indexed"
    assert {
        v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    } == {
        "rlops-data",
        "rlops-models",
    }
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "/$(JOB_COMPLETION_INDEX)" in " ".join(pod["containers"][0]["command"])
    assert (
        pm["spec"]["selector"]["matchLabels"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pod["containers"][0]["ports"] == [{"name": endpoint["port"], "containerPort": 9108}]
    without = training.TrainingArgs(jobs, RAY, "rlops", IMAGE, "rlops-data", "rlops-models")
    assert "PodMonitor" not in kinds(mocked(lambda: training.Training("training", without)))


def _serving_args(**over) -> serving.ServingArgs:
    s = cfg.Serving(
        policy="cartpole",
        version=3,
        previous_version=2,
        replicas=2,
        pdb_min_available=1,
        autoscaling=cfg.Autoscaling(enabled=True, min_replicas=2, max_replicas=5, target=0.05),
        client_namespaces=["product"],
    )
    base = dict(
        serving=s,
        namespace="rlops",
        server_image=SERVER,
        data_claim="rlops-data",
        models_claim="rlops-models",
        logs="logs",
        monitoring_namespace="monitoring",
        monitor_labels={"release": "kps"},
    )
    return serving.ServingArgs(**{**base, **over})


def test_serving_deployment_objects() -> None:
    objs = kinds(mocked(lambda: serving.Serving("serving", _serving_args())))
    (dep,) = objs["Deployment"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert container["livenessProbe"]["httpGet"]["path"] == "/ping"
    (cm,) = objs["ConfigMap"]
    props = dict(line.split("=", 1) for line in cm["data"]["config.properties"].splitlines() if "=" in line)
    assert props["management_address"] == "http://127.0.0.1:8081"
    assert props["load_models"] == "cartpole=cartpole-v3.mar"
    assert props["metrics_mode"] == "prometheus"
    assert props["enable_model_api"] == "false"
    assert "ts_metrics" in yaml.safe_load(cm["data"]["metrics.yaml"])
    (hpa,) = objs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == serving.QUEUE_METRIC
    assert hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "50m"
    assert objs["PodDisruptionBudget"][0]["spec"]["minAvailable"] == 1
    (np,) = objs["NetworkPolicy"]
    rules = np["spec"]["ingress"]
    management = [r for r in rules if any(p["port"] == 8081 for p in r["ports"])]
    assert management == [rules[0]]
    assert rules[0]["from"] == [{"podSelector": {}}]
    assert objs["ServiceMonitor"][0]["metadata"]["labels"]["release"] == "kps"


def test_serving_mounts_the_adaptive_batcher_where_the_frontend_loads_it() -> None:
    objs = kinds(mocked(lambda: serving.Serving("serving", _serving_args())))
    (cm,) = objs["ConfigMap"]
    assert base64.b64decode(cm["binaryData"]["ContinuousBatching.class"]) == BATCHER_BUILT.read_bytes()
    container = objs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert container["workingDir"] == "/tmp"
    (mount,) = [m for m in container["volumeMounts"] if m.get("subPath") == "ContinuousBatching.class"]
    assert mount == {
        "name": "config",
        "mountPath": "/tmp/org/pytorch/serve/wlm/ContinuousBatching.class",
        "subPath": "ContinuousBatching.class",
        "readOnly": True,
    }

    # TorchServe's own batcher needs neither.
    delay = cfg.Serving(policy="cartpole", version=3, batcher="delay")
    objs = kinds(mocked(lambda: serving.Serving("serving", _serving_args(serving=delay))))
    assert "binaryData" not in objs["ConfigMap"][0]
    container = objs["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert not [m for m in container["volumeMounts"] if "subPath" in m]


def test_serving_without_actions_webhook() -> None:
    objs = kinds(mocked(lambda: serving.Serving("serving", _serving_args())))
    (dep,) = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["torchserve"]
    (models,) = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"]["readOnly"] is True
    assert "Secret" not in objs
    assert [s["metadata"]["name"] for s in objs["Service"]] == ["torchserve-cartpole"]
    (np,) = objs["NetworkPolicy"]
    assert not [r for r in np["spec"]["ingress"] for p in r["ports"] if p["port"] == 9095]
    (sm,) = objs["ServiceMonitor"]
    assert sm["spec"]["endpoints"][0]["relabelings"] == [
        {"action": "replace", "targetLabel": "job", "replacement": "torchserve"}
    ]


def test_serving_with_actions_webhook() -> None:
    actions = serving.Actions(token="t0ken", max_workers=3)
    rec = mocked(lambda: serving.Serving("serving", _serving_args(actions=actions)))
    objs = kinds(rec)
    (dep,) = objs["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    hook = {c["name"]: c for c in pod["containers"]}["actions"]
    assert hook["image"] == SERVER
    assert hook["command"][hook["command"].index("--max-workers") + 1] == "3"
    assert hook["command"][hook["command"].index("--record") + 1] == "/mnt/data/actions/$(POD_NAME).jsonl"
    assert "t0ken" not in repr(actions)
    (secret,) = [r for r in rec if r.inputs.get("kind") == "Secret"]
    assert secret.secret, "the token is a Pulumi secret"
    assert secret.name == "serving-actions-secret"
    assert secret.inputs["stringData"] == {"token": "t0ken"}
    services = {s["metadata"]["name"]: s for s in objs["Service"]}
    assert services["rlops-actions"]["spec"]["publishNotReadyAddresses"] is True
    assert services["rlops-actions"]["spec"]["ports"] == [
        {"name": "actions", "port": 9095, "targetPort": "actions"}
    ]
    monitors = {m["metadata"]["name"]: m for m in objs["ServiceMonitor"]}
    assert (
        monitors["rlops-actions"]["spec"]["endpoints"][0]["relabelings"][0]["replacement"] == "rlops-actions"
    )
    assert monitors["rlops-actions"]["metadata"]["labels"]["release"] == "kps"
    # Each monitor selects its own Service only.
    for monitor in monitors.values():
        matched = [
            name
            for name, svc in services.items()
            if monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        ]
        assert matched == [monitor["metadata"]["name"]]
    (np,) = objs["NetworkPolicy"]
    (rule,) = [r for r in np["spec"]["ingress"] if any(p["port"] == 9095 for p in r["ports"])]
    assert rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    names = [r.name for r in rec if r.type.startswith("kubernetes:")]
    assert len(names) == len(set(names))


ACTIONS_TOKEN_FILE = "/etc/alertmanager/secrets/rlops-alertmanager/actions-token"


def _actions_file(**hook) -> dict:
    return {
        "route": {"receiver": "rlops-actions"},
        "receivers": [
            {
                "name": "rlops-actions",
                "webhook_configs": [
                    {
                        "url": "http://rlops-actions.rlops.svc.cluster.local:9095/alerts",
                        "http_config": {
                            "authorization": {
                                "type": "Bearer",
                                "credentials_file": ACTIONS_TOKEN_FILE,
                            }
                        },
                        **hook,
                    }
                ],
            }
        ],
    }


def test_alertmanager_posts_actions_to_the_stack_namespace() -> None:
    alerting = cfg.Alerting(secrets={"actions-token": "tok"})
    config = monitoring.alertmanager_config(_actions_file(), "am.yaml", alerting, "dev", "ml")
    (hook,) = config["receivers"][0]["webhook_configs"]
    assert hook["url"] == "http://rlops-actions.ml.svc.cluster.local:9095/alerts"
    assert monitoring.actions_token_file(config) == "actions-token"
    with pytest.raises(cfg.ConfigError) as err:
        monitoring.alertmanager_config(
            _actions_file(url="http://rlops-actions.rlops.svc:8080/hook", http_config={}),
            "am.yaml",
            alerting,
            "dev",
        )
    assert err.value.problems == [
        "am.yaml: receiver 'rlops-actions' posts to http://rlops-actions.rlops.svc:8080/hook; the actions "
        "webhook listens on port 9095, path /alerts",
        "am.yaml: receiver 'rlops-actions' posts to the actions webhook without a bearer token; it takes "
        "only authenticated requests: set http_config.authorization.credentials_file to a file in "
        "/etc/alertmanager/secrets/rlops-alertmanager/",
    ]
    # A stack that drops the actions receiver deploys no webhook.
    dropped = cfg.Alerting(receivers=[cfg.Receiver(name="rlops-actions", type="none")])
    assert (
        monitoring.actions_token_file(monitoring.alertmanager_config(_actions_file(), "a", dropped, "dev"))
        is None
    )


def test_serving_rollout_when_delivery_is_on() -> None:
    canary = serving.Canary((10, 50, 100), 120, "rlops-canary", "rlops-ope-gate", (("policy", "cartpole"),))
    objs = kinds(mocked(lambda: serving.Serving("serving", _serving_args(canary=canary))))
    assert "Deployment" not in objs
    (ro,) = objs["Rollout"]
    steps = ro["spec"]["strategy"]["canary"]["steps"]
    assert steps[0]["analysis"]["templates"] == [{"templateName": "rlops-ope-gate"}]
    assert [s["setWeight"] for s in steps if "setWeight" in s] == [10, 50, 100]
    assert ro["spec"]["strategy"]["canary"]["analysis"]["startingStep"] == 1
    assert objs["HorizontalPodAutoscaler"][0]["spec"]["scaleTargetRef"]["kind"] == "Rollout"


def test_monitoring_release_rules_dashboards_and_secrets() -> None:
    m = cfg.Monitoring()
    alerting = cfg.Alerting(
        secrets={"pagerduty-routing-key": "pd", "slack-webhook-url": "slack", "actions-token": "tok"}
    )
    args = monitoring.MonitoringArgs(
        m,
        alerting,
        "prod",
        {"grafanaAdminPassword": "pw", "pd": "k1", "slack": "k2", "tok": "k3"},
        FILES,
        adapter=True,
    )
    rec = mocked(lambda: monitoring.Monitoring("monitoring", args))
    charts = {r.inputs["chart"]: r.inputs for r in rec if r.type == "kubernetes:helm.sh/v3:Release"}
    kps = charts["kube-prometheus-stack"]
    assert kps["version"] == "88.5.3"
    assert kps["name"] == "kube-prometheus-stack"
    spec = kps["values"]["prometheus"]["prometheusSpec"]
    assert spec["ruleSelectorNilUsesHelmValues"]
    assert spec["serviceMonitorSelectorNilUsesHelmValues"]
    assert kps["values"]["grafana"]["sidecar"]["dashboards"]["label"] == "grafana_dashboard"
    assert kps["values"]["alertmanager"]["alertmanagerSpec"]["secrets"] == ["rlops-alertmanager"]
    assert charts["prometheus-adapter"]["values"]["rules"]["custom"][0]["name"]["as"] == serving.QUEUE_METRIC
    secrets = {r.inputs["metadata"]["name"]: r for r in rec if r.inputs.get("kind") == "Secret"}
    assert all(s.secret for s in secrets.values())
    assert secrets["rlops-alertmanager"].inputs["stringData"] == {
        "pagerduty-routing-key": "k1",
        "slack-webhook-url": "k2",
        "actions-token": "k3",
    }
    assert secrets["grafana-admin"].inputs["stringData"]["admin-password"] == "pw"
    rules = [r.inputs for r in rec if r.inputs.get("kind") == "PrometheusRule"]
    assert len(rules) == len(FILES.rule_files)
    assert all(r["metadata"]["labels"]["release"] == m.release_name for r in rules)


def test_alertmanager_overrides_and_local_addresses() -> None:
    file_config = {
        "route": {
            "receiver": "local",
            "routes": [{"receiver": "pager", "matchers": ['severity="critical"']}],
        },
        "receivers": [
            {"name": "local", "webhook_configs": [{"url": "http://127.0.0.1:9095/alerts"}]},
            {
                "name": "pager",
                "pagerduty_configs": [
                    {"routing_key_file": "/etc/alertmanager/secrets/rlops-alertmanager/pd"}
                ],
            },
        ],
    }
    with pytest.raises(cfg.ConfigError) as err:
        monitoring.alertmanager_config(file_config, "am.yaml", cfg.Alerting(secrets={"pd": "pd"}), "prod")
    assert err.value.problems == [
        "am.yaml: receiver 'local' posts to http://127.0.0.1:9095/alerts, an address of the local machine; "
        "override it in rlops:alerting.receivers (name 'local')"
    ]
    alerting = cfg.Alerting(
        receivers=[cfg.Receiver(name="local", type="webhook", url="http://actions.rlops.svc:9095/alerts")],
        secrets={"pd": "pd"},
    )
    merged = monitoring.alertmanager_config(file_config, "am.yaml", alerting, "prod")
    assert merged["receivers"][0] == {
        "name": "local",
        "webhook_configs": [{"url": "http://actions.rlops.svc:9095/alerts", "send_resolved": True}],
    }
    silenced = cfg.Alerting(receivers=[cfg.Receiver(name="pager", type="none"), *alerting.receivers])
    with pytest.raises(cfg.ConfigError, match="prod pages no one"):
        monitoring.alertmanager_config(file_config, "am.yaml", silenced, "prod")
    assert monitoring.alertmanager_config(file_config, "am.yaml", silenced, "dev")["receivers"][1] == {
        "name": "pager"
    }


def _delivery_args() -> delivery.DeliveryArgs:
    assert FILES.analysis is not None
    return delivery.DeliveryArgs(
        cfg.Delivery(enabled=True, inconclusive_limit=7),
        FILES.analysis,
        "rlops",
        "http://kps-prometheus.monitoring.svc:9090",
        IMAGE,
        "rlops-data",
        "rlops-models",
        "logs",
    )


def test_delivery_templates_follow_the_analysis_file() -> None:
    rec = mocked(lambda: delivery.Delivery("delivery", _delivery_args()))
    (release,) = [r.inputs for r in rec if r.type == "kubernetes:helm.sh/v3:Release"]
    assert (release["chart"], release["version"]) == ("argo-rollouts", "2.41.1")
    templates = {
        r.inputs["metadata"]["name"]: r.inputs for r in rec if r.inputs.get("kind") == "AnalysisTemplate"
    }
    canary = templates[delivery.CANARY_TEMPLATE]
    metrics = {m["name"]: m for m in canary["spec"]["metrics"]}
    assert set(metrics) == {c.name for c in FILES.analysis.checks} | {delivery.CHECK_METRIC}
    for check in FILES.analysis.checks:
        metric = metrics[check.name]
        assert metric["interval"] == FILES.analysis.interval
        assert metric["failureLimit"] == FILES.analysis.failure_limit
        assert metric["inconclusiveLimit"] == 7
        query = metric["provider"]["prometheus"]["query"]
        assert check.query in query
        assert check.min_samples_query in query
        assert "vector(NaN)" in query
        assert f"result[0] {check.comparison}" in metric["successCondition"]
    ope = templates[delivery.OPE_TEMPLATE]["spec"]["metrics"][0]["provider"]["job"]["spec"]
    command = ope["template"]["spec"]["containers"][0]["command"]
    assert command[:5] == ["rlops", "rollout", "ope-gate", "{{args.policy}}", "{{args.candidate}}"]
    assert ope["backoffLimit"] == 0
    mounts = {m["name"]: m for m in ope["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert (mounts["data"]["readOnly"], mounts["models"]["readOnly"]) == (True, True)


def _pod(metric: dict) -> tuple[dict, dict]:
    """(the pod spec, its one container) of a Job-provider metric."""
    pod = metric["provider"]["job"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_box_policies_are_checked_per_dimension_by_a_job_metric() -> None:
    """The canary template runs rlops rollout check as a Job beside the Prometheus checks: the analysis
    file's pace and failure limit, the registry read-only from the models volume, the file from a
    ConfigMap of its exact text."""
    args = _delivery_args()
    assert FILES.analysis is not None
    objects = {(o["kind"], o["metadata"]["name"]): o for o in delivery.objects(args)}
    canary = objects[("AnalysisTemplate", delivery.CANARY_TEMPLATE)]
    (metric,) = [m for m in canary["spec"]["metrics"] if m["name"] == delivery.CHECK_METRIC]
    assert (metric["interval"], metric["failureLimit"]) == (
        FILES.analysis.interval,
        FILES.analysis.failure_limit,
    )
    assert metric["inconclusiveLimit"] == 7
    assert "count" not in metric  # measured until the rollout ends
    job = metric["provider"]["job"]["spec"]
    assert job["backoffLimit"] == 0
    pod, container = _pod(metric)
    assert container["image"] == IMAGE
    assert container["command"][:6] == [
        "rlops", "rollout", "check", "{{args.policy}}", "{{args.candidate}}", "{{args.champion}}",
    ]  # fmt: skip
    flags = dict(zip(container["command"][6::2], container["command"][7::2], strict=True))
    assert flags["--prometheus-url"] == "http://kps-prometheus.monitoring.svc:9090"
    # (7 + 1) measurements of 15 s: as long as the Prometheus checks wait before pausing the rollout.
    assert flags["--wait-s"] == "120"
    assert job["activeDeadlineSeconds"] == 120 + delivery.CHECK_STARTUP_S
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    registry_mount = next(p for p in mounts if flags["--registry"].startswith(p + "/"))
    assert mounts[registry_mount]["readOnly"]
    assert volumes[mounts[registry_mount]["name"]]["persistentVolumeClaim"] == {
        "claimName": "rlops-models",
        "readOnly": True,
    }
    analysis_mount = next(p for p in mounts if flags["--analysis"].startswith(p + "/"))
    config_map = volumes[mounts[analysis_mount]["name"]]["configMap"]["name"]
    shipped = objects[("ConfigMap", config_map)]["data"][
        flags["--analysis"].removeprefix(analysis_mount + "/")
    ]
    assert shipped == FILES.analysis.text
    assert "data" not in volumes  # it reads Prometheus, not the logs
    # The OPE gate's Job is the same pod, with the logs' volume and more room to compute.
    ope = objects[("AnalysisTemplate", delivery.OPE_TEMPLATE)]["spec"]["metrics"][0]
    ope_pod, ope_container = _pod(ope)
    assert (ope_pod["securityContext"], ope_container["securityContext"]) == (
        pod["securityContext"],
        container["securityContext"],
    )
    assert ope_container["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert ope["provider"]["job"]["spec"]["activeDeadlineSeconds"] == 3600


def test_the_job_metric_is_named_after_the_check_the_local_rollout_adds() -> None:
    """The Job metric measures what rlops rollout measures beyond the file for Box policies."""
    from rlops_delivery import analysis

    spec = analysis.load(FILES_ROOT / "alerts/canary/analysis.yaml")
    box = {
        "action_space": {"type": "Box", "shape": [1], "low": [-1.0], "high": [1.0]},
        "reference": {"actions": {"bins": [{"edges": [0.0], "proportions": [0.5, 0.5]}]}},
    }
    added = analysis.beyond_prometheus(spec, analysis.for_policies(spec, box, box)[0])
    assert [c.name for c in added] == [delivery.CHECK_METRIC]


def _evaluate(condition: str, result: list[float]) -> bool:
    """The subset of Argo's expression language the conditions use, evaluated in Python."""
    expr = condition.replace("&&", " and ").replace("!isNaN", " not isNaN").replace("!(", " not (")
    return bool(eval(expr, {"len": len, "isNaN": math.isnan, "result": result}))


@pytest.mark.parametrize("check", FILES.analysis.checks if FILES.analysis else [], ids=lambda c: c.name)
def test_conditions_pass_fail_and_stay_inconclusive(check) -> None:
    success, failure = delivery.conditions(check)
    nudge = 1e-3 if check.comparison == "<=" else -1e-3
    good, bad = check.threshold - nudge, check.threshold + nudge
    assert _evaluate(success, [good])
    assert not _evaluate(failure, [good])
    assert _evaluate(failure, [bad])
    assert not _evaluate(success, [bad])
    for unknown in ([math.nan], []):
        assert not _evaluate(success, unknown)
        assert not _evaluate(failure, unknown)


def test_guarded_queries_are_valid_promql(tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make system installs prometheus)")
    assert FILES.analysis is not None
    rules = [
        {
            "record": f"rlops:canary_{re.sub(r'[^a-z0-9]', '_', c.name)}",
            "expr": delivery.guarded_query(c)
            .replace("{{args.policy}}", "cartpole")
            .replace("{{args.candidate}}", "2")
            .replace("{{args.champion}}", "1"),
        }
        for c in FILES.analysis.checks
    ]
    path = tmp_path / "guarded.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "guarded", "rules": rules}]}), encoding="utf-8")
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_online_training_runs_rlops_train_online_on_ray() -> None:
    job = cfg.TrainingJob(
        name="ppo",
        runner="ray",
        algorithm="online",
        config="online/cartpole-ppo.yaml",
        out="runs/ppo",
        ray_workers=2,
    )
    args = training.TrainingArgs(cfg.Training(jobs=[job]), RAY, "rlops", IMAGE, "rlops-data", "rlops-models")
    (rj,) = kinds(mocked(lambda: training.Training("training", args)))["RayJob"]
    assert rj["spec"]["entrypoint"] == (
        "rlops train online --config /opt/rlops-configs/online/cartpole-ppo.yaml --out /mnt/models/runs/ppo "
        "--no-progress"
    )
    with pytest.raises(ValueError, match="online training runs on Ray"):
        cfg.TrainingJob(name="x", runner="job", algorithm="online", config="online/a.yaml", out="runs/x")
    with pytest.raises(ValueError, match="takes 'data'"):
        cfg.TrainingJob(name="x", runner="job", algorithm="cql", config="online/a.yaml", out="runs/x")


def test_td3bc_jobs_train_box_data_in_a_job() -> None:
    job = cfg.TrainingJob(name="td3bc", runner="job", algorithm="td3bc", data="p.parquet", out="runs/x")
    args = training.TrainingArgs(cfg.Training(jobs=[job]), RAY, "rlops", IMAGE, "rlops-data", "rlops-models")
    (batch_job,) = kinds(mocked(lambda: training.Training("training", args)))["Job"]
    command = " ".join(batch_job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert command.startswith("rlops train td3bc --data /mnt/data/p.parquet")
    with pytest.raises(ValueError, match="td3bc trains Box-action data, which Ray Train does not take"):
        cfg.TrainingJob(name="x", runner="ray", algorithm="td3bc", data="p.parquet", out="runs/x")
    assert cfg.Loop(algorithm="td3bc").algorithm == "td3bc"
