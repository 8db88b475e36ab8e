"""The Helm chart helm/dspark, on `helm template` output: one behaviour per test. The helm binary (v3.17.2) comes from
deploy/helm/helm-bin.sh (fetched once into DSPARK_HOME/tools/bin); every rendering of the values matrix is validated
with kubernetes-validate --strict against Kubernetes 1.30, and the 1.20 renderings are checked for the fallbacks.
`kubectl apply --dry-run=server` against a real 1.20 server is tests/test_deploy_cluster.py's part."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[1]
CHART = ROOT / "helm" / "dspark"
MONITORING = ("monitoring.coreos.com/v1/ServiceMonitor", "monitoring.coreos.com/v1/PodMonitor")
MONITORING += ("monitoring.coreos.com/v1/PrometheusRule",)
RAY = "ray.io/v1/RayService"
# what a Kubernetes 1.20 API server serves of the kinds the chart renders
API_1_20 = {"v1", "apps/v1", "policy/v1beta1", "networking.k8s.io/v1"}

sys.path.insert(0, str(ROOT / "deploy" / "helm"))
import values_table  # noqa: E402


@pytest.fixture(scope="session")
def helm() -> str:
    out = subprocess.run(["bash", str(ROOT / "deploy" / "helm" / "helm-bin.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(Path(out.stdout.strip().splitlines()[-1]) / "helm")


def _set_args(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set-json", f"{k}={json.dumps(v)}")]


@functools.cache
def _template(helm: str, values: str, kube: str, apis: tuple[str, ...], files: tuple[str, ...]) -> str:
    cmd = [helm, "template", "dspark", str(CHART), "--namespace", "serving", "--kube-version", kube]
    cmd += [a for api in apis for a in ("--api-versions", api)] + [a for f in files for a in ("-f", f)]
    cmd += _set_args(json.loads(values))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return out.stdout


def render(helm, values=None, kube="1.30.0", apis=(), files=()) -> list[dict]:
    text = _template(helm, json.dumps(values or {}, sort_keys=True), kube, tuple(apis), tuple(files))
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(docs, kind) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs, kind, name) -> dict:
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def pod_specs(docs) -> list[dict]:
    specs = [d["spec"]["template"]["spec"] for d in of_kind(docs, "Deployment")]
    return specs + [d["spec"] for d in of_kind(docs, "Pod")]


def containers(docs, init=True) -> list[dict]:
    return [c for s in pod_specs(docs) for c in s["containers"] + (s.get("initContainers", []) if init else [])]


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def serve_config(docs) -> dict:
    return yaml.safe_load(named(docs, "ConfigMap", "dspark-router-serve")["data"]["serve.yaml"])


EVERYTHING = {
    "otel.endpoint": "http://collector:4317",
    "apiKey.value": "s3cret",
    "ingress.enabled": True,
    "router.discovery": "dns",
}
MATRIX = {
    "defaults": {},
    "everything on": EVERYTHING,
    "no draft, pvc": {"draft.enabled": False, "model.volume.type": "pvc", "model.volume.claimName": "models"},
    "policies and pdbs off": {"networkPolicy.enabled": False, "pdb.enabled": False, "serviceAccount.create": False},
    "existing secret, 3 verifiers": {"apiKey.existingSecret": "mine", "verifier.replicaCount": 3},
    "gpu pools": {
        "verifier.resources": {"limits": {"nvidia.com/gpu": 1}},
        "verifier.nodeSelector": {"pool": "large"},
        "draft.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "draft.affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["cheap"]}]}
                    ]
                }
            }
        },
    },
}


@pytest.mark.parametrize("case", MATRIX)
def test_every_rendering_of_the_values_matrix_is_valid_kubernetes_1_30(helm, case):
    for doc in render(helm, MATRIX[case], apis=MONITORING):
        if doc["apiVersion"].startswith("monitoring.coreos.com"):
            continue  # CRDs: no schema in kubernetes-validate
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_the_local_cluster_values_render_valid_kubernetes(helm):
    files = [str(CHART / "ci" / "local-cluster-values.yaml")]
    for doc in render(helm, files=files):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


@pytest.mark.parametrize("case", MATRIX)
def test_every_rendering_for_1_20_uses_only_api_versions_a_1_20_server_serves(helm, case):
    docs = render(helm, MATRIX[case], kube="1.20.2")
    assert {d["apiVersion"] for d in docs} <= API_1_20
    assert not any("grpc" in c.get(p, {}) for c in containers(docs) for p in ("readinessProbe", "livenessProbe"))


def test_helm_lint_passes_with_defaults_and_with_everything_on(helm):
    for extra in ([], _set_args(EVERYTHING)):
        out = subprocess.run([helm, "lint", str(CHART), "--strict", *extra], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


def test_a_wrong_value_type_is_refused_by_the_schema(helm):
    with pytest.raises(RuntimeError, match=r"verifier.replicaCount: Invalid type. Expected: integer"):
        render(helm, {"verifier.replicaCount": "two"})


def test_an_unknown_policy_or_key_is_refused_by_the_schema(helm):
    with pytest.raises(RuntimeError, match="router.policy must be one of"):
        render(helm, {"router.policy": "fastest"})
    with pytest.raises(RuntimeError, match="Additional property replicas is not allowed"):
        render(helm, {"draft.replicas": 2})


def test_a_pvc_model_volume_without_a_claim_name_is_an_error(helm):
    with pytest.raises(RuntimeError, match="model.volume.claimName is required"):
        render(helm, {"model.volume.type": "pvc"})


def test_renders_no_otel_variables_when_otel_endpoint_is_empty(helm):
    assert not [n for c in containers(render(helm)) for n in env_of(c) if n.startswith("OTEL_")]


def test_renders_the_otel_variables_in_every_service_container_when_an_endpoint_is_set(helm):
    docs = render(helm, {"otel.endpoint": "http://collector:4317", "otel.samplingRatio": 0.25})
    for c in containers(docs, init=False):
        if c["name"] == "generate":
            continue
        env = env_of(c)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
        assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == ("parentbased_traceidratio", "0.25")
        assert env["OTEL_SERVICE_NAME"] == f"dspark-{c['name']}"


def test_drops_all_capabilities_in_every_container(helm):
    for c in containers(render(helm, EVERYTHING)):
        sc = c["securityContext"]
        assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False, c["name"]


def test_every_container_has_a_read_only_root_filesystem_and_a_writable_tmp(helm):
    for c in containers(render(helm)):
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]


def test_every_pod_runs_as_non_root_with_the_runtime_default_seccomp_profile_and_no_token(helm):
    for spec in pod_specs(render(helm)):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False


def test_every_service_container_has_startup_readiness_and_liveness_probes(helm):
    for c in containers(render(helm), init=False):
        if c["name"] != "generate":
            assert {"startupProbe", "readinessProbe", "livenessProbe"} <= c.keys(), c["name"]


def test_probes_are_native_grpc_from_1_24_and_exec_dspark_health_before(helm):
    new = named(render(helm, kube="1.24.0"), "Deployment", "dspark-verifier")["spec"]["template"]["spec"]
    old = named(render(helm, kube="1.20.2"), "Deployment", "dspark-verifier")["spec"]["template"]["spec"]
    assert new["containers"][0]["readinessProbe"]["grpc"] == {"port": 50061}
    assert old["containers"][0]["readinessProbe"]["exec"]["command"][:3] == ["dspark", "health", "127.0.0.1:50061"]


def test_the_startup_probe_allows_ten_minutes_for_model_loading(helm):
    for c in containers(render(helm), init=False):
        if c["name"] != "generate":
            p = c["startupProbe"]
            assert p["periodSeconds"] * p["failureThreshold"] >= 600, c["name"]


def test_pdbs_are_policy_v1_on_1_30_and_fall_back_to_v1beta1_on_1_20(helm):
    assert {d["apiVersion"] for d in of_kind(render(helm), "PodDisruptionBudget")} == {"policy/v1"}
    old = of_kind(render(helm, kube="1.20.2"), "PodDisruptionBudget")
    assert {d["apiVersion"] for d in old} == {"policy/v1beta1"}
    assert sorted(d["metadata"]["name"] for d in old) == ["dspark-draft", "dspark-router", "dspark-verifier"]


def test_rolling_updates_never_take_a_pod_down_before_its_successor_is_ready(helm):
    for d in of_kind(render(helm), "Deployment"):
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_grace_period_outlasts_prestop_and_the_services_drain(helm):
    docs = render(helm)
    for d in of_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        c = spec["containers"][0]
        sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        drain = next((float(a.split("=")[1]) for a in c["args"] if a.startswith("--drain=")), 0)
        assert spec["terminationGracePeriodSeconds"] > sleep + drain, d["metadata"]["name"]


def test_each_tier_has_a_clusterip_service_and_a_headless_one(helm):
    docs = render(helm)
    for tier in ("verifier", "draft"):
        assert named(docs, "Service", f"dspark-{tier}")["spec"]["type"] == "ClusterIP"
        assert named(docs, "Service", f"dspark-{tier}-headless")["spec"]["clusterIP"] == "None"


def test_the_router_finds_the_tiers_by_the_service_variables_kubernetes_injects(helm):
    from dspark.router.serve import read_serve_config

    docs = render(helm)
    env = {}  # what the kubelet puts in a pod for each Service: <NAME>_SERVICE_HOST, <NAME>_SERVICE_PORT_<PORT>
    for i, s in enumerate(d for d in of_kind(docs, "Service") if d["spec"].get("clusterIP") != "None"):
        prefix = s["metadata"]["name"].upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"] = f"10.96.0.{i + 10}"
        env |= {f"{prefix}_SERVICE_PORT_{p['name'].upper()}": str(p["port"]) for p in s["spec"]["ports"]}
    text = named(docs, "ConfigMap", "dspark-router-serve")["data"]["serve.yaml"]
    args = read_serve_config(text, env).args
    assert args["verifier"] == f"{env['DSPARK_VERIFIER_SERVICE_HOST']}:50061"
    assert args["draft"] == f"{env['DSPARK_DRAFT_SERVICE_HOST']}:50062"
    router = named(docs, "Deployment", "dspark-router")["spec"]["template"]["spec"]
    assert router["enableServiceLinks"] is True


def test_discovery_dns_names_the_tiers_by_their_service_dns_names(helm):
    args = serve_config(render(helm, {"router.discovery": "dns"}))["applications"][0]["args"]
    assert args["verifier"] == "dspark-verifier.serving.svc.cluster.local:50061"
    assert args["draft"] == "dspark-draft.serving.svc.cluster.local:50062"


def test_the_serve_config_carries_policy_queue_and_serve_autoscaling_from_values(helm):
    from dspark.router.app import DSparkRouter, RouterArgs

    values = {"router.policy": "fixed", "router.maxQueue": 64, "router.serve.autoscaling.maxReplicas": 3}
    values["router.maxRequestBytes"] = 65536
    app = serve_config(render(helm, values))["applications"][0]
    args = RouterArgs(**app["args"])
    assert (app["args"]["policy"], app["args"]["max_queue"]) == ("fixed", 64)
    assert args.config().max_request_bytes == 65536
    (dep,) = app["deployments"]
    assert dep["autoscaling_config"]["max_replicas"] == 3
    DSparkRouter.options(**{k: v for k, v in dep.items() if k != "name"})


def test_without_the_draft_tier_the_router_decodes_plainly_and_no_draft_object_renders(helm):
    docs = render(helm, {"draft.enabled": False})
    assert not [d for d in docs if d["metadata"]["name"].startswith("dspark-draft")]
    assert serve_config(docs)["applications"][0]["args"]["draft"] is None


def test_a_changed_serve_config_rolls_the_router_pods(helm):
    def checksum(values):
        d = named(render(helm, values), "Deployment", "dspark-router")
        return d["spec"]["template"]["metadata"]["annotations"]["checksum/serve-config"]

    assert checksum({}) != checksum({"router.maxQueue": 10})


def test_the_router_pod_has_memory_backed_shm_and_a_writable_tmp_for_ray(helm):
    spec = named(render(helm), "Deployment", "dspark-router")["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "sizeLimit" in vols[mounts["/tmp"]]["emptyDir"]


def test_the_init_container_prepares_the_model_into_the_volume_the_service_reads(helm):
    for spec in pod_specs(render(helm, {"model.name": "gemma3-270m"}))[:3]:
        (init,) = spec["initContainers"]
        assert init["args"] == ["models", "--prepare", "gemma3-270m"]
        home = env_of(init)["DSPARK_HOME"]
        assert env_of(spec["containers"][0])["DSPARK_HOME"] == home
        assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}[home] == "model"


def test_the_containers_pass_only_flags_the_dspark_command_has(helm, monkeypatch):
    from dspark import cli

    seen = []
    monkeypatch.setattr(cli, "cmd_serve", lambda a: seen.append(a) or 0)
    monkeypatch.setattr(cli, "cmd_models", lambda a: seen.append(a) or 0)
    for c in containers(render(helm, EVERYTHING)):
        if c["name"] != "generate":
            assert cli.main(c["args"]) == 0, c["args"]
    assert sorted(getattr(a, "service", "models") for a in seen) == ["draft", "models", "models", "models"] + [
        "router",
        "verifier",
    ]


def test_the_tiers_take_their_resources_and_scheduling_from_their_own_values(helm):
    docs = render(helm, MATRIX["gpu pools"])
    verifier = named(docs, "Deployment", "dspark-verifier")["spec"]["template"]["spec"]
    draft = named(docs, "Deployment", "dspark-draft")["spec"]["template"]["spec"]
    assert verifier["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert verifier["nodeSelector"] == {"pool": "large"} and "nodeSelector" not in draft
    assert draft["tolerations"][0]["key"] == "nvidia.com/gpu" and "affinity" in draft


def test_network_policies_let_only_router_pods_reach_draft_and_verifier(helm):
    docs = render(helm)
    router_labels = named(docs, "Deployment", "dspark-router")["spec"]["selector"]["matchLabels"]
    for tier in ("verifier", "draft"):
        policy = named(docs, "NetworkPolicy", f"dspark-{tier}")["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        grpc_rule, metrics_rule = policy["ingress"]
        assert grpc_rule["from"] == [{"podSelector": {"matchLabels": router_labels}}]
        assert grpc_rule["ports"] == [{"port": "grpc"}]
        assert "namespaceSelector" in metrics_rule["from"][0] and metrics_rule["ports"] == [{"port": "metrics"}]
    assert not of_kind(render(helm, {"networkPolicy.enabled": False}), "NetworkPolicy")


def test_the_router_accepts_the_configured_namespaces_and_the_test_pod(helm):
    docs = render(helm, {"networkPolicy.routerFromNamespaces": [{"matchLabels": {"team": "web"}}]})
    (rule,) = named(docs, "NetworkPolicy", "dspark-router")["spec"]["ingress"]
    test_pod = of_kind(docs, "Pod")[0]["metadata"]["labels"]
    assert {"namespaceSelector": {"matchLabels": {"team": "web"}}} in rule["from"]
    selectors = [f["podSelector"]["matchLabels"] for f in rule["from"] if "podSelector" in f]
    assert all(test_pod[k] == v for k, v in selectors[0].items())


def test_the_api_key_comes_from_the_chart_secret_or_an_existing_one(helm):
    docs = render(helm, {"apiKey.value": "s3cret"})
    secret = named(docs, "Secret", "dspark-api-key")
    router = named(docs, "Deployment", "dspark-router")["spec"]["template"]["spec"]["containers"][0]
    ref = env_of(router)["DSPARK_API_KEY"]["secretKeyRef"]
    assert ref["name"] == "dspark-api-key" and secret["data"][ref["key"]] == "czNjcmV0"
    docs = render(helm, {"apiKey.existingSecret": "theirs"})
    assert not of_kind(docs, "Secret")
    router = named(docs, "Deployment", "dspark-router")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(router)["DSPARK_API_KEY"]["secretKeyRef"]["name"] == "theirs"
    assert "DSPARK_API_KEY" not in env_of(
        named(render(helm), "Deployment", "dspark-router")["spec"]["template"]["spec"]["containers"][0]
    )


def test_monitoring_objects_render_only_when_their_crds_exist(helm):
    kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not kinds & {d["kind"] for d in render(helm)}
    assert kinds <= {d["kind"] for d in render(helm, apis=MONITORING)}
    assert not kinds & {
        d["kind"]
        for d in render(
            helm,
            {
                "metrics.serviceMonitor.enabled": False,
                "metrics.podMonitor.enabled": False,
                "metrics.prometheusRule.enabled": False,
            },
            apis=MONITORING,
        )
    }


def test_the_rayservice_renders_only_with_its_crd_and_then_replaces_the_router_deployment(helm):
    on = {"router.rayService.enabled": True}
    assert not of_kind(render(helm, on), "RayService")
    docs = render(helm, on, apis=[RAY])
    (ray,) = of_kind(docs, "RayService")
    assert "dspark-router" not in {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    config = yaml.safe_load(ray["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["verifier"] == "dspark-verifier.serving.svc.cluster.local:50061"
    head = ray["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert named(docs, "Service", "dspark-router")["spec"]["selector"] == head


def _promql_metrics(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(dspark_[a-z_]+)\b", expr)}


def _exported() -> set[str]:
    from prometheus_client import REGISTRY

    import dspark.serving.metrics  # noqa: F401 - registers them

    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("dspark_"):
            names |= {s.name for s in family.samples} | {family.name}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
    return names


def test_the_dashboard_and_the_alerts_query_only_metrics_the_services_export(helm):
    docs = render(helm, apis=MONITORING)
    dashboard = json.loads(named(docs, "ConfigMap", "dspark-dashboard")["data"]["dspark.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [r["expr"] for g in of_kind(docs, "PrometheusRule")[0]["spec"]["groups"] for r in g["rules"]]
    used = set().union(*map(_promql_metrics, exprs))
    assert used and used <= _exported(), used - _exported()


def test_the_dashboard_has_the_speculative_panels(helm):
    dashboard = json.loads((CHART / "dashboards" / "dspark.json").read_text())
    titles = " / ".join(p["title"] for p in dashboard["panels"]).lower()
    for panel in ("tau", "acceptance per draft position", "budget per round", "phase latency", "queue", "sessions"):
        assert panel in titles


def test_the_helm_test_pod_calls_generate_through_the_router_service(helm):
    (pod,) = of_kind(render(helm), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    assert c["command"][:2] == ["python", "-c"] and "stats" in c["command"][2]
    assert c["command"][3] == "$(DSPARK_ROUTER_SERVICE_HOST):$(DSPARK_ROUTER_SERVICE_PORT_GRPC)"


def test_every_value_has_a_comment(helm):
    assert values_table.missing_comments((CHART / "values.yaml").read_text()) == []


def test_the_readme_values_table_matches_values_yaml():
    readme = (CHART / "README.md").read_text()
    assert values_table.readme_with_table(readme, (CHART / "values.yaml").read_text()) == readme, "run make helm-docs"


def test_templates_are_named_kind_dash_component():
    kinds = r"(deployment|service|configmap|secret|serviceaccount|poddisruptionbudget|networkpolicy|servicemonitor"
    kinds += r"|podmonitor|prometheusrule|rayservice|ingress|hpa|scaledobject|rbac)"
    for path in (CHART / "templates").glob("*.yaml"):
        assert re.fullmatch(kinds + r"(-[a-z]+)?\.yaml", path.name), path.name
    assert os.path.exists(CHART / "templates" / "_helpers.tpl")
