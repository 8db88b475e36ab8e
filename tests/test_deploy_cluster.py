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
    print(cluster.kubectl("get", "pods", "-o", "wide"))
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
