"""Router discovery (router/discovery.py) and pools that change while requests decode (router/pool.py).

The pure part is fed Endpoints objects and watch events as the API server sends them; the watch shell runs the real
`kubernetes` client's Watch over a fake API whose response streams the events a test pushes; the pools and the router
run against real verifier and draft gRPC services on localhost (tiny random-weight models), with replicas joining and
leaving mid-generation: every request finishes, greedy outputs stay exactly plain greedy."""

from __future__ import annotations

import asyncio
import json
import queue
import time
from types import SimpleNamespace

import pytest
from test_router_apis import Letters
from test_verifier_draft_services import (
    GREEDY,
    KNEE,
    PROMPTS,
    make_draft_core,
    make_verifier_core,
    plain_greedy,
)

from dspark.core.decoding import Decoder
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import schedule
from dspark.router import discovery
from dspark.router.discovery import Change, EndpointsWatch, Membership, ServiceRef, endpoint_addresses, service_ref
from dspark.router.loop import Router, RouterConfig
from dspark.router.pool import ProposerPool, VerifierPool
from dspark.router.remote import RemoteProposer, RemoteVerifier
from dspark.serving import metrics
from dspark.stack.serve import start_draft, start_verifier

pytestmark = pytest.mark.usefixtures("one_thread")

REF = ServiceRef("ns", "dspark-verifier-headless", None)


def endpoints(name: str, ready: list[str], not_ready: list[str] = (), port: int = 50061, rv: str = "1") -> dict:
    return {
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
        "subsets": [
            {
                "addresses": [{"ip": ip} for ip in ready],
                "notReadyAddresses": [{"ip": ip} for ip in not_ready],
                "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
            }
        ],
    }


# -- addresses --------------------------------------------------------------------------------------------------


def test_a_watch_without_the_kubernetes_client_fails_at_start_not_on_its_thread(monkeypatch):
    """Without the package the watch thread would die at its first import and the router wait for replicas forever."""
    monkeypatch.setitem(__import__("sys").modules, "kubernetes", None)  # `import kubernetes` raises ImportError
    with pytest.raises(RuntimeError, match="needs the `kubernetes` package"):
        EndpointsWatch(REF, lambda change: None).start()


def test_a_k8s_address_names_namespace_service_and_port():
    assert service_ref("k8s://prod/dspark-verifier-headless:grpc") == ServiceRef(
        "prod", "dspark-verifier-headless", "grpc"
    )
    assert service_ref("k8s://dspark-draft-headless") == ServiceRef(None, "dspark-draft-headless", None)
    assert service_ref(" k8s://v:50061 ") == ServiceRef(None, "v", "50061")
    assert str(service_ref("k8s://prod/v:grpc")) == "k8s://prod/v:grpc"
    assert discovery.is_discovered("k8s://v") and not discovery.is_discovered("10.0.0.1:50061")


@pytest.mark.parametrize("bad", ["10.0.0.1:50061", "k8s://", "k8s://a/b/c", "k8s://a,k8s://b", "k8s://ns/:grpc"])
def test_a_bad_k8s_address_is_refused_with_its_text(bad):
    with pytest.raises(ValueError, match="k8s://"):
        service_ref(bad)


def test_only_ready_addresses_count_and_the_port_is_picked_by_name_or_number():
    e = endpoints("v", ["10.244.0.5", "10.244.0.6"], not_ready=["10.244.0.7"])
    assert endpoint_addresses(e) == {"10.244.0.5:50061", "10.244.0.6:50061"}
    two_ports = {
        "subsets": [
            {
                "addresses": [{"ip": "10.1.1.1"}],
                "ports": [{"name": "metrics", "port": 9461}, {"name": "grpc", "port": 50061}],
            }
        ]
    }
    assert endpoint_addresses(two_ports) == {"10.1.1.1:50061"}  # no port named: the one called grpc
    assert endpoint_addresses(two_ports, "metrics") == {"10.1.1.1:9461"}
    assert endpoint_addresses(two_ports, "50061") == {"10.1.1.1:50061"}
    assert endpoint_addresses(two_ports, "http") == set()
    assert endpoint_addresses({"subsets": [{"addresses": [{"ip": "fd00::5"}], "ports": [{"port": 1}]}]}) == {
        "[fd00::5]:1"
    }
    assert endpoint_addresses(None) == endpoint_addresses({"metadata": {}}) == set()  # no subsets: no pods ready


