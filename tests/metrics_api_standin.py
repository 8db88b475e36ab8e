"""TEST SCAFFOLDING, not part of the product: a stand-in for prometheus-adapter, for clusters (like the local test
cluster) where neither prometheus-adapter, metrics-server nor KEDA can be installed.

It answers the Kubernetes custom metrics API (custom.metrics.k8s.io/v1beta1, Pods metrics) and external metrics API
(external.metrics.k8s.io/v1beta1) from a real Prometheus' HTTP query API, by the same rules prometheus-adapter runs:
the chart's own `autoscaling.prometheusAdapter.rules` ConfigMap (seriesQuery / metricsQuery with <<.LabelMatchers>>
and <<.GroupBy>>, `name.as`). A Pods metric request names pods by a label selector; the stand-in resolves it to pod
names with `pods_of(namespace, selector)` (the Kubernetes API in a cluster), as prometheus-adapter does, and queries
`pod=~"a|b"`. Only what the chart's rules use is implemented (no seriesQuery discovery, no `resources.template`).

    python tests/metrics_api_standin.py --prometheus http://127.0.0.1:9090 --rules config.yaml --port 4443 \
        --tls-cert cert.pem --tls-key key.pem --kubeconfig admin.kubeconfig
"""

from __future__ import annotations

import argparse
import json
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

CUSTOM = "custom.metrics.k8s.io/v1beta1"
EXTERNAL = "external.metrics.k8s.io/v1beta1"


@dataclass(frozen=True)
class Rule:
    name: str  # the metric's name in the API (name.as)
    kind: str  # "pods" | "external"
    metrics_query: str


def load_rules(config_text: str) -> dict[tuple[str, str], Rule]:
    """prometheus-adapter's config.yaml (rules + externalRules) -> {(kind, metric name): Rule}."""
    cfg = yaml.safe_load(config_text) or {}
    out = {}
    for kind, key in (("pods", "rules"), ("external", "externalRules")):
        for r in cfg.get(key) or ():
            name = (r.get("name") or {}).get("as")
            if not name:
                raise ValueError(f"rule without name.as: {r}")
            out[(kind, name)] = Rule(name, kind, r["metricsQuery"])
    return out


def _matchers(labels: dict[str, str], regex: dict[str, list[str]]) -> str:
    parts = [f'{k}="{v}"' for k, v in labels.items()]
    # Kubernetes names are [a-z0-9.-]: joined as they are (a PromQL string would need `\\` for each regex escape)
    parts += [f'{k}=~"{"|".join(vs)}"' for k, vs in regex.items()]
    return ",".join(parts)


def render(rule: Rule, namespace: str, pods: list[str] | None = None, selector: dict[str, str] | None = None) -> str:
    """The rule's metricsQuery with its template filled in, as prometheus-adapter fills it."""
    labels = {"namespace": namespace, **(selector or {})}
    regex = {"pod": pods} if pods is not None else {}
    group_by = "pod" if rule.kind == "pods" else "namespace"
    return rule.metrics_query.replace("<<.LabelMatchers>>", _matchers(labels, regex)).replace("<<.GroupBy>>", group_by)


def quantity(v: float) -> str:
    """A Kubernetes quantity: integers as they are, fractions in milli-units (what the HPA reads)."""
    if float(v).is_integer():
        return str(int(v))
    return f"{round(v * 1000)}m"


class Prometheus:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def query(self, promql: str) -> list[tuple[dict, float]]:
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            body = json.load(r)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus: {body}")
        return [(s["metric"], float(s["value"][1])) for s in body["data"]["result"]]


def _selector(text: str | None) -> dict[str, str]:
    """`a=b,c=d` (equality only: what an HPA's metric selector and a Deployment's matchLabels give)."""
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            k, sep, v = part.partition("=")
            if not sep or "!" in k:
                raise ValueError(f"unsupported label selector {text!r}")
            out[k.strip()] = v.lstrip("=").strip()
    return out


