"""End to end on a real single-node Kubernetes 1.20 started on this machine (deploy/k8s/cluster-up.sh): the image
built by `make image` and imported into the node's containerd, `helm install dspark helm/dspark` with the local
CPU values, every pod Ready, `helm test`, a gRPC Generate through the router's ClusterIP Service whose greedy tokens
are the target's own (transformers in this process), `helm upgrade` with a changed value while requests are in
flight (none fails), `helm uninstall` leaving no dspark object, and the host put back by cluster-down.sh.

It needs root, /dev/kmsg and the cluster's Debian packages; a machine without them fails here, loudly: the test is
never skipped. Stage timings go to $DSPARK_HOME/k8s/e2e-timings.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from conftest import transformers_greedy

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("DSPARK_HOME", Path.home() / ".cache" / "dspark"))
K8S = Path(os.environ.get("K8S", HOME / "k8s"))
TARBALL = ROOT.parent / "shared" / "k8s" / "kubernetes-1.20.2-linux-amd64.tar.gz"
VALUES = ROOT / "helm" / "dspark" / "ci" / "local-cluster-values.yaml"
RELEASE = "dspark"
SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
PROMPTS = ["What is speculative decoding?", "Write a haiku about the sea."]
N_GREEDY = 16
SYSCTLS = ["vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward"]
TIMINGS: dict[str, float] = {}


def sh(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> str:
    """Run a command; on failure the error carries its output."""
    r = subprocess.run(
        list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def timed(stage: str):
    class _T:
        def __enter__(self):
            self.t0 = time.monotonic()

        def __exit__(self, *exc):
            TIMINGS[stage] = round(time.monotonic() - self.t0, 1)
            (K8S / "e2e-timings.json").write_text(json.dumps(TIMINGS, indent=1))

    return _T()


def host_state() -> dict:
    rules = sh("iptables-save", check=False) if shutil.which("iptables-save") else ""  # no iptables yet: no rules
    return {
        "sysctl": {s: sh("sysctl", "-n", s, check=False).strip() for s in SYSCTLS},
        "kube_chains": sorted({ln.split()[0][1:] for ln in rules.splitlines() if ln.startswith(":KUBE-")}),
        "cni0": subprocess.run(["ip", "link", "show", "cni0"], capture_output=True).returncode == 0,
        "netns": sorted(p.name for p in Path("/run/netns").glob("cni-*")) if Path("/run/netns").exists() else [],
        "mounts": [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if str(K8S) in ln],
    }


class Cluster:
    def __init__(self, kubeconfig: str):
        self.kubeconfig = kubeconfig
        self.helm_bin = sh("bash", "deploy/helm/helm-bin.sh").strip() + "/helm"

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        return sh(str(K8S / "bin" / "kubectl"), "--kubeconfig", self.kubeconfig, *args, timeout=timeout, check=check)

    def helm(self, *args: str, timeout: float = 900) -> str:
        return sh(self.helm_bin, "--kubeconfig", self.kubeconfig, *args, timeout=timeout)

    def release(self, verb: str, ref: str, *values: str) -> str:
        """helm install|upgrade of the chart with the local values, the imported image's tag, until Ready."""
        tag = ref.rsplit(":", 1)[1]
        return self.helm(verb, RELEASE, "helm/dspark", "-f", str(VALUES), "--set", f"image.tag={tag}", *values,
                         "--wait", "--timeout", "15m")  # fmt: skip

    def pods(self) -> list[dict]:
        return json.loads(self.kubectl("get", "pods", "-l", SELECTOR, "-o", "json"))["items"]


@pytest.fixture(scope="module")
def host_before():
    if os.geteuid() != 0 or not Path("/dev/kmsg").exists():
        pytest.fail("the cluster test needs root and /dev/kmsg (a real kubelet); this machine has neither")
    return host_state()