def test_membership_turns_events_into_joins_and_leaves():
    m = Membership(ServiceRef("ns", "v", None))
    assert m.listed([endpoints("other", ["9.9.9.9"]), endpoints("v", ["10.0.0.1"])], "5") == Change(("10.0.0.1:50061",))
    assert m.resource_version == "5"
    # a new pod becomes ready (scale-up), then it is the old one that goes (scale-down)
    assert m.event("MODIFIED", endpoints("v", ["10.0.0.1", "10.0.0.2"], rv="6")) == Change(("10.0.0.2:50061",))
    assert m.event("MODIFIED", endpoints("v", ["10.0.0.2"], not_ready=["10.0.0.1"], rv="7")) == Change(
        (), ("10.0.0.1:50061",)
    )
    assert not m.event("MODIFIED", endpoints("v", ["10.0.0.2"], rv="8"))  # nothing changed
    assert not m.event("ADDED", endpoints("other", ["9.9.9.9"], rv="9"))  # another Service
    assert not m.event("BOOKMARK", {"metadata": {"resourceVersion": "10"}}) and m.resource_version == "10"
    assert m.event("DELETED", endpoints("v", ["10.0.0.2"], rv="11")) == Change((), ("10.0.0.2:50061",))
    assert m.addresses == frozenset()
    with pytest.raises(ValueError, match="FROBNICATE"):
        m.event("FROBNICATE", endpoints("v", []))


# -- the watch shell, with the real client's Watch over a fake API ------------------------------------------------


