"""The daemon's Prometheus metrics: what they are, how they are served, how they are read.

:class:`Metrics` owns every metric on its own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one, so that several daemons in one test process, or a library
that registers its own metrics, do not collide). The node and the service call its small
methods (``observe_acquire``, ``fetched``, ``evicted``, ``error``, ``set_resident``, …);
:func:`start_http` serves the registry as Prometheus text on ``metrics_address``;
:func:`scrape` and :func:`render_table` let ``weightd stats`` read that endpoint and print
it for people.

Labels
------
``tier``
    ``disk`` (the blob store), ``host`` (resident in RAM) or ``cuda`` (resident on a GPU).
``device``
    ``disk`` for the disk tier, ``cpu`` for the host tier and the GPU's UUID
    (``GPU-…``, never its index: indexes differ between processes) for the cuda tier.
``protocol``
    the source's protocol: ``s3``, ``gs``, ``hf``, ``http``, ``https``, ``file``.
``method``, ``code``
    the gRPC method (``Acquire``) and the status code's name (``NOT_FOUND``).
``model``, ``fetched_from``
    a model's name (as ``weightd ls`` prints it) and where its bytes came from:
    ``origin`` (its source), ``mirror`` (the cluster's mirror) or ``cache`` (this node's
    disk: nothing downloaded). There is no ``peer``: the cluster's nodes share bytes
    through the mirror, and bytes that a P2P proxy (Dragonfly) relays for an HTTP source
    count as the origin's (the proxy's own metrics say which of its peers served them).

This module must not know about the node, the store or gRPC: it only counts.
"""

from __future__ import annotations

import functools
import math
import threading
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
    start_http_server,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from weightd import __version__
from weightd.config import ConfigError, format_size, parse_address

#: The tiers, in order from slowest to fastest. Their label sets exist from the start, so
#: that ``rate()`` over a counter that has not moved yet reads 0 rather than nothing.
TIERS: tuple[str, ...] = ("disk", "host", "cuda")

#: Acquire latency: from a warm attach (well under a millisecond of daemon time) to a cold
#: fetch of a large model (minutes; slower ones land in +Inf).
ACQUIRE_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)

#: Duration of one model fetch from its source: a cache-hit listing to an hour-long pull.
FETCH_BUCKETS: tuple[float, ...] = (
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)