@pytest.fixture(scope="module")
def cluster(host_before):
    env = {"K8S": str(K8S)}
    if TARBALL.exists():
        env["K8S_TARBALL"] = str(TARBALL)
    try:
        with timed("cluster_up"):
            kubeconfig = sh("bash", "deploy/k8s/cluster-up.sh", timeout=1500, env=env).strip().splitlines()[-1]
        yield Cluster(kubeconfig)
    finally:
        sh("bash", "deploy/k8s/cluster-down.sh", timeout=300, check=False, env=env)


@pytest.fixture(scope="module")
def image(cluster):
    with timed("make_image"):
        archive = sh("bash", "deploy/docker/image.sh", timeout=1800).strip().splitlines()[-1]
    ref = (HOME / "images" / "dspark.ref").read_text().strip()
    with timed("image_import"):
        sh("bash", "deploy/k8s/import.sh", archive, ref, timeout=600, env={"K8S": str(K8S)})
    return archive, ref


@pytest.fixture(scope="module")
def installed(cluster, image):
    _, ref = image
    with timed("helm_install_ready"):
        cluster.release("install", ref)
        cluster.kubectl("wait", "--for=condition=Ready", "pods", "-l", SELECTOR, "--timeout=300s", timeout=320)
    wide = cluster.kubectl("get", "pods", "-o", "wide")
    (K8S / "e2e-pods-wide.txt").write_text(wide)
    print(wide)
    return ref


@pytest.fixture(scope="module")
def router(cluster, installed):
    """host:port of the router's public gRPC Service (its ClusterIP: kube-proxy routes it from the host too)."""
    svcs = json.loads(cluster.kubectl("get", "services", "-l", SELECTOR, "-o", "json"))["items"]
    (svc,) = [s for s in svcs if s["metadata"]["labels"].get("app.kubernetes.io/component") == "router"]
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    return f"{svc['spec']['clusterIP']}:{port}"


def _generate(channel, prompt_ids: list[int], n: int, timeout: float = 120):
    from dspark.v1 import generation_pb2 as gpb
    from dspark.v1 import generation_pb2_grpc

    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    return stub.Generate(
        gpb.GenerateRequest(prompt_token_ids=prompt_ids, max_tokens=n, ignore_eos=True), timeout=timeout
    )


def _prompt_ids(tokenizer, text: str) -> list[int]:
    from dspark.models.prompt import encode_prompt

    return list(encode_prompt(tokenizer, text))


# -- the image -------------------------------------------------------------------------------------------------------


def test_image_runs_dspark_as_a_non_root_user_and_a_second_build_is_cached(image):
    archive, ref = image
    sh("bash", "deploy/k8s/host-packages.sh", "skopeo")  # apt-get it on a fresh machine
    config = json.loads(sh("skopeo", "inspect", "--config", f"docker-archive:{archive}"))["config"]
    assert config["Entrypoint"] == ["dspark"] and config["User"] == "10001:10001"
    assert not any(e.startswith("DSPARK_MODEL") for e in config.get("Env", []))
    t0 = time.monotonic()
    assert sh("bash", "deploy/docker/image.sh").strip().splitlines()[-1] == archive
    assert time.monotonic() - t0 < 15, "the second make image should be a cache hit"


# -- the chart against the real server ------------------------------------------------------------------------------


def test_every_rendering_of_the_values_matrix_passes_the_1_20_servers_dry_run(cluster, tmp_path):
    """tests/test_helm_chart.py's values matrix, rendered for this server's version and applied with
    `kubectl apply --dry-run=server`: the API server's own validation and defaulting, nothing persisted. The `helm
    test` pod is left out (its admission looks up a ServiceAccount a dry run never creates); `helm test` below runs
    it for real."""
    from test_helm_chart import MATRIX, _set_args

    for case, values in MATRIX.items():
        manifest = tmp_path / f"{case.replace(' ', '-').replace(',', '')}.yaml"
        manifest.write_text(cluster.helm("template", "dspark-dry-run", "helm/dspark", "--namespace", "default",
                                         "--kube-version", "1.20.2", "--skip-tests", *_set_args(values)))  # fmt: skip
        out = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", str(manifest))
        assert "(server dry run)" in out, (case, out)
    assert not [o for o in cluster.kubectl("get", "all,configmaps,secrets", "-o", "name").split() if "dry-run" in o]


