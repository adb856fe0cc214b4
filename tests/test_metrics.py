"""weightd/metrics.py: the metrics, served on 127.0.0.1 port 0 and scraped over HTTP."""

from __future__ import annotations

import math
import os
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from weightd.config import ConfigError
from weightd.errors import LeaseNotFound
from weightd.metrics import (
    ACQUIRE_BUCKETS,
    Metrics,
    MetricsServer,
    parse_address,
    quantile,
    render_table,
    scrape,
    start_http,
)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(version="9.9.9")


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    with start_http("127.0.0.1:0", metrics) as srv:
        yield srv


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(text: str, name: str, **labels: str) -> float:
    return values(text)[(name, tuple(sorted(labels.items())))]


def http_get(srv: MetricsServer) -> str:
    with urllib.request.urlopen(srv.url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        body: bytes = resp.read()
    return body.decode()


def test_served_on_port_zero_and_values_follow_the_calls(
        metrics: Metrics, server: MetricsServer) -> None:
    assert server.port > 0
    before = http_get(server)
    assert get(before, "weightd_info", version="9.9.9") == 1
    # The tiers' counters exist from the start, at 0, so that rate() works at once.
    for tier in ("disk", "host", "cuda"):
        assert get(before, "weightd_hits_total", tier=tier) == 0
        assert get(before, "weightd_misses_total", tier=tier) == 0
        assert get(before, "weightd_evictions_total", tier=tier) == 0
        assert get(before, "weightd_leases", tier=tier) == 0

    metrics.observe_acquire("host", 0.002, hit=True)
    metrics.observe_acquire("host", 0.003, hit=True)
    metrics.observe_acquire("host", 3.0, hit=False)
    metrics.lookup("disk", hit=False)
    metrics.fetched("s3", 5_000_000, 2.5)
    metrics.fetched("s3", 0, 0.02)
    metrics.fetched("file", 1234, 0.1)
    metrics.evicted("host")
    metrics.evicted("host", 2)
    metrics.error("Acquire", "NOT_FOUND")
    metrics.error("Acquire", "NOT_FOUND")
    metrics.error("Fetch", "UNAVAILABLE")
    metrics.set_resident("host", "cpu", 3 << 30)
    metrics.set_resident("cuda", "GPU-0a1b", 1 << 30)
    metrics.set_budget("host", "cpu", 64 << 30)
    leases = {"disk": 0, "host": 4, "cuda": 0}
    metrics.count_leases(leases.__getitem__)

    after = scrape(f"127.0.0.1:{server.port}")
    assert get(after, "weightd_hits_total", tier="host") == 2
    assert get(after, "weightd_misses_total", tier="host") == 1
    assert get(after, "weightd_misses_total", tier="disk") == 1
    assert get(after, "weightd_acquire_seconds_count", tier="host") == 3
    assert get(after, "weightd_acquire_seconds_sum", tier="host") == pytest.approx(3.005)
    assert get(after, "weightd_acquire_seconds_bucket", tier="host", le="0.0025") == 1
    assert get(after, "weightd_acquire_seconds_bucket", tier="host", le="0.005") == 2
    assert get(after, "weightd_acquire_seconds_bucket", tier="host", le="+Inf") == 3
    assert get(after, "weightd_fetched_bytes_total", protocol="s3") == 5_000_000
    assert get(after, "weightd_fetched_bytes_total", protocol="file") == 1234
    assert get(after, "weightd_fetch_seconds_count") == 3
    assert get(after, "weightd_evictions_total", tier="host") == 3
    assert get(after, "weightd_errors_total", method="Acquire", code="NOT_FOUND") == 2
    assert get(after, "weightd_errors_total", method="Fetch", code="UNAVAILABLE") == 1
    assert get(after, "weightd_resident_bytes", tier="host", device="cpu") == 3 << 30
    assert get(after, "weightd_resident_bytes", tier="cuda", device="GPU-0a1b") == 1 << 30
    assert get(after, "weightd_tier_budget_bytes", tier="host", device="cpu") == 64 << 30
    assert get(after, "weightd_leases", tier="host") == 4

    leases["host"] = 0
    metrics.set_resident("host", "cpu", 0)
    again = http_get(server)
    assert get(again, "weightd_leases", tier="host") == 0
    assert get(again, "weightd_resident_bytes", tier="host", device="cpu") == 0


def test_acquire_buckets_span_half_a_millisecond_to_two_minutes(metrics: Metrics) -> None:
    assert ACQUIRE_BUCKETS[0] == 0.0005 and ACQUIRE_BUCKETS[-1] == 120.0
    assert list(ACQUIRE_BUCKETS) == sorted(set(ACQUIRE_BUCKETS))
    metrics.observe_acquire("cuda", 0.0001, hit=True)
    text = metrics.render().decode()
    les = {dict(labels)["le"] for (name, labels) in values(text)
           if name == "weightd_acquire_seconds_bucket"}
    assert "0.0005" in les and "120.0" in les and "+Inf" in les


def test_own_registry_not_the_global_one() -> None:
    a, b = Metrics(), Metrics()  # two instances in one process do not collide
    a.evicted("host")
    assert b"weightd_evictions_total" in b.render()
    assert get(b.render().decode(), "weightd_evictions_total", tier="host") == 0
    assert REGISTRY.get_sample_value("weightd_evictions_total", {"tier": "host"}) is None


def test_stop_closes_the_port(metrics: Metrics) -> None:
    srv = start_http("127.0.0.1:0", metrics)
    http_get(srv)
    srv.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url, timeout=2)


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    (":9464", ("0.0.0.0", 9464)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9464", "127.0.0.1", "127.0.0.1:http", "host:70000", ""])
def test_parse_address_refuses(address: str) -> None:
    with pytest.raises(ConfigError, match="host:port"):
        parse_address(address)


def test_start_http_refuses_a_bad_address(metrics: Metrics) -> None:
    with pytest.raises(ConfigError):
        start_http("nope", metrics)


def test_render_table_from_a_scrape(metrics: Metrics, server: MetricsServer) -> None:
    for seconds in (0.001, 0.002, 0.003, 0.004):
        metrics.observe_acquire("host", seconds, hit=True)
    metrics.set_resident("host", "cpu", 3 << 30)
    metrics.error("Acquire", "NOT_FOUND")
    metrics.fetched("s3", 2 << 20, 1.0)
    table = render_table(scrape(server.url))
    lines = table.splitlines()
    assert lines[0].split() == ["METRIC", "LABELS", "VALUE"]

    def row(name: str, *labels: str) -> str:
        found = [ln for ln in lines if ln.split()[0] == name and all(x in ln for x in labels)]
        assert len(found) == 1, (name, labels, table)
        return found[0]

    assert row("weightd_resident_bytes", "tier=host", "device=cpu").endswith("3.0 GiB")
    assert row("weightd_hits_total", "tier=host").split()[-1] == "4"
    assert row("weightd_hits_total", "tier=cuda").split()[-1] == "0"
    assert row("weightd_errors_total", "method=Acquire", "code=NOT_FOUND").split()[-1] == "1"
    assert row("weightd_fetched_bytes_total", "protocol=s3").endswith("2.0 MiB")
    assert row("weightd_info", "version=9.9.9").split()[-1] == "1"
    hist = row("weightd_acquire_seconds", "tier=host")
    assert "count=4" in hist and "sum=10ms" in hist and "p50=" in hist and "p99=" in hist
    assert "_created" not in table and "_bucket" not in table


def test_render_table_accepts_registry_bytes_and_text() -> None:
    metrics = Metrics(process=False)  # process_* values move between two renders
    metrics.evicted("cuda")
    from_metrics = render_table(metrics)
    assert from_metrics == render_table(metrics.registry)
    assert "weightd_evictions_total" in render_table(metrics.render())
    assert "weightd_evictions_total" in render_table(metrics.render().decode())
    assert "process_" not in from_metrics
    assert render_table("") == "no metrics\n"


def test_quantile_follows_histogram_quantile() -> None:
    buckets = [(0.001, 0.0), (0.01, 10.0), (0.1, 20.0), (math.inf, 20.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert quantile(0.25, buckets) == pytest.approx(0.001 + 0.009 * 0.5)
    assert quantile(0.75, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    # a rank in +Inf reports the highest finite bound
    assert quantile(0.99, [(1.0, 1.0), (math.inf, 10.0)]) == 1.0
    assert math.isnan(quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert math.isnan(quantile(0.5, []))


def test_lease_counts_follow_adds_releases_and_reaping() -> None:
    # The leases gauge reads these counts at scrape time: they must never drift.
    import subprocess
    import sys

    from weightd.leases import Credentials, LeaseTable

    credentials = Credentials()
    table = LeaseTable(credentials)
    me = credentials.local()
    a = table.add("m", "host", "cpu", me)
    table.add("m", "cuda", "cuda:GPU-x", me)
    gone = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    table.add("m", "host", "cpu", credentials.register(gone.pid, os.getuid(), os.getgid()))
    gone.communicate(b"")
    assert (table.on_tier("host"), table.on_tier("cuda")) == (2, 1)
    assert len(table.reap()) == 1  # the exited process's lease
    table.release(a.lease_id, me)
    with pytest.raises(LeaseNotFound):
        table.release(a.lease_id, me)  # a second release changes nothing
    assert (table.on_tier("host"), table.on_tier("cuda")) == (0, 1)
