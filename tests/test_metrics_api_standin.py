"""The test scaffolding tests/metrics_api_standin.py (prometheus-adapter's stand-in) running the chart's own
prometheus-adapter rules against a real Prometheus (Debian's `prometheus` package) that scrapes real dspark metrics
exporters (the product's prometheus_client objects in five processes, labelled as pods are in a cluster): the
custom and external metrics API answers are what an HPA reads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import test_helm_chart
import yaml
from metrics_api_standin import CUSTOM, EXTERNAL, MetricsApi, Prometheus, load_rules, quantity, serve
from test_helm_chart import named, render

from dspark.stack.port import free_port

helm = test_helm_chart.helm  # the session fixture: the pinned helm binary
ROOT = Path(__file__).parents[1]

EXPORTER = textwrap.dedent(
    """
    import sys, time
    from dspark.serving import metrics
    port, role, n = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    if role == "verifier":
        metrics.SESSIONS.labels("verifier").set(n)
        metrics.MAX_SESSIONS.labels("verifier").set(8)
        metrics.KV_TOKENS.set(100 * n)
        metrics.KV_CAPACITY.set(1000)
    else:
        metrics.QUEUE_DEPTH.set(n)
        metrics.RUNNING.set(2 * n)
    metrics.start_exporter(port)
    print("ready", flush=True)
    time.sleep(3600)
    """
)
# (namespace, pod, role, value): two verifier pods and two router pods of the release, one router elsewhere
PODS = [
    ("serving", "dspark-verifier-6d9f-a", "verifier", 2),
    ("serving", "dspark-verifier-6d9f-b", "verifier", 5),
    ("serving", "dspark-router-77c4-x", "router", 3),
    ("serving", "dspark-router-77c4-y", "router", 4),
    ("other", "dspark-router-1234-z", "router", 50),
]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """A real Prometheus scraping five exporter processes every second; its URL once every target is up."""
    out = subprocess.run(
        ["bash", str(ROOT / "deploy" / "autoscaling" / "prometheus-bin.sh")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr  # Debian's prometheus, apt-installed once
    binary = out.stdout.strip().splitlines()[-1]
    tmp = tmp_path_factory.mktemp("prometheus")
    procs, targets = [], []
    try:
        for ns, pod, role, n in PODS:
            port = free_port()
            p = subprocess.Popen(
                [sys.executable, "-c", EXPORTER, str(port), role, str(n)], stdout=subprocess.PIPE, text=True
            )
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"
            targets.append({"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": ns, "pod": pod}})
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "dspark", "static_configs": targets}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        url = f"http://127.0.0.1:{port}"
        prom = Prometheus(url)
        deadline = time.monotonic() + 60
        while True:
            try:
                up = prom.query("up == 1")
                if len(up) == len(PODS) and prom.query("dspark_queue_depth") and prom.query("dspark_sessions"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not scrape every exporter within 60 s"
            time.sleep(0.5)
        yield url
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


@pytest.fixture(scope="module")
def api(helm, prometheus):
    docs = render(helm, {"autoscaling.prometheusAdapter.rules": True})
    rules = load_rules(named(docs, "ConfigMap", "dspark-prometheus-adapter")["data"]["config.yaml"])
    by_selector = {
        "app.kubernetes.io/component=verifier": [p for _, p, role, _ in PODS[:2]],
        "app.kubernetes.io/component=router": [p for ns, p, role, _ in PODS if role == "router" and ns == "serving"],
    }

    def pods_of(namespace: str, selector: dict[str, str]) -> list[str]:
        return by_selector[",".join(f"{k}={v}" for k, v in selector.items())]

    return MetricsApi(Prometheus(prometheus), rules, pods_of)


SELECT_VERIFIER = {"labelSelector": "app.kubernetes.io/component=verifier"}


def values(body) -> dict[str, str]:
    return {i["describedObject"]["name"]: i["value"] for i in body["items"]}


def pods_metric(api, metric, component):
    path = f"/apis/{CUSTOM}/namespaces/serving/pods/*/{metric}"
    code, body = api.get(path, {"labelSelector": f"app.kubernetes.io/component={component}"})
    assert code == 200 and body["kind"] == "MetricValueList", body
    return body


def test_verifier_sessions_per_pod_come_from_prometheus_by_the_charts_rule(api):
    body = pods_metric(api, "dspark_verifier_sessions", "verifier")
    assert values(body) == {"dspark-verifier-6d9f-a": "2", "dspark-verifier-6d9f-b": "5"}
    assert all(
        i["describedObject"]["kind"] == "Pod" and i["describedObject"]["namespace"] == "serving" for i in body["items"]
    )
    assert 'namespace="serving",pod=~"dspark-verifier-6d9f-a|dspark-verifier-6d9f-b"' in api.log[-1][1]
    # as the apiserver's aggregator forwards it: the all-pods name percent-encoded
    quoted = api.get(f"/apis/{CUSTOM}/namespaces/serving/pods/%2A/dspark_verifier_sessions", SELECT_VERIFIER)
    assert values(quoted[1]) == values(body)


def test_kv_usage_is_a_per_pod_ratio_in_milli_units(api):
    body = pods_metric(api, "dspark_verifier_kv_usage", "verifier")
    assert values(body) == {"dspark-verifier-6d9f-a": "200m", "dspark-verifier-6d9f-b": "500m"}


def test_router_ongoing_requests_add_decoding_and_waiting_per_pod(api):
    body = pods_metric(api, "dspark_router_ongoing_requests", "router")
    assert values(body) == {"dspark-router-77c4-x": "9", "dspark-router-77c4-y": "12"}


def test_the_external_queue_depth_sums_the_namespaces_routers_only(api):
    code, body = api.get(f"/apis/{EXTERNAL}/namespaces/serving/dspark_router_queue_depth", {})
    assert code == 200 and body["kind"] == "ExternalMetricValueList"
    assert [i["value"] for i in body["items"]] == ["7"]  # 3 + 4; the router in namespace `other` (50) is not counted


def test_unknown_metrics_are_404_and_discovery_lists_the_rules(api):
    assert api.get(f"/apis/{CUSTOM}/namespaces/serving/pods/*/dspark_nonexistent", {})[0] == 404
    assert api.get(f"/apis/{EXTERNAL}/namespaces/serving/dspark_nonexistent", {})[0] == 404
    _, custom = api.get(f"/apis/{CUSTOM}", {})
    assert "pods/dspark_verifier_sessions" in {r["name"] for r in custom["resources"]}
    _, external = api.get(f"/apis/{EXTERNAL}", {})
    assert {r["name"] for r in external["resources"]} == {"dspark_router_queue_depth"}


def test_the_stand_in_answers_over_http_as_the_aggregator_calls_it(api):
    server = serve(api, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        q = "labelSelector=app.kubernetes.io%2Fcomponent%3Dverifier"
        body = get_json(f"{base}/apis/{CUSTOM}/namespaces/serving/pods/*/dspark_verifier_sessions?{q}")
        assert values(body) == {"dspark-verifier-6d9f-a": "2", "dspark-verifier-6d9f-b": "5"}
        with pytest.raises(urllib.error.HTTPError) as e:
            get_json(f"{base}/apis/{CUSTOM}/namespaces/serving/pods/*/nope")
        assert e.value.code == 404
    finally:
        server.shutdown()


def test_quantities_are_what_the_hpa_parses():
    assert [quantity(v) for v in (6.0, 0.8, 0.05, 12.0, 1.2345)] == ["6", "800m", "50m", "12", "1234m"]