class Metrics:
    """Every weightd metric, on one registry of its own.

    Args:
        version: the value of ``weightd_info{version}``.
        process: also export the daemon's own ``process_*`` metrics (RSS, open fds, CPU).

    Example
    -------
    >>> m = Metrics(version="1.2.3")
    >>> m.observe_acquire("host", 0.002, hit=True)
    >>> m.set_resident("host", "cpu", 1 << 30)
    >>> b'weightd_hits_total{tier="host"} 1.0' in m.render()
    True
    """

    def __init__(self, *, version: str = __version__, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.resident_bytes = Gauge(
            "weightd_resident_bytes", "Bytes of model weights held by a tier on a device.",
            ("tier", "device"), registry=r)
        self.tier_budget_bytes = Gauge(
            "weightd_tier_budget_bytes", "Bytes a tier may hold on a device (its budget).",
            ("tier", "device"), registry=r)
        self.hits = Counter(
            "weightd_hits", "Requests a tier answered from what it already held.",
            ("tier",), registry=r)
        self.misses = Counter(
            "weightd_misses", "Requests a tier had to fill from the tier below (or the source).",
            ("tier",), registry=r)
        self.fetched_bytes = Counter(
            "weightd_fetched_bytes", "Bytes downloaded from model sources (not the mirror).",
            ("protocol",), registry=r)
        self.model_bytes = Counter(
            "weightd_model_bytes",
            "Bytes of a model's files by where they came from, each time a fetch needed "
            "them: origin, mirror or cache.", ("model", "fetched_from"), registry=r)
        self._by_model: dict[str, dict[str, int]] = {}
        self._by_model_lock = threading.Lock()
        self.fetch_seconds = Histogram(
            "weightd_fetch_seconds", "Time to fetch one model from its source into the cache.",
            buckets=FETCH_BUCKETS, registry=r)
        self.acquire_seconds = Histogram(
            "weightd_acquire_seconds",
            "Time the daemon took to answer an acquire, by the tier asked for.",
            ("tier",), buckets=ACQUIRE_BUCKETS, registry=r)
        self.leases = Gauge(
            "weightd_leases", "Leases currently held by client processes.", ("tier",), registry=r)
        self.evictions = Counter(
            "weightd_evictions", "Models evicted from a tier to make room or on request.",
            ("tier",), registry=r)
        self.errors = Counter(
            "weightd_errors", "Calls that failed, by gRPC method and status code.",
            ("method", "code"), registry=r)
        self.info = Info("weightd", "The running weightd.", registry=r)
        self.info.info({"version": version})
        for tier in TIERS:
            self.hits.labels(tier)
            self.misses.labels(tier)
            self.evictions.labels(tier)
            self.leases.labels(tier)
        if process:
            ProcessCollector(registry=r)

    # called by the node and the service ----------------------------------------------

    def lookup(self, tier: str, *, hit: bool) -> None:
        """Count one hit (the tier already held the model) or miss on ``tier``."""
        (self.hits if hit else self.misses).labels(tier).inc()

    def observe_acquire(self, tier: str, seconds: float, *, hit: bool) -> None:
        """Record one successful acquire on ``tier``: its latency, and a hit if the model
        was already resident there (a miss if it had to be loaded)."""
        self.acquire_seconds.labels(tier).observe(seconds)
        self.lookup(tier, hit=hit)

    def fetched(self, protocol: str, nbytes: int, seconds: float) -> None:
        """Record one model fetch: ``nbytes`` downloaded (0 when every file was cached) in
        ``seconds``."""
        self.fetched_bytes.labels(protocol).inc(nbytes)
        self.fetch_seconds.observe(seconds)

    def model_fetched(self, model: str, *, origin: int = 0, mirror: int = 0,
                      cache: int = 0) -> None:
        """Count the bytes of ``model`` that the node needed once more, by where they
        came from (see ``fetched_from`` in the module's docstring)."""
        counts = {"origin": origin, "mirror": mirror, "cache": cache}
        with self._by_model_lock:
            mine = self._by_model.setdefault(model, dict.fromkeys(counts, 0))
            for where, n in counts.items():
                mine[where] += n
        for where, n in counts.items():
            self.model_bytes.labels(model, where).inc(n)

    def bytes_by_model(self) -> dict[str, dict[str, int]]:
        """``{model: {"origin": n, "mirror": n, "cache": n}}`` since start (for Status)."""
        with self._by_model_lock:
            return {m: dict(c) for m, c in sorted(self._by_model.items())}

    def evicted(self, tier: str, n: int = 1) -> None:
        """Count ``n`` models evicted from ``tier``."""
        self.evictions.labels(tier).inc(n)

    def error(self, method: str, code: str) -> None:
        """Count one failed call: gRPC ``method`` (``Acquire``) and status ``code``
        (``NOT_FOUND``; a :class:`grpc.StatusCode`'s ``.name``)."""
        self.errors.labels(method, code).inc()

    def set_resident(self, tier: str, device: str, nbytes: int) -> None:
        """Set the bytes ``tier`` holds on ``device`` now."""
        self.resident_bytes.labels(tier, device).set(nbytes)

    def set_budget(self, tier: str, device: str, nbytes: int) -> None:
        """Set the bytes ``tier`` may hold on ``device``."""
        self.tier_budget_bytes.labels(tier, device).set(nbytes)

    def count_leases(self, count: Callable[[str], int]) -> None:
        """Read the leases held on each tier from ``count(tier)`` when scraped: the
        lease table keeps the counts, so that no Acquire or Release has to set them."""
        for tier in TIERS:
            self.leases.labels(tier).set_function(functools.partial(count, tier))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


# serving ------------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running metrics endpoint; :meth:`stop` it (or use it as a context manager)."""

    host: str
    port: int
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_http(address: str, registry: CollectorRegistry | Metrics) -> MetricsServer:
    """Serve a registry as Prometheus text at ``http://address/metrics`` (any path works).

    Port 0 picks a free port: read it back from the result's ``port``.

    Args:
        address: ``"host:port"``, the ``metrics_address`` setting.
        registry: the registry to serve (or a :class:`Metrics`, for its registry).

    Raises:
        ConfigError: a malformed address, or one that cannot be bound (in use, not a
            local address, not permitted): the message names it and the reason.

    Example
    -------
    >>> m = Metrics()
    >>> with start_http("127.0.0.1:0", m) as srv:
    ...     b"weightd_info" in urllib.request.urlopen(srv.url, timeout=5).read()
    True
    """
    if isinstance(registry, Metrics):
        registry = registry.registry
    host, port = parse_address(address)
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as e:
        why = e.strerror.lower() if e.strerror else str(e)
        raise ConfigError(f"metrics_address {address}: cannot serve metrics there: {why} "
                          "(choose another host:port, or stop what holds it)") from e
    thread.name = "weightd-metrics"
    return MetricsServer(host, int(server.server_port), server, thread)


def scrape(address: str, *, timeout: float = 5.0) -> str:
    """Read a metrics endpoint (``"host:port"`` or an ``http://`` URL) as text.

    Raises:
        OSError: the endpoint cannot be reached (``urllib.error.URLError`` is an OSError).
    """
    if address.startswith(("http://", "https://")):
        url = address
    else:
        host, port = parse_address(address)
        if host in ("0.0.0.0", "::"):  # a wildcard bind is reached through loopback
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode("utf-8")


# reading, for people -------------------------------------------------------------------


def _labels(labels: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in labels.items())


def _number(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.6g}"


def _value(name: str, value: float) -> str:
    if "_bytes" in name and not math.isnan(value) and not math.isinf(value):
        return format_size(value)
    return _number(value)


def _seconds(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if value < 1:
        return f"{value * 1000:.3g}ms"
    return f"{value:.3g}s"


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Estimate a quantile from cumulative histogram buckets ``(le, count)``, the way
    Prometheus' ``histogram_quantile`` does: linear within the bucket, and the highest
    finite bound when the rank falls in ``+Inf``. NaN when there are no observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower  # pragma: no cover - the last bucket holds every observation


@dataclass
class _Series:
    buckets: list[tuple[float, float]] = field(default_factory=list)
    count: float = 0.0
    total: float = 0.0


def _histogram_rows(family_name: str, samples: Sequence[Sample]) -> list[tuple[str, str, str]]:
    series: dict[tuple[tuple[str, str], ...], _Series] = {}
    for s in samples:
        key = tuple((k, v) for k, v in s.labels.items() if k != "le")
        entry = series.setdefault(key, _Series())
        if s.name.endswith("_bucket"):
            entry.buckets.append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            entry.count = s.value
        elif s.name.endswith("_sum"):
            entry.total = s.value
    rows = []
    for key, e in series.items():
        text = f"count={_number(e.count)} sum={_seconds(e.total)}"
        if e.count:
            text += (f" p50={_seconds(quantile(0.5, e.buckets))}"
                     f" p99={_seconds(quantile(0.99, e.buckets))}")
        rows.append((family_name, _labels(dict(key)), text))
    return rows


def render_table(source: str | bytes | CollectorRegistry | Metrics) -> str:
    """A table for people of the metrics in Prometheus text (or in a registry).

    One row per series: name, labels, value. Byte values are shown with units; a histogram
    shows its count, sum and estimated p50 / p99. ``*_created`` timestamps are left out.

    Example
    -------
    >>> m = Metrics(process=False)
    >>> m.evicted("host")
    >>> print(render_table(m))  # doctest: +ELLIPSIS
    METRIC ...
    weightd_evictions_total ... tier=host ... 1
    ...
    """
    if isinstance(source, Metrics):
        source = source.registry
    if isinstance(source, CollectorRegistry):
        source = generate_latest(source)
    if isinstance(source, bytes):
        source = source.decode("utf-8")
    rows: list[tuple[str, str, str]] = []
    for family in text_string_to_metric_families(source):
        if family.type == "histogram":
            rows.extend(_histogram_rows(family.name, family.samples))
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            rows.append((s.name, _labels(s.labels), _value(s.name, s.value)))
    if not rows:
        return "no metrics\n"
    header = ("METRIC", "LABELS", "VALUE")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows))
    w1 = max(len(header[1]), *(len(r[1]) for r in rows))
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in (header, *rows)]
    return "\n".join(lines) + "\n"
