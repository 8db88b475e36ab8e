"""The chart's autoscaling and discovery objects, on `helm template` output: HPAs per tier (autoscaling/v2, v2beta2
before 1.23), KEDA ScaledObjects when their CRD exists, the prometheus-adapter rules ConfigMap, and the router's RBAC
for discovery `kubernetes`. The scaling of a real cluster is not tested here (see the report of issue 14)."""

from __future__ import annotations

import kubernetes_validate
import pytest
import test_helm_chart
import yaml
from test_helm_chart import (
    API_1_20,
    _exported,
    _promql_metrics,
    named,
    of_kind,
    pod_specs,
    render,
    serve_config,
)

from dspark.router.discovery import service_ref

helm = test_helm_chart.helm  # the session fixture: the pinned helm binary
KEDA = "keda.sh/v1alpha1/ScaledObject"
ALL_ON = {f"{t}.autoscaling.enabled": True for t in ("verifier", "draft", "router")}
SCALED = {**ALL_ON, "router.discovery": "kubernetes", "autoscaling.prometheusAdapter.rules": True}


def hpa(docs, component) -> dict:
    return named(docs, "HorizontalPodAutoscaler", f"dspark-{component}")


def metric_names(h) -> dict[str, str]:
    return {m[m["type"].lower()]["metric"]["name"]: m["type"] for m in h["spec"]["metrics"]}


def test_no_autoscaler_renders_by_default(helm):
    docs = render(helm, apis=[KEDA])
    assert not of_kind(docs, "HorizontalPodAutoscaler") and not of_kind(docs, "ScaledObject")
    assert not [d for d in of_kind(docs, "ConfigMap") if "prometheus-adapter" in d["metadata"]["name"]]


def test_every_tier_gets_a_valid_autoscaling_v2_hpa_on_1_30(helm):
    docs = render(helm, SCALED)
    assert {d["metadata"]["name"] for d in of_kind(docs, "HorizontalPodAutoscaler")} == {
        "dspark-verifier",
        "dspark-draft",
        "dspark-router",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    for component in ("verifier", "draft", "router"):
        h = hpa(docs, component)
        assert h["apiVersion"] == "autoscaling/v2"
        assert h["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": f"dspark-{component}",
        }


def test_a_1_20_server_gets_v2beta2_hpas_and_only_api_versions_it_serves(helm):
    """helm template's default API list has autoscaling/v2 whatever --kube-version says: the version decides."""
    docs = render(helm, SCALED, kube="1.20.2")
    assert {d["apiVersion"] for d in of_kind(docs, "HorizontalPodAutoscaler")} == {"autoscaling/v2beta2"}
    assert {d["apiVersion"] for d in docs} <= API_1_20 | {"autoscaling/v2beta2", "rbac.authorization.k8s.io/v1"}
    assert hpa(render(helm, SCALED, kube="1.23.0"), "verifier")["apiVersion"] == "autoscaling/v2"


def test_the_hpas_scale_on_the_speculative_tiers_own_signals(helm):
    docs = render(helm, SCALED)
    assert metric_names(hpa(docs, "verifier")) == {
        "dspark_verifier_sessions": "Pods",
        "dspark_verifier_kv_usage": "Pods",
        "dspark_router_queue_depth": "External",
    }
    assert metric_names(hpa(docs, "draft")) == {"dspark_draft_sessions": "Pods", "dspark_draft_round_seconds": "Pods"}
    assert metric_names(hpa(docs, "router")) == {"dspark_router_ongoing_requests": "Pods"}
    targets = {
        m["pods"]["metric"]["name"]: m["pods"]["target"]
        for m in hpa(docs, "verifier")["spec"]["metrics"]
        if "pods" in m
    }
    assert targets["dspark_verifier_sessions"] == {"type": "AverageValue", "averageValue": "6"}
    assert targets["dspark_verifier_kv_usage"] == {"type": "AverageValue", "averageValue": "0.8"}


def test_targets_bounds_and_behavior_come_from_values_and_a_zero_target_drops_its_signal(helm):
    behavior = {
        "scaleUp": {"stabilizationWindowSeconds": 5, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 10}]}
    }
    values = {
        "verifier.autoscaling.enabled": True,
        "verifier.autoscaling.minReplicas": 2,
        "verifier.autoscaling.maxReplicas": 7,
        "verifier.autoscaling.targetKvUsage": 0,
        "verifier.autoscaling.targetSessions": 0,
        "verifier.autoscaling.targetQueueDepth": 3,
        "verifier.autoscaling.behavior": behavior,
    }
    h = hpa(render(helm, values), "verifier")
    assert (h["spec"]["minReplicas"], h["spec"]["maxReplicas"]) == (2, 7)
    assert h["spec"]["behavior"]["scaleUp"] == behavior["scaleUp"]  # scaleDown: the default, merged in
    (m,) = h["spec"]["metrics"]
    assert m == {
        "type": "External",
        "external": {
            "metric": {"name": "dspark_router_queue_depth"},
            "target": {"type": "AverageValue", "averageValue": "3"},
        },
    }