class FakeCoreV1:
    """list_namespaced_endpoints as CoreV1Api answers it: a list (items + resourceVersion) or, with watch=True, a
    response streaming the JSON lines of the events pushed with `push` (None ends the stream)."""

    def __init__(self, items: list[dict]):
        self.items, self.events = items, queue.Queue()
        self.api_client = SimpleNamespace(sanitize_for_serialization=lambda x: x)
        self.calls: list[dict] = []

    def push(self, kind: str, obj: dict) -> None:
        self.events.put(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def list_namespaced_endpoints(self, namespace, **kw):
        self.calls.append({"namespace": namespace, **kw})
        if not kw.get("watch"):
            return SimpleNamespace(items=self.items, metadata=SimpleNamespace(resource_version="100"))
        events = self.events

        class Response:
            status = 200

            def stream(self, amt=None, decode_content=False):
                while (line := events.get()) is not None:
                    yield line

            def close(self):
                pass

            def release_conn(self):
                pass

        return Response()


def wait_for(cond, timeout_s=10.0):
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_the_watch_lists_then_follows_one_services_endpoints():
    api = FakeCoreV1([endpoints("v", ["10.0.0.1"])])
    changes: list[Change] = []
    w = EndpointsWatch(ServiceRef("ns", "v", "grpc"), changes.append, api=api).start()
    try:
        assert w.wait_ready(5) == {"10.0.0.1:50061"}
        api.push("MODIFIED", endpoints("v", ["10.0.0.1", "10.0.0.2"], rv="101"))
        api.push("MODIFIED", endpoints("v", ["10.0.0.2"], rv="102"))
        wait_for(lambda: len(changes) == 3)
        assert changes == [Change(("10.0.0.1:50061",)), Change(("10.0.0.2:50061",)), Change((), ("10.0.0.1:50061",))]
        watch_call = next(c for c in api.calls if c.get("watch"))
        assert watch_call["namespace"] == "ns" and watch_call["field_selector"] == "metadata.name=v"
        assert watch_call["resource_version"] == "100"  # from where the list left off
    finally:
        w.stop()
        api.events.put(None)


def test_a_service_with_no_ready_pod_makes_start_up_wait_then_fail_clearly():
    api = FakeCoreV1([endpoints("v", [], not_ready=["10.0.0.1"])])
    w = EndpointsWatch(ServiceRef("ns", "v", None), lambda c: None, api=api).start()
    try:
        with pytest.raises(ConnectionError, match="no ready replica behind k8s://ns/v"):
            w.wait_ready(0.3)
    finally:
        w.stop()
        api.events.put(None)


# -- pools whose replicas come and go, over real services -------------------------------------------------------


@pytest.fixture(scope="module")
def target_model():
    from test_core_decoding_stats import _tiny_llama

    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


@pytest.fixture
def services(bg, target_model):
    """start(kind) -> a verifier or draft Service on a free port; all stopped at the end."""
    started = []

    def start(kind: str, max_requests: int = 16):
        core = make_verifier_core(target_model, max_requests) if kind == "verifier" else make_draft_core(target_model)
        s = bg.run(start_verifier(core) if kind == "verifier" else start_draft(core))
        started.append(s)
        return s

    yield start
    for s in started:
        bg.run(s.stop(0))


def addr(service) -> str:
    return f"127.0.0.1:{service.port}"


def pinned(tier: str, address: str) -> float:
    """dspark_replica_requests_total of one replica (ports are reused across tests: compare differences)."""
    return metrics.REPLICA_REQUESTS.labels(tier=tier, replica=address)._value.get()


def decode_all(dec: Decoder, ids: list[str], between=lambda rounds: None) -> list:
    done, rounds = {}, 0
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
        rounds += 1
        between(rounds)
    return [done[i] for i in ids]


def test_a_verifier_that_joins_takes_new_requests_and_one_that_leaves_hands_its_sessions_over(services, target_model):
    v1, v2 = services("verifier"), services("verifier")
    d = services("draft")
    pool = VerifierPool([RemoteVerifier(addr(v1), connect_s=10)])
    proposer = RemoteProposer(addr(d), pool.vocab_size, features_of=pool.refeature)
    dec = Decoder(pool, proposer, num_draft=4, policy="dspark")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    first = [dec.add_request(p, params) for p in PROMPTS[:2]]
    done = {}
    for _ in range(2):
        done.update((c.request_id, c) for c in dec.step())
    before = pinned("verifier", addr(v2))
    assert pool.add(RemoteVerifier(addr(v2), connect_s=10))  # scale-up: a pod became ready
    assert not pool.add(RemoteVerifier(addr(v2), connect_s=10))  # the same address twice: ignored
    late = [dec.add_request(p, params) for p in PROMPTS[2:]]
    done.update((c.request_id, c) for c in dec.step())
    assert {pool.replica_of(r) for r in late} == {addr(v2)}  # new requests go to the new, idle replica
    still = [r for r in first if r not in done]
    assert still and pool.sessions() == {addr(v1): len(still), addr(v2): 2}
    next(r for r in pool.replicas if r.address == addr(v1)).restored = 3  # say it rebuilt 3 after a restart once
    restored = pool.restored
    assert pool.remove(addr(v1))  # scale-down: its pod left the endpoints
    assert pool.addresses == [addr(v2)] and pool.failovers == len(still)
    assert pool.restored == restored + len(still)  # the count goes on with the moves; it never falls
    assert {pool.replica_of(r) for r in still} == {addr(v2)}
    assert not pool.remove(addr(v2))  # the last replica stays until another one joins
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i] for i in first + late]
    assert [c.token_ids for c in out] == plain_greedy(target_model, params=params)
    assert pinned("verifier", addr(v2)) - before == 2