# -- install, helm test, Generate ------------------------------------------------------------------------------------


def test_helm_install_brings_every_dspark_pod_to_ready(cluster, installed):
    pods = cluster.pods()
    tiers = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
    assert {"verifier", "draft", "router"} <= tiers
    for p in pods:
        ready = {c["type"]: c["status"] for c in p["status"]["conditions"]}["Ready"]
        assert ready == "True", p["metadata"]["name"]
        assert p["spec"]["containers"][0]["image"].endswith(installed.rsplit("/", 1)[1])


def test_helm_test_makes_a_real_generate_call(cluster, installed):
    with timed("helm_test"):
        out = cluster.helm("test", RELEASE, "--timeout", "5m")
    (K8S / "e2e-helm-test.txt").write_text(out)
    assert "Phase:          Succeeded" in out, out


def test_generate_through_the_router_service_is_the_targets_own_greedy(router, real_model):
    model, tokenizer = real_model
    ids = [_prompt_ids(tokenizer, p) for p in PROMPTS]
    want = transformers_greedy(model, ids, N_GREEDY, min_new_tokens=N_GREEDY)
    with grpc.insecure_channel(router) as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
        for prompt_ids, expected in zip(ids, want):
            (c,) = _generate(ch, prompt_ids, N_GREEDY).choices
            assert list(c.token_ids) == expected
            assert c.stats.rounds >= 1 and c.stats.tau >= 1.0


# -- upgrade under load, uninstall -----------------------------------------------------------------------------------


def test_helm_upgrade_with_requests_in_flight_fails_none(cluster, router, installed, real_model):
    """Two clients send requests in a loop while the router tier rolls (router.policy changes) until the old pods
    are gone. A client retries a call once on UNAVAILABLE over a new channel, as a gRPC retry policy would: the old
    router pod's Ray Serve proxy closes its connections at shutdown with calls in flight (counted, at most one per
    client); no call may fail after that retry."""
    _, tokenizer = real_model
    ids = _prompt_ids(tokenizer, PROMPTS[0])
    done, log, lock = threading.Event(), [], threading.Lock()

    def client(k: int):
        ch = grpc.insecure_channel(router)
        while not done.is_set():
            t0, retried = time.monotonic(), False
            while True:
                try:
                    n = len(_generate(ch, ids, 8).choices[0].token_ids)
                    entry = [k, round(t0, 1), round(time.monotonic() - t0, 2), "ok", n, retried]
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE and not retried:
                        ch.close()
                        ch, retried = grpc.insecure_channel(router), e.details()
                        continue
                    entry = [k, round(t0, 1), round(time.monotonic() - t0, 2), e.code().name, e.details(), retried]
                break
            with lock:
                log.append(entry)
        ch.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    before = {p["metadata"]["name"] for p in cluster.pods()}
    try:
        time.sleep(3)
        with timed("helm_upgrade"):
            cluster.release("upgrade", installed, "--set", "router.policy=fixed")
            deadline = time.monotonic() + 300
            while any(p["metadata"]["name"] in before for p in cluster.pods() if p["metadata"]["labels"].get(
                    "app.kubernetes.io/component") == "router"):  # fmt: skip
                assert time.monotonic() < deadline, "the old router pod is still there"
                time.sleep(1)
        time.sleep(3)
    finally:
        done.set()
        for t in threads:
            t.join(180)
    (K8S / "e2e-upgrade-requests.json").write_text(json.dumps(log))
    after = {p["metadata"]["name"] for p in cluster.pods()}
    assert before != after, "the upgrade replaced no pod"
    failed = [e for e in log if e[3] != "ok"]
    assert len(log) >= 4 and not failed, failed
    assert all(e[4] == 8 for e in log)
    assert sum(1 for e in log if e[5]) <= len(threads), log