def test_an_hpa_with_every_target_zero_or_inverted_bounds_is_an_error(helm):
    zero = {"draft.autoscaling.enabled": True, "draft.autoscaling.targetSessions": 0}
    with pytest.raises(RuntimeError, match="draft.autoscaling: every target is 0"):
        render(helm, {**zero, "draft.autoscaling.targetRoundSeconds": 0})
    with pytest.raises(RuntimeError, match="maxReplicas is below minReplicas"):
        render(
            helm,
            {
                "router.autoscaling.enabled": True,
                "router.autoscaling.minReplicas": 3,
                "router.autoscaling.maxReplicas": 2,
            },
        )


def test_a_scaled_deployment_leaves_its_replica_count_to_the_autoscaler(helm):
    docs = render(helm, {"verifier.autoscaling.enabled": True, "verifier.replicaCount": 3, "draft.replicaCount": 2})
    assert "replicas" not in named(docs, "Deployment", "dspark-verifier")["spec"]
    assert named(docs, "Deployment", "dspark-draft")["spec"]["replicas"] == 2


def test_without_the_draft_tier_no_draft_autoscaler_renders(helm):
    docs = render(helm, {**ALL_ON, "draft.enabled": False}, apis=[KEDA])
    assert {d["metadata"]["name"] for d in of_kind(docs, "HorizontalPodAutoscaler")} == {
        "dspark-verifier",
        "dspark-router",
    }


def test_keda_scaledobjects_replace_the_hpas_only_where_the_crd_exists(helm):
    values = {**ALL_ON, "autoscaling.keda.enabled": True}
    assert not of_kind(render(helm, values), "ScaledObject")  # no CRD: the HPAs stay
    docs = render(helm, values, apis=[KEDA])
    assert not of_kind(docs, "HorizontalPodAutoscaler")
    so = named(docs, "ScaledObject", "dspark-verifier")
    assert so["spec"]["scaleTargetRef"] == {"name": "dspark-verifier"}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 4)
    assert (
        so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        == 300
    )
    triggers = {t["name"]: t for t in so["spec"]["triggers"]}
    assert set(triggers) == {"dspark_verifier_sessions", "dspark_verifier_kv_usage", "dspark_router_queue_depth"}
    assert triggers["dspark_verifier_kv_usage"]["metricType"] == "Value"  # a ratio of the tier, not a per-pod sum
    assert triggers["dspark_verifier_sessions"]["metricType"] == "AverageValue"
    assert triggers["dspark_verifier_sessions"]["metadata"]["threshold"] == "6"
    assert 'pod=~"dspark-verifier-.*"' in triggers["dspark_verifier_sessions"]["metadata"]["query"]
    assert 'namespace="serving"' in triggers["dspark_router_queue_depth"]["metadata"]["query"]


