"""Client-side load spreading over several Triton servers: round robin per request, failover, periodic re-resolve.

Why on the client: gRPC keeps one long-lived HTTP/2 connection per client, and a Kubernetes ClusterIP Service
balances per connection, so a microscope would stay on one pod and pods the autoscaler adds would get no existing
stream. With a headless Service (deploy/k8s/service.yaml) the DNS name resolves to every ready pod, and this pool
sends each frame to the next one.

`--url` forms (`open_client`):

    127.0.0.1:8001                              one server: a plain TritonPipelineClient
    10.0.0.5:8001,10.0.0.6:8001                 a fixed list, round robin per request
    dns:///leukograph-triton.leukograph.svc.cluster.local:8001
                                                every address the name resolves to, re-resolved every 30 s: pods
                                                that appear join the rotation, pods that vanish leave it

Failover: a request that fails because its server is unavailable (connection refused or reset, server killed, model
not loaded) is sent again, at once, to the next server; that server is taken out of the rotation and a background
thread reconnects to it every second until it is ready again. The caller sees the failure only when no server is
left, and then its own retry logic (`leukograph stream --retry-timeout`) takes over. Inference is stateless, so a
frame answered by the second server is the same frame: it is recorded once, by the caller, after the one answer
it gets. A request the server rejects as bad is not re-sent anywhere.

The pool offers the part of TritonPipelineClient's interface `leukograph stream` uses (submit, infer, wait_ready,
reconnect, is_ready, weights_id, close). System shared memory needs the server on the same host: one URL only.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from leukograph.client.triton_client import (
    DEFAULT_REQUEST_TIMEOUT_S,
    InferOutcome,
    PipelineError,
    ServerUnavailable,
    TritonPipelineClient,
)

DNS_SCHEME = "dns:///"
RESOLVE_EVERY_S = 30.0  # re-resolve a dns:/// name this often (new pods join within this time)
REPROBE_EVERY_S = 1.0  # reconnect to a failed server this often
PROBE_TIMEOUT_S = 1.0


def _default_log(message: str) -> None:
    print(f"leukograph endpoints: {message}", file=sys.stderr, flush=True)


def parse_urls(spec: str) -> tuple[list[str], tuple[str, int] | None]:
    """(fixed URLs, None) for `a:1,b:2`, or ([], (host, port)) for `dns:///host:port`. ValueError when malformed."""
    spec = spec.strip()
    if spec.startswith(DNS_SCHEME):
        target = spec[len(DNS_SCHEME):]
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{spec!r}: expected dns:///NAME:PORT")
        return [], (host.strip("[]"), int(port))
    urls = [part.strip() for part in spec.split(",") if part.strip()]
    if not urls:
        raise ValueError(f"{spec!r}: no server URL")
    return urls, None


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as sorted `ip:port` URLs (IPv6 in brackets). OSError when it does not."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    urls = set()
    for family, _, _, _, address in infos:
        ip = address[0]
        urls.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(urls)


@dataclass
class _Endpoint:
    url: str
    client: TritonPipelineClient
    down_since: float | None = None  # None: in the rotation
    next_probe: float = 0.0
    in_flight: int = 0
    retired: bool = False  # no longer resolved: closed when its last request ends


@dataclass
class PoolStats:
    answered: Counter = field(default_factory=Counter)  # url -> requests answered
    failovers: int = 0  # requests re-sent to another server after theirs was unavailable


class EndpointPool:
    """Round robin over several servers' `leukocyte_pipeline`, with failover and (dns:///) re-resolution."""

    def __init__(self, spec: str, protocol: str = "grpc", *, localizer: str = "server", max_in_flight: int = 2,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, resolve_every_s: float = RESOLVE_EVERY_S,
                 log: Callable[[str], None] = _default_log) -> None:
        self.url = spec
        self.protocol = protocol
        self.localizer = localizer
        self.use_shm = False
        self.max_in_flight = max_in_flight
        self.request_timeout_s = request_timeout_s
        self.resolve_every_s = resolve_every_s
        self.log = log
        self.stats = PoolStats()
        self._fixed, self._dns = parse_urls(spec)
        self._lock = threading.RLock()
        self._endpoints: dict[str, _Endpoint] = {}
        self._order: list[str] = []
        self._next = 0
        self._weights_id: str | None = None
        self._closed = threading.Event()
        self._resolved_at = 0.0
        self.resolutions = 0  # DNS look-ups of a dns:/// name so far
        self._set_urls(self._fixed or self._resolve_or_keep())
        self._maintainer = threading.Thread(target=self._maintain, name="triton-endpoints", daemon=True)
        self._maintainer.start()

    # ---- membership ----------------------------------------------------------------------------
    def _resolve_or_keep(self) -> list[str]:
        assert self._dns is not None
        self._resolved_at = time.monotonic()
        self.resolutions += 1
        try:
            urls = resolve(*self._dns)
        except OSError as exc:
            self.log(f"cannot resolve {self._dns[0]} ({exc}); keeping {len(self._order)} known server(s)")
            return list(self._order)
        return urls or list(self._order)

    def _set_urls(self, urls: list[str]) -> None:
        with self._lock:
            added = [u for u in urls if u not in self._endpoints]
            removed = [u for u in self._order if u not in urls]
            for url in added:
                self._endpoints[url] = _Endpoint(url, TritonPipelineClient(
                    url, self.protocol, localizer=self.localizer, max_in_flight=self.max_in_flight,
                    request_timeout_s=self.request_timeout_s))
            for url in removed:
                endpoint = self._endpoints[url]
                endpoint.retired = True
                if endpoint.in_flight == 0:
                    self._drop(endpoint)
            self._order = [u for u in urls]
            if self._order:
                self._next %= len(self._order)
        if self._dns is not None and (added or removed) and self._resolved_at:
            self.log(f"{self._dns[0]}: {len(urls)} server(s): {', '.join(urls) or '-'}")

    def _drop(self, endpoint: _Endpoint) -> None:
        self._endpoints.pop(endpoint.url, None)
        endpoint.client.close()

    @property
    def urls(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def up_urls(self) -> list[str]:
        with self._lock:
            return [u for u in self._order if self._endpoints[u].down_since is None]

    # ---- health --------------------------------------------------------------------------------
    def _mark_down(self, endpoint: _Endpoint, why: str) -> None:
        with self._lock:
            if endpoint.down_since is not None:
                return
            endpoint.down_since = time.monotonic()
            endpoint.next_probe = endpoint.down_since + REPROBE_EVERY_S
        self.log(f"{endpoint.url} unavailable ({why}); out of the rotation")

    def _probe(self, endpoint: _Endpoint) -> bool:
        """Fresh connection + readiness; back into the rotation when ready."""
        ok = endpoint.client.reconnect(timeout=PROBE_TIMEOUT_S, should_stop=self._closed.is_set)
        with self._lock:
            if ok and endpoint.down_since is not None:
                endpoint.down_since = None
                self.log(f"{endpoint.url} ready; back in the rotation")
            elif not ok:
                endpoint.down_since = endpoint.down_since or time.monotonic()
                endpoint.next_probe = time.monotonic() + REPROBE_EVERY_S
        return ok

    def _maintain(self) -> None:
        """Background: re-resolve the name every resolve_every_s, reconnect to failed servers every second."""
        while not self._closed.wait(0.2):
            if self._dns is not None and time.monotonic() - self._resolved_at >= self.resolve_every_s:
                self._set_urls(self._resolve_or_keep())
            with self._lock:
                due = [e for e in self._endpoints.values()
                       if e.down_since is not None and not e.retired and time.monotonic() >= e.next_probe]
            for endpoint in due:
                if self._closed.is_set():
                    return
                self._probe(endpoint)

    # ---- choosing a server ---------------------------------------------------------------------
    def _pick(self, tried: set[str]) -> _Endpoint | None:
        """The next server in the rotation not yet tried for this request (round robin), or None."""
        with self._lock:
            for _ in range(len(self._order)):
                url = self._order[self._next]
                self._next = (self._next + 1) % len(self._order)
                endpoint = self._endpoints[url]
                if endpoint.down_since is None and url not in tried:
                    endpoint.in_flight += 1
                    return endpoint
        return None

    def _release(self, endpoint: _Endpoint) -> None:
        with self._lock:
            endpoint.in_flight -= 1
            if endpoint.retired and endpoint.in_flight == 0:
                self._drop(endpoint)

    # ---- requests ------------------------------------------------------------------------------
    def submit(self, frame: np.ndarray, boxes: np.ndarray | None, callback: Callable[[InferOutcome], None],
               validate: bool = True) -> None:
        """Like TritonPipelineClient.submit; a server that turns out unavailable passes the request to the next."""
        started = time.perf_counter()
        tried: set[str] = set()

        def attempt() -> None:
            endpoint = self._pick(tried)
            if endpoint is None:
                error = ServerUnavailable(f"no server available of {len(self.urls)} ({self.url})")
                callback(InferOutcome(None, None, error, time.perf_counter() - started))
                return
            tried.add(endpoint.url)

            def done(outcome: InferOutcome) -> None:
                self._release(endpoint)
                if isinstance(outcome.error, ServerUnavailable):
                    self._mark_down(endpoint, str(outcome.error).splitlines()[0][:120])
                    with self._lock:
                        self.stats.failovers += 1
                    attempt()
                    return
                if outcome.ok:
                    with self._lock:
                        self.stats.answered[endpoint.url] += 1
                outcome.latency_s = time.perf_counter() - started
                callback(outcome)

            endpoint.client.submit(frame, boxes, done, validate)

        attempt()

    def infer(self, frame: np.ndarray, boxes: np.ndarray | None, validate: bool = True) -> tuple[np.ndarray,
                                                                                                 np.ndarray]:
        """One blocking request through `submit` (round robin, failover). Raises PipelineError."""
        finished = threading.Event()
        result: list[InferOutcome] = []

        def collect(outcome: InferOutcome) -> None:
            result.append(outcome)
            finished.set()

        self.submit(frame, boxes, collect, validate)
        finished.wait()
        outcome = result[0]
        if outcome.error is not None:
            raise outcome.error
        assert outcome.probs is not None and outcome.labels is not None
        return outcome.probs, outcome.labels

    # ---- readiness -----------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """At least one server ready (those that are go back into the rotation)."""
        return any(self._check(endpoint) for endpoint in self._snapshot())

    def _snapshot(self) -> list[_Endpoint]:
        with self._lock:
            return [self._endpoints[u] for u in self._order]

    def _check(self, endpoint: _Endpoint) -> bool:
        if endpoint.client.is_ready():
            with self._lock:
                endpoint.down_since = None
            return True
        self._mark_down(endpoint, "not ready")
        return False

    def wait_ready(self, timeout: float = 60.0, should_stop: Callable[[], bool] | None = None,
                   on_wait: Callable[[float, str], None] | None = None) -> bool:
        """Until at least one server is ready: each server's own wait (backoff, fresh connections) in turn, in
        slices of at most 2 s, within `timeout`. False on timeout or stop."""
        deadline = time.monotonic() + timeout
        while True:
            if self._dns is not None and not self._order:
                self._set_urls(self._resolve_or_keep())
            for endpoint in self._snapshot():
                left = max(deadline - time.monotonic(), 0.0)
                if endpoint.client.wait_ready(min(left, 2.0), should_stop, on_wait):
                    return self.is_ready()  # the others that are not ready leave the rotation
            if time.monotonic() >= deadline or (should_stop and should_stop()):
                return False

    def reconnect(self, timeout: float = 60.0, should_stop: Callable[[], bool] | None = None) -> bool:
        """Re-resolve (dns:///), reconnect to every server, True when at least one is ready within `timeout`."""
        if self._dns is not None:
            self._set_urls(self._resolve_or_keep())
        deadline = time.monotonic() + timeout
        while True:
            ready = [e for e in self._snapshot() if (self._probe(e) if e.down_since is not None else self._check(e))]
            if ready:
                return True
            if time.monotonic() >= deadline or (should_stop and should_stop()):
                return False
            time.sleep(0.1)

    # ---- weights id ----------------------------------------------------------------------------
    @property
    def weights_id(self) -> str:
        if self._weights_id is None:
            self._weights_id = self.fetch_weights_id()
        return self._weights_id

    def fetch_weights_id(self) -> str:
        """The served models' version, from the first server that answers (all serve the same repository)."""
        last: PipelineError = ServerUnavailable(f"no server available ({self.url})")
        for endpoint in self._snapshot():
            if endpoint.down_since is not None:
                continue
            try:
                return endpoint.client.fetch_weights_id()
            except PipelineError as exc:
                last = exc
                self._mark_down(endpoint, str(exc)[:120])
        raise last

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        self._closed.set()
        if self._maintainer.is_alive() and threading.current_thread() is not self._maintainer:
            self._maintainer.join(5)
        with self._lock:
            endpoints, self._endpoints, self._order = list(self._endpoints.values()), {}, []
        for endpoint in endpoints:
            with contextlib.suppress(Exception):  # best effort on a dead server
                endpoint.client.close()

    def __enter__(self) -> EndpointPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_client(url: str | None, protocol: str = "grpc", *, localizer: str = "server", shm: bool = False,
                max_in_flight: int = 2,
                log: Callable[[str], None] = _default_log) -> TritonPipelineClient | EndpointPool:
    """A TritonPipelineClient for one server URL (or none: the default), an EndpointPool for a list or dns:///.

    Raises ValueError for a malformed URL list and for --shm with several servers."""
    if url is None:
        return TritonPipelineClient(None, protocol, localizer=localizer, shm=shm, max_in_flight=max_in_flight)
    fixed, dns = parse_urls(url)
    if dns is None and len(fixed) == 1:
        return TritonPipelineClient(fixed[0], protocol, localizer=localizer, shm=shm, max_in_flight=max_in_flight)
    if shm:
        raise ValueError("--shm needs one server on this host, not a list or a dns:/// name")
    return EndpointPool(url, protocol, localizer=localizer, max_in_flight=max_in_flight, log=log)