def test_a_leaving_verifier_keeps_its_sessions_until_the_others_have_room(services, target_model):
    """Three sessions on the leaving replica, two free on the other: it takes no new request and keeps decoding its
    own until one has finished, then the other two move; every output is still plain greedy."""
    v1, v2 = services("verifier"), services("verifier", max_requests=2)
    pool = VerifierPool([RemoteVerifier(addr(v1), connect_s=10)])
    dec = Decoder(pool, None, num_draft=0, policy="autoregressive")
    lengths = [3, 14, 14]
    ids = [
        dec.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        for p, n in zip(PROMPTS, lengths)
    ]
    done = {}
    done.update((c.request_id, c) for c in dec.step())
    assert pool.add(RemoteVerifier(addr(v2), connect_s=10))
    assert not pool.remove(addr(v1))  # 3 sessions, room for 2: it stays, leaving
    assert pool.free_slots == 2  # only the other replica's
    late = dec.add_request(PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    done.update((c.request_id, c) for c in dec.step())
    assert pool.replica_of(late) == addr(v2)  # not pinned to the leaving one
    while pool.addresses != [addr(v2)]:
        done.update((c.request_id, c) for c in dec.step())
    assert ids[0] in done and pool.failovers == 2  # the short one finished there, then the other two moved
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    want = [
        plain_greedy(target_model, [p], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        for p, n in zip(PROMPTS, lengths + [4])
    ]
    assert [done[i].token_ids for i in ids + [late]] == want


def test_the_scheduler_prices_a_busy_verifier_replica_with_its_own_load(services):
    """Two verifier replicas with the same SPS table (free up to 24 query tokens): four requests on the busy one,
    one on the other. Each replica's share is priced with its own batch, so the lone request verifies its whole
    block while the busy replica's requests get what Algorithm 1 gives four requests."""
    busy, idle, d = services("verifier"), services("verifier"), services("draft")
    pool = VerifierPool([RemoteVerifier(addr(busy), connect_s=10)])
    proposer = RemoteProposer(addr(d), pool.vocab_size, features_of=pool.refeature)
    proposer.info()
    proposer.draft_cost = None  # no planning before drafting: every request drafts its whole block
    dec = Decoder(pool, proposer, num_draft=4, policy="dspark")
    budgets: list[dict[str, list[int]]] = []
    inner = pool.verify

    def verify(items):
        per: dict[str, list[int]] = {}
        for it in items:
            per.setdefault(pool.replica_of(it.request_id), []).append(len(it.draft_tokens))
        budgets.append(per)
        return inner(items)

    pool.verify = verify
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    on_busy = [dec.add_request([3, 4, i], params) for i in range(6)]
    dec.step()
    pool.add(RemoteVerifier(addr(idle), connect_s=10))
    alone = dec.add_request([7, 1, 2], params)
    for _ in range(3):
        dec.step()
    assert pool.replica_of(alone) == addr(idle) and {pool.replica_of(r) for r in on_busy} == {addr(busy)}
    assert pool.sessions() == {addr(busy): 6, addr(idle): 1}
    per_request = [max(b.get(addr(idle), [0])) for b in budgets[1:]]
    assert max(per_request) == 4  # the idle replica verified a whole block for its one request
    busy_rounds = [b[addr(busy)] for b in budgets[1:] if b.get(addr(busy))]
    assert all(sum(b) < 6 * 4 for b in busy_rounds)  # the busy one could not: 6 x (4 + 1) is past its knee
    assert schedule("dspark", [[1.0] * 4], KNEE) == [4] and sum(schedule("dspark", [[1.0] * 4] * 6, KNEE)) < 24
    dec.abort(alone)
    for r in on_busy:
        dec.abort(r)


def test_a_draft_replica_that_leaves_has_its_sessions_reopened_on_another(services, target_model):
    v, d1, d2 = services("verifier"), services("draft"), services("draft")
    verifier = RemoteVerifier(addr(v), connect_s=10)
    p1 = RemoteProposer(addr(d1), verifier.vocab_size, features_of=verifier.refeature)
    pool = ProposerPool([p1])
    pool.info()
    dec = Decoder(verifier, pool, num_draft=4, policy="fixed")
    ids = [dec.add_request(p, GREEDY) for p in PROMPTS]
    joined = RemoteProposer(addr(d2), verifier.vocab_size, features_of=verifier.refeature)
    joined.info()

    def churn(rounds: int) -> None:
        if rounds == 2:
            assert pool.add(joined)
            assert pool.remove(addr(d1)) and pool.moved == len(PROMPTS)

    out = decode_all(dec, ids, churn)
    assert [c.token_ids for c in out] == plain_greedy(target_model)
    assert joined.reopened == len(PROMPTS) and joined.times.calls > 0  # reopened from the verifier's features
    assert pool.addresses == [addr(d2)]


# -- the router following a Service ------------------------------------------------------------------------------


def test_the_router_follows_a_services_endpoints_with_nothing_lost(services, target_model, bg, monkeypatch):
    """A router started on k8s:// addresses: the verifier tier scales 1 -> 2 -> 1 (the first pod leaves) while
    requests decode on both; every request finishes with plain greedy output. Rounds are slowed to 30 ms, so the
    requests are still running when the endpoints change."""
    v1, v2, d = services("verifier"), services("verifier"), services("draft")
    ip_port = {s: addr(s).split(":") for s in (v1, v2, d)}
    vapi = FakeCoreV1([endpoints("v", [ip_port[v1][0]], port=int(ip_port[v1][1]))])
    dapi = FakeCoreV1([endpoints("d", [ip_port[d][0]], port=int(ip_port[d][1]))])
    apis = {"v": vapi, "d": dapi}
    real_init = EndpointsWatch.__init__

    def with_fake_api(self, ref, on_change, api=None, retry_s=1.0):
        real_init(self, ref, on_change, api=apis[ref.name], retry_s=retry_s)

    monkeypatch.setattr(EndpointsWatch, "__init__", with_fake_api)
    real_verify = RemoteVerifier.verify

    def slow_verify(self, items):
        time.sleep(0.03)
        return real_verify(self, items)

    monkeypatch.setattr(RemoteVerifier, "verify", slow_verify)
    router = Router(RouterConfig(verifier="k8s://ns/v", draft="k8s://ns/d", max_tokens=16), tokenizer=Letters())
    try:
        pool = router.decoder.verifier.inner
        assert pool.addresses == [addr(v1)]
        params = router.sampling_params(1, 16, 0.0, None, None, None, ignore_eos=True)

        async def run_all(prompts):
            return await asyncio.gather(*(router.generate(p, params) for p in prompts))

        before = pinned("verifier", addr(v2))
        restored = metrics.RESTORED._value.get()
        fut1 = asyncio.run_coroutine_threadsafe(run_all(PROMPTS[:2]), bg.loop)
        both = endpoints("v", [ip_port[v1][0]], port=int(ip_port[v1][1]), rv="2")
        both["subsets"].append(endpoints("v", [ip_port[v2][0]], port=int(ip_port[v2][1]))["subsets"][0])
        vapi.push("MODIFIED", both)
        wait_for(lambda: len(pool.addresses) == 2)
        fut2 = asyncio.run_coroutine_threadsafe(run_all(PROMPTS[2:]), bg.loop)
        wait_for(lambda: pool.sessions().get(addr(v2), 0) == 2)
        assert pool.sessions()[addr(v1)] == 2  # the first requests still decode on the first pod
        vapi.push("MODIFIED", endpoints("v", [ip_port[v2][0]], port=int(ip_port[v2][1]), rv="3"))
        wait_for(lambda: pool.failovers == 2)  # the first pod's two sessions moved to the one that stays
        assert pool.addresses == [addr(v2)]
        wait_for(lambda: metrics.RESTORED._value.get() - restored == 2)  # and the router's counter says so
        out = [d[0].token_ids for d in fut1.result(60) + fut2.result(60)]
        assert out == plain_greedy(target_model, params=params[0])
        assert pinned("verifier", addr(v2)) - before == 2  # the new pod took the requests that came after it
    finally:
        router.close()
        vapi.events.put(None)
        dapi.events.put(None)