def test_keda_triggers_and_adapter_rules_query_only_metrics_the_services_export(helm):
    docs = render(helm, {**SCALED, "autoscaling.keda.enabled": True}, apis=[KEDA])
    exprs = [t["metadata"]["query"] for so in of_kind(docs, "ScaledObject") for t in so["spec"]["triggers"]]
    config = yaml.safe_load(named(docs, "ConfigMap", "dspark-prometheus-adapter")["data"]["config.yaml"])
    rules = config["rules"] + config["externalRules"]
    exprs += [r["seriesQuery"] for r in rules] + [r["metricsQuery"] for r in rules]
    used = set().union(*map(_promql_metrics, exprs))
    assert used and used <= _exported(), used - _exported()


def test_the_adapter_rules_serve_exactly_the_metrics_the_hpas_ask_for(helm):
    docs = render(helm, SCALED)
    config = yaml.safe_load(named(docs, "ConfigMap", "dspark-prometheus-adapter")["data"]["config.yaml"])
    pods = {r["name"]["as"] for r in config["rules"]}
    external = {r["name"]["as"] for r in config["externalRules"]}
    asked = {}
    for h in of_kind(docs, "HorizontalPodAutoscaler"):
        asked |= metric_names(h)
    assert pods == {n for n, t in asked.items() if t == "Pods"}
    assert external == {n for n, t in asked.items() if t == "External"}
    for r in config["rules"]:
        assert r["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        assert "<<.LabelMatchers>>" in r["metricsQuery"]


def test_discovery_kubernetes_gives_the_router_a_role_to_watch_endpoints_and_only_it_a_token(helm):
    docs = render(helm, {"router.discovery": "kubernetes"})
    (role,) = of_kind(docs, "Role")
    assert {"apiGroups": [""], "resources": ["endpoints"], "verbs": ["get", "list", "watch"]} in role["rules"]
    assert all(set(r["verbs"]) == {"get", "list", "watch"} for r in role["rules"])
    (binding,) = of_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "dspark-router", "namespace": "serving"}]
    assert named(docs, "ServiceAccount", "dspark-router")
    router = named(docs, "Deployment", "dspark-router")["spec"]["template"]["spec"]
    assert router["serviceAccountName"] == "dspark-router" and router["automountServiceAccountToken"] is True
    others = [s for s in pod_specs(docs) if s is not router]
    assert others and all(s["automountServiceAccountToken"] is False for s in others)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_discovery_kubernetes_points_the_router_at_the_headless_services_grpc_port(helm):
    docs = render(helm, {"router.discovery": "kubernetes"})
    args = serve_config(docs)["applications"][0]["args"]
    for tier in ("verifier", "draft"):
        ref = service_ref(args[tier])
        svc = named(docs, "Service", ref.name)
        assert ref.namespace == "serving" and svc["spec"]["clusterIP"] == "None"
        assert ref.name == f"dspark-{tier}-headless" and ref.port in {p["name"] for p in svc["spec"]["ports"]}


def test_other_discovery_modes_render_no_rbac(helm):
    for mode in ("env", "dns"):
        docs = render(helm, {"router.discovery": mode})
        assert not of_kind(docs, "Role") and not of_kind(docs, "RoleBinding")


@pytest.mark.parametrize(
    "values",
    [
        {"router.discovery": "consul"},
        {"verifier.autoscaling.targetKvUsage": 1.5},
        {"draft.autoscaling.minReplicas": 0},
        {"router.autoscaling.targetRps": 3},
        {"autoscaling.keda.prometheusAddress": "prometheus:9090"},
    ],
)
def test_bad_autoscaling_values_are_refused_by_the_schema(helm, values):
    with pytest.raises(RuntimeError, match="values don't meet the specifications of the schema"):
        render(helm, values)
