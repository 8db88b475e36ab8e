"""The draft and verifier services over real gRPC on localhost (tiny random-weight models): the decode loop through
RemoteProposer + RemoteVerifier gives exactly what it gives in process, survives a lost drafter or verifier, and the
services answer bad calls with the right status codes."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_core_decoding_stats import (
    _tiny_llama,
    assert_samples_follow_the_target,
)

from dspark.core.config import EngineConfig
from dspark.core.decoding import Decoder
from dspark.core.engine import TargetEngine
from dspark.core.sampling import SamplingParams
from dspark.core.scheduler import SpsTable
from dspark.draft.service import DraftCore
from dspark.drafter.model import DSparkDrafter
from dspark.drafter.proposer import DSparkProposer
from dspark.router.remote import RemoteProposer, RemoteVerifier
from dspark.serving.grpc_server import MISSING_SESSIONS, ServerConfig
from dspark.stack.serve import start_draft, start_verifier
from dspark.v1 import draft_pb2 as dpb
from dspark.v1 import draft_pb2_grpc, verifier_pb2_grpc
from dspark.v1 import verifier_pb2 as vpb
from dspark.verifier.service import VerifierCore

LAYERS = (0, 1, 2)
KNEE = SpsTable(tuple(range(1, 257)), tuple(100.0 * min(1.0, 24 / b) for b in range(1, 257)))
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[3, 4, 5], [6], [7, 1, 2, 3], [4, 4]]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target_model():
    return _tiny_llama(seed=0, hidden=32, layers=2, heads=4, kv_heads=2)


def make_verifier_core(model, max_requests=16, ttl_s=600.0, clock=None, sps=KNEE):
    engine = TargetEngine(EngineConfig(max_requests=max_requests, max_context=24, feature_layers=LAYERS), model=model)
    extra = {} if clock is None else {"clock": clock}
    return VerifierCore(engine, sps, eos_token_ids=(), ttl_s=ttl_s, **extra)


def make_draft_core(model, max_support=4, ttl_s=600.0, clock=None):
    torch.manual_seed(1)
    drafter = DSparkDrafter.from_target_model(model, feature_layers=LAYERS, n_layer=1, gamma=4, markov_rank=8)
    drafter.conf_temperature.fill_(0.3)
    extra = {} if clock is None else {"clock": clock}
    return DraftCore(DSparkProposer(drafter, max_support=max_support), ttl_s=ttl_s, **extra)


@pytest.fixture(scope="module")
def stack(bg, target_model):
    """(verifier Service, draft Service) on ports picked by the OS."""
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    yield v, d
    bg.run(v.stop(0))
    bg.run(d.stop(0))


def remote_decoder(vport, dport, policy="dspark", **kw):
    verifier = RemoteVerifier(f"127.0.0.1:{vport}", connect_s=10)
    proposer = RemoteProposer(f"127.0.0.1:{dport}", verifier.vocab_size, features_of=verifier.refeature, **kw)
    return Decoder(verifier, proposer, num_draft=4, policy=policy)


def plain_greedy(model, prompts=PROMPTS, params=GREEDY):
    return [
        c.token_ids
        for c in Decoder(TargetEngine(EngineConfig(max_requests=4, max_context=24), model=model)).generate(
            prompts, params
        )
    ]


@pytest.mark.parametrize("policy", ["dspark", "fixed", "autoregressive"])
def test_greedy_through_the_services_is_plain_greedy(stack, target_model, policy):
    v, d = stack
    dec = remote_decoder(v.port, d.port, policy)
    out = dec.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in out] == plain_greedy(target_model)
    assert (sum(c.stats.drafted for c in out) > 0) == (policy != "autoregressive")
    assert sum(c.stats.accepted for c in out) <= sum(c.stats.scheduled for c in out)
    assert dec.verifier.free_slots == dec.verifier.max_sessions


def test_remote_matches_in_process_statistics_too(stack, target_model):
    """Same drafter weights, same seeds: the services reproduce the in-process decode loop token for token at T>0,
    sparse drafts included (max_support=4 on both sides)."""
    v, d = stack
    params = [SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=i) for i in range(4)]
    local = Decoder(
        make_verifier_core(target_model).engine, make_draft_core(target_model).proposer, num_draft=4, policy="fixed"
    ).generate(PROMPTS, params)
    remote = remote_decoder(v.port, d.port, "fixed").generate(PROMPTS, params)
    assert [c.token_ids for c in remote] == [c.token_ids for c in local]
    assert [c.stats.accepted_per_position for c in remote] == [c.stats.accepted_per_position for c in local]


def test_a_remote_draft_call_is_split_into_the_services_phases_and_the_wire(stack):
    """The draft service reports its compute phases with each answer; the caller counts the rest of its call as the
    wire, so the phases add up to the call as the caller timed it."""
    v, d = stack
    dec = remote_decoder(v.port, d.port, "fixed")
    dec.generate(PROMPTS, GREEDY)
    t = dec.proposer.times
    assert t.calls == dec.times.draft_calls > 0
    assert t.context_s > 0 and t.backbone_s > 0 and t.head_s > 0 and t.wire_s > 0
    assert t.total_s == pytest.approx(dec.times.draft_s, rel=0.2)
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("dspark_draft_phase_seconds_count", {"phase": "backbone"}) >= t.calls


def test_sampling_through_the_services_keeps_the_target_distribution(stack, target_model):
    v, d = stack
    n, max_tokens, prompt = 1500, 4, [3, 4, 5]
    dec = remote_decoder(v.port, d.port, "dspark")
    done = assert_samples_follow_the_target(target_model, dec, n, prompt, max_tokens, keeps=[(0, 1), (2, 3)])
    assert sum(c.stats.accepted for c in done) > 0


def test_drafter_lost_mid_generation_falls_back_to_plain_decoding_then_resumes(bg, target_model):
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    port = d.port
    dec = remote_decoder(v.port, port, "fixed", retry_after_s=0.0, timeout_s=2.0)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ids = [dec.add_request(p, params) for p in PROMPTS]
    done = {}
    for _ in range(2):
        done.update((c.request_id, c) for c in dec.step())
    bg.run(d.stop(0))  # the drafter dies
    failures = dec.proposer.failures
    for _ in range(2):
        done.update((c.request_id, c) for c in dec.step())
    assert dec.proposer.failures > failures  # rounds ran without drafts
    calls = dec.proposer.times.calls
    d2 = bg.run(start_draft(make_draft_core(target_model), ServerConfig(address=f"127.0.0.1:{port}")))
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i] for i in ids]
    assert [c.token_ids for c in out] == plain_greedy(target_model, params=params)
    assert dec.proposer.times.calls > calls  # speculation resumed on the new drafter
    assert dec.proposer.reopened >= len(PROMPTS)  # every session reopened, with features recomputed by the verifier
    bg.run(v.stop(0))
    bg.run(d2.stop(0))


def test_verifier_restarted_mid_generation_loses_no_request(bg, target_model):
    v = bg.run(start_verifier(make_verifier_core(target_model)))
    d = bg.run(start_draft(make_draft_core(target_model)))
    port = v.port
    dec = remote_decoder(port, d.port, "dspark")
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    seeded = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=40 + i) for i in range(len(PROMPTS))]
    ids = [dec.add_request(p, greedy) for p in PROMPTS] + [dec.add_request(p, sp) for p, sp in zip(PROMPTS, seeded)]
    done = {}
    for _ in range(2):
        done.update((c.request_id, c) for c in dec.step())
    bg.run(v.stop(0))
    v2 = bg.run(start_verifier(make_verifier_core(target_model), ServerConfig(address=f"127.0.0.1:{port}")))
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i].token_ids for i in ids]
    assert out[: len(PROMPTS)] == plain_greedy(target_model, params=greedy)
    assert dec.verifier.restored > 0  # sessions rebuilt from the router's history
    # a seeded request's randomness is keyed by position: restored, it draws what it would have drawn uninterrupted
    undisturbed = remote_decoder(port, d.port, "dspark").generate(PROMPTS + PROMPTS, [greedy] * len(PROMPTS) + seeded)
    assert out == [c.token_ids for c in undisturbed]
    bg.run(v2.stop(0))
    bg.run(d.stop(0))


def slow_prefill(core: VerifierCore, delay_s: float) -> VerifierCore:
    """The core, its every Prefill call taking delay_s longer (a call that is still in the model)."""
    fast = core.prefill_msg

    def prefill_slowly(m):
        time.sleep(delay_s)
        return fast(m)

    core.prefill_msg = prefill_slowly
    return core


def _code(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def test_status_codes(stack):
    v, d = stack
    vch = grpc.insecure_channel(f"127.0.0.1:{v.port}")
    dch = grpc.insecure_channel(f"127.0.0.1:{d.port}")
    vs, ds = verifier_pb2_grpc.VerifierServiceStub(vch), draft_pb2_grpc.DraftServiceStub(dch)
    p = vpb.SamplingParams(temperature=0.0)

    def prefill(*reqs):
        return vs.Prefill(vpb.PrefillInput(requests=list(reqs)), timeout=10)

    e = _code(lambda: prefill(vpb.PrefillRequest(session_id="a", token_ids=[], params=p)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty" in e.details()
    e = _code(lambda: prefill(vpb.PrefillRequest(session_id="a", token_ids=list(range(2, 8)) * 5, params=p)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 24 tokens" in e.details()
    e = _code(
        lambda: prefill(vpb.PrefillRequest(session_id="a", token_ids=[3], params=vpb.SamplingParams(temperature=-1)))
    )
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.details()
    e = _code(lambda: prefill(vpb.PrefillRequest(session_id="a", token_ids=[99], params=p)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in e.details()
    many = [vpb.PrefillRequest(session_id=f"s{i}", token_ids=[3], params=p) for i in range(17)]
    e = _code(lambda: prefill(*many))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "slots free" in e.details()
    e = _code(
        lambda: vs.Verify(vpb.VerifyInput(requests=[vpb.VerifyRequest(session_id="ghost", anchor=3)]), timeout=10)
    )
    assert e.code() == grpc.StatusCode.NOT_FOUND and ("ghost" in dict(e.trailing_metadata())[MISSING_SESSIONS])
    # a draft token with probability 0 under its own distribution would always be accepted: refused
    (first,) = prefill(vpb.PrefillRequest(session_id="z", token_ids=[3, 4], params=p)).results
    bad = vpb.VerifyRequest(
        session_id="z",
        anchor=first.token_id,
        draft_token_ids=[5],
        draft_probs=[vpb.SparseDistribution(token_ids=[6], probs=[1.0])],
        position=2,
    )
    e = _code(lambda: vs.Verify(vpb.VerifyInput(requests=[bad]), timeout=10))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "probability 0" in e.details()
    assert vs.Release(vpb.ReleaseInput(session_ids=["z", "never"]), timeout=10).released == 1

    e = _code(
        lambda: ds.Draft(
            dpb.DraftInput(requests=[dpb.DraftRequest(session_id="q", start=5, new_token_ids=[3])]), timeout=10
        )
    )
    assert e.code() == grpc.StatusCode.NOT_FOUND and "restarted" in e.details()
    big = dpb.DraftRequest(session_id="q", start=0, new_token_ids=[3], num_draft=9, params=p)
    e = _code(lambda: ds.Draft(dpb.DraftInput(requests=[big]), timeout=10))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "block size" in e.details()
    blind = dpb.DraftRequest(session_id="q", start=0, new_token_ids=[3], num_draft=2, params=p)
    e = _code(lambda: ds.Draft(dpb.DraftInput(requests=[blind]), timeout=10))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "features" in e.details()
    assert ds.Info(vpb.InfoInput(), timeout=10).max_support == 4

    for ch in (vch, dch):
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert h.status == health_pb2.HealthCheckResponse.SERVING
    info = vs.Info(vpb.InfoInput(), timeout=10)
    assert info.max_context == 24 and list(info.sps.batch_tokens)[:3] == [1, 2, 3]
    for _ in range(50):  # finished requests' sessions were released (fire and forget)
        if vs.Info(vpb.InfoInput(), timeout=10).active_sessions == 0 and ds.Info(vpb.InfoInput()).active_sessions == 0:
            break
        time.sleep(0.05)
    assert vs.Info(vpb.InfoInput(), timeout=10).active_sessions == 0
    assert ds.Info(vpb.InfoInput(), timeout=10).active_sessions == 0


def test_idle_sessions_expire(target_model):
    now = [0.0]
    core = make_verifier_core(target_model, ttl_s=10.0, clock=lambda: now[0])
    from dspark.core.verifier import PrefillItem

    core.prefill([PrefillItem("a", [3, 4], GREEDY), PrefillItem("b", [5], GREEDY)])
    now[0] = 5.0
    assert core.expire() == 0
    now[0] = 11.0
    assert core.expire() == 2 and core.engine.free_slots == 16


def test_drain_lets_running_calls_finish_and_refuses_new_ones(bg, target_model):
    v = bg.run(start_verifier(slow_prefill(make_verifier_core(target_model), 0.5)))
    ch = grpc.insecure_channel(f"127.0.0.1:{v.port}")
    stub = verifier_pb2_grpc.VerifierServiceStub(ch)
    req = vpb.PrefillInput(requests=[vpb.PrefillRequest(session_id="a", token_ids=[3, 4], params=vpb.SamplingParams())])
    running = stub.Prefill.future(req, timeout=10)
    time.sleep(0.2)  # the call is in the model now
    stopping = asyncio.run_coroutine_threadsafe(v.stop(5.0), bg.loop)
    assert len(running.result().results) == 1  # finished during the drain
    stopping.result(10)
    with pytest.raises(grpc.RpcError) as e:
        stub.Prefill(req, timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_replica_pools_pin_requests_and_survive_losing_a_replica(bg, target_model):
    from dspark.router.pool import ProposerPool, VerifierPool

    vs = [bg.run(start_verifier(make_verifier_core(target_model, max_requests=4))) for _ in range(2)]
    ds = [bg.run(start_draft(make_draft_core(target_model))) for _ in range(2)]
    verifier = VerifierPool([RemoteVerifier(f"127.0.0.1:{v.port}", recover_s=0.5) for v in vs])
    proposer = ProposerPool(
        [
            RemoteProposer(f"127.0.0.1:{d.port}", 8, retry_after_s=60, timeout_s=2, features_of=verifier.refeature)
            for d in ds
        ]
    )
    dec = Decoder(verifier, proposer, num_draft=4, policy="dspark")
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ids = [dec.add_request(p, params) for p in PROMPTS]
    done = {}
    for _ in range(2):
        done.update((c.request_id, c) for c in dec.step())
    assert all(v.free_slots == 2 for v in verifier.replicas)  # four requests spread over two replicas
    bg.run(vs[0].stop(0))  # a verifier replica is gone for good
    bg.run(ds[0].stop(0))  # and so is a draft replica
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i] for i in ids]
    assert [c.token_ids for c in out] == plain_greedy(target_model, params=params)
    assert verifier.failovers == 2 and len(verifier.replicas) == 1
    assert sum(c.stats.drafted for c in out) > 0
    assert proposer.replicas[1].reopened > 0  # the requests of the lost draft replica, reopened on the other one
    for s in (vs[1], ds[1]):
        bg.run(s.stop(0))


def test_a_pool_prices_each_replica_with_its_own_table_and_stays_exact(bg, stack, target_model):
    """Two verifier replicas on 'different hardware': one where a bigger batch costs nothing (it verifies whole
    blocks), one whose cost grows with every query token (it verifies anchors only); greedy output is exact."""
    from dspark.router.pool import VerifierPool

    flat = SpsTable((1, 1024), (100.0, 100.0), ((2, SpsTable((2, 16), (100.0, 100.0))),))  # its row table travels too
    linear = SpsTable(tuple(range(1, 257)), tuple(100.0 / b for b in range(1, 257)))
    vs = [bg.run(start_verifier(make_verifier_core(target_model, max_requests=2, sps=t))) for t in (flat, linear)]
    pool = VerifierPool([RemoteVerifier(f"127.0.0.1:{v.port}") for v in vs])
    assert [pool.sps_of(r.address) for r in pool.replicas] == [flat, linear]
    dec = Decoder(pool, RemoteProposer(f"127.0.0.1:{stack[1].port}", pool.vocab_size), num_draft=4, policy="dspark")
    ids = [dec.add_request(p, GREEDY) for p in PROMPTS]
    done = {c.request_id: c for c in dec.step()}
    pins = {rid: pool.replica_of(rid) for rid in ids}
    assert sorted(pins.values()) == sorted(r.address for r in pool.replicas for _ in range(2))
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i] for i in ids]
    assert [c.token_ids for c in out] == plain_greedy(target_model)
    for rid, c in zip(ids, out):
        assert c.stats.drafted > 0
        expect = c.stats.drafted if pins[rid] == pool.replicas[0].address else 0
        assert c.stats.scheduled == expect
    pool.close()
    for v in vs:
        bg.run(v.stop(0))


def test_a_local_target_with_a_remote_drafter(stack, target_model):
    _, d = stack
    engine = make_verifier_core(target_model).engine
    dec = Decoder(engine, RemoteProposer(f"127.0.0.1:{d.port}", engine.vocab_size), num_draft=4, policy="fixed")
    dec.proposer.features_of = dec.verifier.refeature
    ids = [dec.add_request(p, GREEDY) for p in PROMPTS]
    done = {c.request_id: c for c in dec.step() + dec.step()}
    dec.proposer.release(ids[0])  # as if the draft service had lost this session: reopened from recomputed features
    while dec.has_work:
        done.update((c.request_id, c) for c in dec.step())
    out = [done[i] for i in ids]
    assert [c.token_ids for c in out] == plain_greedy(target_model)
    assert sum(c.stats.accepted for c in out) > 0 and dec.proposer.reopened == 1


def test_reflection_lists_the_services_and_deadlines_are_honoured_while_queued(bg, target_model):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    core = slow_prefill(make_verifier_core(target_model), 1.0)
    v = bg.run(start_verifier(core))
    ch = grpc.insecure_channel(f"127.0.0.1:{v.port}")
    names = set(ProtoReflectionDescriptorDatabase(ch).get_services())
    assert {"dspark.v1.VerifierService", "grpc.health.v1.Health"} <= names
    stub = verifier_pb2_grpc.VerifierServiceStub(ch)
    one = vpb.PrefillInput(requests=[vpb.PrefillRequest(session_id="a", token_ids=[3], params=vpb.SamplingParams())])
    two = vpb.PrefillInput(requests=[vpb.PrefillRequest(session_id="b", token_ids=[3], params=vpb.SamplingParams())])
    busy = stub.Prefill.future(one, timeout=10)
    time.sleep(0.2)
    with pytest.raises(grpc.RpcError) as e:
        stub.Prefill(two, timeout=0.3)  # queued behind the busy model past its deadline
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(busy.result().results) == 1
    assert core.sessions == 1  # the expired call never reached the model
    ch.close()
    bg.run(v.stop(0))