# -- autoscaling: the verifier tier follows the load, the router follows the tier -------------------------------------

AUTOSCALING_VALUES = ROOT / "helm" / "dspark" / "ci" / "autoscaling-values.yaml"
STANDIN_PORT = 4443  # the metrics API stand-in on the bridge address, where the aggregator reaches it
N_SCALING = 24  # tokens per request of the scaling test's clients


def _aggregated_metrics_api(name: str) -> str:
    """The stand-in registered as the cluster's custom and external metrics APIs (a selector-less Service whose
    Endpoints are the host's bridge address; the aggregator routes to the endpoint), and the HPA controller allowed
    to read them."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "kube-system"},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": STANDIN_PORT}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": name, "namespace": "kube-system"},
            "subsets": [{"addresses": [{"ip": "10.244.0.1"}], "ports": [{"name": "https", "port": STANDIN_PORT}]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [
                {
                    "apiGroups": ["custom.metrics.k8s.io", "external.metrics.k8s.io"],
                    "resources": ["*"],
                    "verbs": ["get", "list", "watch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": "horizontal-pod-autoscaler", "namespace": "kube-system"}],
        },
    ]
    for group in ("custom.metrics.k8s.io", "external.metrics.k8s.io"):
        docs.append({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService", "metadata": {"name": f"v1beta1.{group}"},
            "spec": {"service": {"name": name, "namespace": "kube-system", "port": 443}, "group": group,
                     "version": "v1beta1", "insecureSkipTLSVerify": True, "groupPriorityMinimum": 100,
                     "versionPriority": 100}})  # fmt: skip
    import yaml

    return yaml.safe_dump_all(docs)


def _prometheus_config(targets: Path) -> dict:
    """Scrape every target of the file every 2 s. Debian's Prometheus is built without kubernetes_sd, so the test
    writes the file from the API (`_write_targets`), labelled with namespace and pod as the adapter rules expect."""
    return {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {"job_name": "dspark-pods", "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "2s"}]}
        ],
    }


def _write_targets(cluster, path: Path) -> None:
    """Every running release pod's `metrics` container port, as Prometheus file_sd targets."""
    groups = []
    for p in cluster.pods():
        ip = p.get("status", {}).get("podIP")
        for c in p["spec"]["containers"]:
            for port in c.get("ports", []):
                if ip and port.get("name") == "metrics" and p["metadata"].get("deletionTimestamp") is None:
                    labels = {"namespace": p["metadata"]["namespace"], "pod": p["metadata"]["name"]}
                    groups.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": labels})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)


def _router_metrics(cluster) -> dict:
    """Summed over the router pods: dspark_replica_requests_total{tier="verifier"} by replica address ("requests"),
    dspark_queue_depth ("queue") and dspark_verifier_restored_sessions_total ("moved": sessions prefilled again on
    another replica, a leaving one's included)."""
    from dspark.bench.services import scrape

    urls = {}
    for p in cluster.pods():
        labels, ip = p["metadata"]["labels"], p.get("status", {}).get("podIP")
        if labels.get("app.kubernetes.io/component") == "router" and ip:
            port = next(c["containerPort"] for c in p["spec"]["containers"][0]["ports"] if c["name"] == "http")
            urls[p["metadata"]["name"]] = f"http://{ip}:{port}/metrics"
    out: dict = {"requests": {}, "queue": 0.0, "moved": 0.0}
    for samples in scrape(urls).values():  # a router pod that does not answer gives {}
        for (name, labels), value in samples.items():
            labels = dict(labels)
            if name == "dspark_replica_requests_total" and labels.get("tier") == "verifier":
                out["requests"][labels["replica"]] = out["requests"].get(labels["replica"], 0.0) + value
            elif name == "dspark_queue_depth":
                out["queue"] += value
            elif name == "dspark_verifier_restored_sessions_total":
                out["moved"] += value
    return out