class MetricsApi:
    """The two APIs' GET handlers as plain functions of a path and query: (status, JSON body)."""

    def __init__(self, prometheus: Prometheus, rules: dict, pods_of: Callable[[str, dict[str, str]], list[str]]):
        self.prometheus, self.rules, self.pods_of = prometheus, rules, pods_of
        self.log: list[tuple[str, str]] = []  # (path, PromQL) of every answered query

    def resources(self, group: str) -> dict:
        kind = "pods" if group == CUSTOM else "external"
        names = [n for k, n in self.rules if k == kind]
        res = [f"pods/{n}" if kind == "pods" else n for n in names]
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group,
            "resources": [
                {"name": r, "singularName": "", "namespaced": True, "kind": "MetricValueList", "verbs": ["get"]}
                for r in res
            ],
        }

    def get(self, path: str, params: dict[str, str]) -> tuple[int, dict]:
        path = urllib.parse.unquote(path)  # the aggregator sends the all-pods name `*` as %2A
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for group in (CUSTOM, EXTERNAL):
            if path.rstrip("/") == f"/apis/{group}":
                return 200, self.resources(group)
        m = re.fullmatch(rf"/apis/{re.escape(CUSTOM)}/namespaces/([^/]+)/pods/([^/]+)/([^/]+)", path)
        if m:
            ns, name, metric = m.groups()
            rule = self.rules.get(("pods", metric))
            if rule is None:
                return 404, _status(404, f"no custom metric {metric}")
            pods = self.pods_of(ns, _selector(params.get("labelSelector"))) if name == "*" else [name]
            if not pods:
                return 200, {"kind": "MetricValueList", "apiVersion": CUSTOM, "metadata": {}, "items": []}
            promql = render(rule, ns, pods)
            self.log.append((path, promql))
            items = [
                {
                    "describedObject": {"kind": "Pod", "namespace": ns, "name": labels["pod"], "apiVersion": "/v1"},
                    "metricName": metric,
                    "timestamp": now,
                    "value": quantity(v),
                }
                for labels, v in self.prometheus.query(promql)
                if labels.get("pod") in pods and v == v  # NaN (0/0 rates) is no value
            ]
            return 200, {"kind": "MetricValueList", "apiVersion": CUSTOM, "metadata": {}, "items": items}
        m = re.fullmatch(rf"/apis/{re.escape(EXTERNAL)}/namespaces/([^/]+)/([^/]+)", path)
        if m:
            ns, metric = m.groups()
            rule = self.rules.get(("external", metric))
            if rule is None:
                return 404, _status(404, f"no external metric {metric}")
            promql = render(rule, ns, selector=_selector(params.get("labelSelector")))
            self.log.append((path, promql))
            items = [
                {"metricName": metric, "metricLabels": labels, "timestamp": now, "value": quantity(v)}
                for labels, v in self.prometheus.query(promql)
                if v == v
            ]
            return 200, {"kind": "ExternalMetricValueList", "apiVersion": EXTERNAL, "metadata": {}, "items": items}
        return 404, _status(404, f"not found: {path}")


def _status(code: int, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "code": code}


def serve(api: MetricsApi, host: str, port: int, cert: str | None = None, key: str | None = None):
    """A thread serving the APIs (TLS with cert/key: what the aggregator calls); returns the server (.server_port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            url = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(url.query))
            try:
                code, body = api.get(url.path, params)
            except Exception as e:  # noqa: BLE001 - the HPA sees a 500 with the reason
                code, body = 500, _status(500, str(e))
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    if cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def kubernetes_pods_of(kubeconfig: str | None):
    from kubernetes import client, config

    config.load_kube_config(kubeconfig)
    core = client.CoreV1Api()

    def pods_of(namespace: str, selector: dict[str, str]) -> list[str]:
        sel = ",".join(f"{k}={v}" for k, v in selector.items())
        return [p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=sel).items]

    return pods_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prometheus", required=True)
    p.add_argument("--rules", required=True, help="prometheus-adapter config.yaml (the chart's ConfigMap data)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=4443)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--kubeconfig")
    a = p.parse_args()
    with open(a.rules) as f:
        rules = load_rules(f.read())
    api = MetricsApi(Prometheus(a.prometheus), rules, kubernetes_pods_of(a.kubeconfig))
    server = serve(api, a.host, a.port, a.tls_cert, a.tls_key)
    print(f"metrics API stand-in on {a.host}:{server.server_port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
