"""Where a tier's replicas are: the ready addresses of a headless Service, followed through the Kubernetes API.

A tier address `k8s://[namespace/]service[:port]` (in `--verifier` / `--draft`, or the Serve config's args) names a
Service whose Endpoints list the tier's ready pods; `port` is the Endpoints port's name or number (default: its only
port, else the one named `grpc`), `namespace` defaults to the pod's own. Any other address is a static host:port list.

Pure part, testable without a cluster: `service_ref` parses the address, `endpoint_addresses` reads one Endpoints
object (the dict the API sends) into its ready "ip:port" addresses (notReadyAddresses are not ready), `Membership`
folds a stream of watch events (the initial list, ADDED, MODIFIED, DELETED) into the tier's address set and says
what joined and what left. Shell: `EndpointsWatch`, a thread that lists and then watches one Service's Endpoints
with the `kubernetes` client, reconnecting after errors and listing again after a 410 Gone.

Endpoints, not EndpointSlices: core/v1 Endpoints is served from 1.20 (EndpointSlice only as v1beta1 there) to today.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("dspark.router.discovery")

SCHEME = "k8s://"
DISCOVERY_WAIT_S = 300.0  # how long a router starting up waits for a tier's first ready replica
_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class ServiceRef:
    namespace: str | None  # None: the pod's own namespace
    name: str
    port: str | None  # the Endpoints port's name or number; None: its only port (or `grpc`)

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{SCHEME}{ns}{self.name}" + (f":{self.port}" if self.port else "")


def is_discovered(address: str | None) -> bool:
    return bool(address) and address.strip().startswith(SCHEME)


def service_ref(address: str) -> ServiceRef:
    """`k8s://[namespace/]service[:port]` -> a ServiceRef; anything else is a ValueError naming the address."""
    a = address.strip()
    if not a.startswith(SCHEME):
        raise ValueError(f"{address!r} is not a Kubernetes tier address (k8s://[namespace/]service[:port])")
    rest = a[len(SCHEME) :]
    namespace, _, rest = rest.rpartition("/")
    name, _, port = rest.partition(":")
    if not name or "/" in namespace or "," in a:
        raise ValueError(f"{address!r}: expected k8s://[namespace/]service[:port], one Service per tier")
    return ServiceRef(namespace or None, name, port or None)


def _pick_port(ports: list[dict], want: str | None) -> int | None:
    if want is not None:
        for p in ports:
            if str(p.get("port")) == want or p.get("name") == want:
                return int(p["port"])
        return None
    if len(ports) == 1:
        return int(ports[0]["port"])
    return next((int(p["port"]) for p in ports if p.get("name") == "grpc"), None)


def endpoint_addresses(endpoints: dict | None, port: str | None = None) -> frozenset[str]:
    """The ready "ip:port" addresses of one Endpoints object (camelCase dict, as the API serves it)."""
    out = set()
    for subset in (endpoints or {}).get("subsets") or ():
        number = _pick_port(subset.get("ports") or [], port)
        if number is None:
            continue
        for a in subset.get("addresses") or ():  # notReadyAddresses: not ready, not routed to
            ip = a.get("ip")
            if ip:
                out.add(f"[{ip}]:{number}" if ":" in ip else f"{ip}:{number}")
    return frozenset(out)


@dataclass(frozen=True)
class Change:
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.joined or self.left)


class Membership:
    """A tier's ready addresses, from one Service's Endpoints events; each event says what joined and left."""

    def __init__(self, ref: ServiceRef):
        self.ref = ref
        self.addresses: frozenset[str] = frozenset()
        self.resource_version: str | None = None

    def _become(self, new: frozenset[str]) -> Change:
        change = Change(tuple(sorted(new - self.addresses)), tuple(sorted(self.addresses - new)))
        self.addresses = new
        return change

    def listed(self, items: list[dict], resource_version: str | None = None) -> Change:
        """The answer of a list call (the Endpoints named ref.name among `items`): the whole state again."""
        self.resource_version = resource_version
        mine = [e for e in items if (e.get("metadata") or {}).get("name") == self.ref.name]
        return self._become(endpoint_addresses(mine[0] if mine else None, self.ref.port))

    def event(self, kind: str, obj: dict) -> Change:
        """One watch event: ADDED / MODIFIED carry the object's new state, DELETED leaves nothing, BOOKMARK only moves
        the resource version. Events of other Services (a watch without a field selector) change nothing."""
        meta = obj.get("metadata") or {}
        self.resource_version = meta.get("resourceVersion") or self.resource_version
        if kind == "BOOKMARK" or meta.get("name") != self.ref.name:
            return Change()
        if kind == "DELETED":
            return self._become(frozenset())
        if kind in ("ADDED", "MODIFIED"):
            return self._become(endpoint_addresses(obj, self.ref.port))
        raise ValueError(f"unknown watch event type {kind!r}")


def pod_namespace(default: str = "default") -> str:
    try:
        with open(_NAMESPACE_FILE) as f:
            return f.read().strip() or default
    except OSError:
        return default


def kubernetes_api():
    """A CoreV1Api: in-cluster credentials (the router's ServiceAccount token) inside a pod, else ~/.kube/config
    or $KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


class EndpointsWatch:
    """Lists, then watches one Service's Endpoints on a daemon thread; `on_change(Change)` runs on that thread.

    `wait_ready(timeout_s)` blocks until the first list is in and at least one address is ready (how the router
    starts: it needs one replica of each tier to learn the model). Errors reconnect after `retry_s`; a 410 Gone (the
    resource version is too old) lists again, and the difference to what was known comes out as one Change.
    """

    def __init__(self, ref: ServiceRef, on_change: Callable[[Change], None], api=None, retry_s: float = 1.0):
        self.ref = ref if ref.namespace else ServiceRef(pod_namespace(), ref.name, ref.port)
        self.membership = Membership(self.ref)
        self.on_change, self.retry_s = on_change, retry_s
        self._api = api
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._watch = None
        self._thread = threading.Thread(target=self._run, name=f"dspark-discovery-{self.ref.name}", daemon=True)

    def start(self) -> EndpointsWatch:
        if self._api is None:  # fail here, not on the watch thread, where the router would wait for replicas forever
            try:
                import kubernetes  # noqa: F401
            except ImportError as e:
                raise RuntimeError(
                    f"discovery of {self.ref} through the Kubernetes API needs the `kubernetes` package "
                    "(pip install kubernetes)"
                ) from e
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> frozenset[str]:
        if not self._ready.wait(timeout_s):
            raise ConnectionError(f"no ready replica behind {self.ref} within {timeout_s:.0f} s")
        return self.membership.addresses

    def _emit(self, change: Change) -> None:
        if change:
            log.info("%s: joined %s, left %s", self.ref, list(change.joined), list(change.left))
            try:
                self.on_change(change)
            except Exception:  # noqa: BLE001 - a bad replica must not stop the watch
                log.exception("%s: applying %s failed", self.ref, change)
        if self.membership.addresses:
            self._ready.set()

    def _list(self, api) -> None:
        out = api.list_namespaced_endpoints(self.ref.namespace, field_selector=f"metadata.name={self.ref.name}")
        items = api.api_client.sanitize_for_serialization(out.items)
        self._emit(self.membership.listed(items, out.metadata.resource_version))

    def _run(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        relist = True
        while not self._stop.is_set():
            try:
                api = self._api = self._api or kubernetes_api()
                if relist:
                    self._list(api)
                    relist = False
                self._watch = watch.Watch()
                for ev in self._watch.stream(
                    api.list_namespaced_endpoints,
                    self.ref.namespace,
                    field_selector=f"metadata.name={self.ref.name}",
                    resource_version=self.membership.resource_version,
                    timeout_seconds=300,
                ):
                    if self._stop.is_set():
                        return
                    self._emit(self.membership.event(ev["type"], ev["raw_object"]))
            except ApiException as e:
                relist = e.status == 410
                if not relist:
                    log.warning("%s: watch failed (%s); retrying in %.0f s", self.ref, e.status, self.retry_s)
                    self._stop.wait(self.retry_s)
            except Exception as e:  # noqa: BLE001 - API server away, connection reset: try again
                log.warning("%s: watch failed (%s); retrying in %.0f s", self.ref, e, self.retry_s)
                relist = True
                self._stop.wait(self.retry_s)

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()