def _hpa_diagnosis(cluster) -> str:
    """What the HPA and the aggregated metrics API say, for a failed scaling assertion."""
    raw = "/apis/custom.metrics.k8s.io/v1beta1/namespaces/default/pods/*/dspark_verifier_sessions"
    kubectl = [str(K8S / "bin" / "kubectl"), "--kubeconfig", cluster.kubeconfig]
    runs = (
        subprocess.run(kubectl + list(args), capture_output=True, text=True, timeout=60)
        for args in (
            ("describe", "hpa.v2beta2.autoscaling", "dspark-verifier"),
            ("get", "apiservice", "v1beta1.custom.metrics.k8s.io", "-o", "yaml"),
            ("get", "--raw", raw),
        )
    )
    return "\n".join(r.stdout + r.stderr for r in runs)


def _timeline_png(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t"] for r in rows]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a1.step(t, [r["hpa_desired"] for r in rows], where="post", label="HPA desired verifier pods")
    a1.step(t, [r["ready_verifiers"] for r in rows], where="post", label="ready verifier pods")
    a1.plot(t, [r["clients"] for r in rows], ":", label="clients")
    a1.plot(t, [r["failed"] + r["wrong"] for r in rows], "--", label="failed or inexact requests (so far)")
    a1.plot(t, [r.get("router_queue", 0) for r in rows], "-.", label="router queue depth")
    a1.plot(t, [r.get("moved_sessions", 0) for r in rows], "-", lw=0.8, label="sessions moved (so far)")
    a1.set_ylabel("count")
    a1.legend(loc="upper right", fontsize=8)
    for pod in sorted({k for r in rows for k in r["sessions"]}):
        a2.plot(t, [r["sessions"].get(pod, float("nan")) for r in rows], label=f"sessions {pod[-5:]}")
    for addr in sorted({k for r in rows for k in r["router_requests"]}):
        a2.plot(t, [r["router_requests"].get(addr, float("nan")) for r in rows], "--", label=f"requests to {addr}")
    a2.set_xlabel("seconds")
    a2.set_ylabel("per verifier pod")
    a2.legend(loc="upper left", fontsize=7)
    fig.suptitle("verifier HPA on dspark_verifier_sessions (local Kubernetes 1.20)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def test_the_verifier_tier_scales_out_under_load_and_back_with_no_request_lost(cluster, router, installed, real_model):
    """A real Prometheus scrapes the pods (their addresses from the API), the metrics API stand-in (test scaffolding,
    tests/metrics_api_standin.py) answers the aggregated custom/external metrics APIs from it with the chart's own
    adapter rules, and the chart's verifier HPA (autoscaling/v2beta2 on 1.20) scales on sessions per pod. Four
    clients on one verifier pod: the HPA scales 1 -> 2, the router (discovery `kubernetes`) sees the new pod and
    pins new requests to it. Two clients then (one on each pod): it scales back to 1, and the leaving pod's session
    is prefilled again on the other (the router's moved-sessions counter rises). No request fails; every answer is
    the target's own greedy tokens. Timeline: $K8S/e2e-hpa-timeline.json and .png."""
    import yaml

    model, tokenizer = real_model
    # none of them ends within N_SCALING tokens: past an EOS, min_new_tokens masks it where ignore_eos keeps it
    prompts = [_prompt_ids(tokenizer, p) for p in PROMPTS + ["Describe the water cycle.", "Explain a hash map."]]
    want = transformers_greedy(model, prompts, N_SCALING, min_new_tokens=N_SCALING)
    work = K8S / "hpa-test"
    shutil.rmtree(work, ignore_errors=True)  # no series of an earlier run's pods in Prometheus' storage
    work.mkdir()
    procs: list[subprocess.Popen] = []
    name = "dspark-test-metrics-api"
    try:
        with timed("hpa_upgrade"):
            cluster.release("upgrade", installed, "-f", str(AUTOSCALING_VALUES))
            cluster.kubectl("rollout", "status", "deployment/dspark-router", "--timeout=300s", timeout=320)
        # Prometheus, then the stand-in on the bridge address with a self-signed certificate
        prom_bin = sh("bash", "deploy/autoscaling/prometheus-bin.sh").strip().splitlines()[-1]
        targets = work / "targets.json"
        _write_targets(cluster, targets)
        (work / "prometheus.yml").write_text(yaml.safe_dump(_prometheus_config(targets)))
        prom_port = 19090
        procs.append(subprocess.Popen(
            [prom_bin, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
            stdout=open(work / "prometheus.log", "w"), stderr=subprocess.STDOUT))  # fmt: skip
        rules = cluster.kubectl("get", "configmap", "dspark-prometheus-adapter", "-o", "jsonpath={.data.config\\.yaml}")
        (work / "rules.yaml").write_text(rules)
        sh(
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=metrics-api",
            "-addext",
            "subjectAltName=IP:10.244.0.1",
            "-keyout",
            str(work / "tls.key"),
            "-out",
            str(work / "tls.crt"),
        )
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "metrics_api_standin.py"), "--prometheus",
             f"http://127.0.0.1:{prom_port}", "--rules", str(work / "rules.yaml"), "--host", "10.244.0.1",
             "--port", str(STANDIN_PORT), "--tls-cert", str(work / "tls.crt"), "--tls-key", str(work / "tls.key"),
             "--kubeconfig", cluster.kubeconfig],
            stdout=open(work / "standin.log", "w"), stderr=subprocess.STDOUT))  # fmt: skip
        (work / "metrics-api.yaml").write_text(_aggregated_metrics_api(name))
        cluster.kubectl("apply", "-f", str(work / "metrics-api.yaml"))

        from metrics_api_standin import Prometheus

        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        done, log, lock = threading.Event(), [], threading.Lock()
        active = [threading.Event() for _ in range(4)]  # client k runs while active[k] is set

        def client(k: int):
            ch = grpc.insecure_channel(router)
            i = k
            while not done.is_set():
                if not active[k].wait(0.5):
                    continue
                j, t0 = i % len(prompts), time.monotonic()
                try:
                    toks = list(_generate(ch, prompts[j], N_SCALING, timeout=300).choices[0].token_ids)
                    entry = {"client": k, "t": t0, "s": time.monotonic() - t0, "ok": toks == want[j], "code": "OK"}
                except grpc.RpcError as e:
                    entry = {"client": k, "t": t0, "s": time.monotonic() - t0, "ok": False, "code": e.code().name,
                             "details": e.details()}  # fmt: skip
                with lock:
                    log.append(entry)
                i += 1
            ch.close()

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(len(active))]
        for t in threads:
            t.start()
        rows: list[dict] = []
        t_start = time.monotonic()

        def sample() -> dict:
            _write_targets(cluster, targets)
            hpa = json.loads(cluster.kubectl("get", "hpa.v2beta2.autoscaling", "dspark-verifier", "-o", "json"))
            verifiers = [p for p in cluster.pods() if p["metadata"]["labels"].get("app.kubernetes.io/component")
                         == "verifier"]  # fmt: skip
            ready = [
                p
                for p in verifiers
                if p["metadata"].get("deletionTimestamp") is None
                and any(
                    c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", [])
                )
            ]
            try:
                sessions = {m["pod"]: v for m, v in prom.query('dspark_sessions{service="verifier"}')}
            except OSError:
                sessions = {}
            router = _router_metrics(cluster)
            with lock:
                failed = sum(1 for e in log if e["code"] != "OK")
                wrong = sum(1 for e in log if e["code"] == "OK" and not e["ok"])
                finished = len(log)
            row = {"t": round(time.monotonic() - t_start, 1), "clients": sum(a.is_set() for a in active),
                   "hpa_desired": hpa.get("status", {}).get("desiredReplicas", 0),
                   "hpa_current": hpa.get("status", {}).get("currentReplicas", 0),
                   "ready_verifiers": len(ready), "verifier_pods": [p["metadata"]["name"] for p in ready],
                   "ready_ips": [p["status"].get("podIP") for p in ready],
                   "sessions": sessions, "router_requests": router["requests"], "router_queue": router["queue"],
                   "moved_sessions": router["moved"], "finished": finished, "failed": failed,
                   "wrong": wrong}  # fmt: skip
            rows.append(row)
            (K8S / "e2e-hpa-timeline.json").write_text(json.dumps(rows, indent=1))
            return row

        try:
            with timed("hpa_scale_up"):
                for a in active:
                    a.set()
                first = sample()
                assert first["ready_verifiers"] == 1, first
                deadline = time.monotonic() + 240
                while True:  # two ready pods, and the router sends requests to the new one
                    row = sample()
                    new_ips = [ip for ip in row["ready_ips"] if ip not in first["ready_ips"]]
                    if new_ips and any(a.split(":")[0] in new_ips and n > 0 for a, n in row["router_requests"].items()):
                        break
                    assert time.monotonic() < deadline, (rows[-2:], _hpa_diagnosis(cluster))
                    time.sleep(2)
            with timed("hpa_scale_down"):
                # two clients on two pods (1 / 2 sessions per pod -> one pod): the router spreads them, so the pod
                # that leaves holds a session when it goes, and that session moves
                for a in active[2:]:
                    a.clear()
                deadline = time.monotonic() + 240
                while True:  # back to one pod, and the remaining client finished requests after that
                    row = sample()
                    if row["ready_verifiers"] == 1 and row["hpa_current"] == 1:
                        active[1].clear()  # one client: 1 / 2 per pod, nothing to scale out again for
                        with lock:
                            n_before = len(log)
                        break
                    assert time.monotonic() < deadline, (rows[-2:], _hpa_diagnosis(cluster))
                    time.sleep(2)
                while True:
                    with lock:
                        if len(log) >= n_before + 2:
                            break
                    assert time.monotonic() < deadline + 120, rows[-3:]
                    time.sleep(2)
                sample()
        finally:
            done.set()
            for a in active:
                a.set()
            for t in threads:
                t.join(320)
        (K8S / "e2e-hpa-requests.json").write_text(json.dumps(log, indent=1))
        _timeline_png(rows, K8S / "e2e-hpa-timeline.png")
        failed = [e for e in log if e["code"] != "OK" or not e["ok"]]
        assert not failed, failed
        assert max(r["hpa_desired"] for r in rows) == 2 and rows[-1]["hpa_current"] == 1
        assert len(log) >= 8
        i_down = next(i for i, r in enumerate(rows) if r["clients"] == 2)
        assert rows[-1]["moved_sessions"] > rows[i_down]["moved_sessions"], rows[i_down:]  # the leaving pod's moved
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", str(work / "metrics-api.yaml"), check=False)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_helm_uninstall_leaves_no_dspark_object(cluster, installed):
    with timed("helm_uninstall"):
        cluster.helm("uninstall", RELEASE, "--wait", "--timeout", "5m")
        deadline = time.monotonic() + 180
        kinds = "all,configmaps,secrets,serviceaccounts,poddisruptionbudgets,networkpolicies,roles,rolebindings"
        while True:
            left = cluster.kubectl("get", kinds, "-A", "-o", "name", "-l", SELECTOR).split()
            named = [o for o in cluster.kubectl("get", kinds, "-o", "name").split() if "dspark" in o]
            if not left and not named:
                break
            assert time.monotonic() < deadline, (left, named)
            time.sleep(2)


# -- teardown --------------------------------------------------------------------------------------------------------


def test_cluster_down_puts_the_host_back(cluster, host_before):
    with timed("cluster_down"):
        sh("bash", "deploy/k8s/cluster-down.sh", timeout=300, env={"K8S": str(K8S)})
    after = host_state()
    assert after == host_before
    assert not after["kube_chains"] and not after["cni0"] and not after["netns"] and not after["mounts"]
