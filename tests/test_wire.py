"""The wire: weightd's HTTP range reader (keep-alive connections, bodies read into the
fetch's buffers), the retry helper's obedience to Retry-After, and the test server's
token buckets that benchmarks use as a network. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from weightd.config import Config
from weightd.errors import NotPermitted, SourceNotFound, SourceUnavailable
from weightd.retry import parse_retry_after
from weightd.sources import ChunkPlan, RemoteFile, open_source
from weightd.store import Fetcher, Store, hash_file
from weightd.store.fetch import (
    HEADER_PROBE,
    MIN_RANGE,
    FetchEvents,
    Ready,
    _first_tensor_end,
    _Growth,
    _header_if_landed,
    _Schedule,
    _Turns,
)
from weightd.testing import Fault, Lie, RangeHTTPServer, write_synthetic_model

MiB = 1024 * 1024


def fetch(config: Config, ref: str, **kw: object):  # type: ignore[no-untyped-def]
    with Store.open(config.cache_dir) as store:
        return Fetcher(store, config).fetch(ref, **kw)  # type: ignore[arg-type]


@pytest.fixture
def shard(http_root: Path) -> Path:
    d = http_root / "m"
    write_synthetic_model(d, total_bytes=4 * MiB, tensors=16, seed=7)
    return d / "model.safetensors"


def _download(url: str, nbytes: int) -> float:
    """GET ``url`` with http.client (not weightd): seconds until ``nbytes`` arrived."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    t0 = time.monotonic()
    conn.request("GET", u.path, headers={"Range": f"bytes=0-{nbytes - 1}"})
    resp = conn.getresponse()
    got = len(resp.read())
    conn.close()
    assert got == nbytes
    return time.monotonic() - t0


# --- the test server's token buckets -----------------------------------------------------


def test_the_rate_limited_server_keeps_its_total_rate_across_connections(http_root):
    (http_root / "blob").write_bytes(os.urandom(6 * MiB))
    rate, conns, each = 24e6, 4, 3 * 10**6
    with RangeHTTPServer(http_root, rate=rate) as srv:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(conns) as pool:
            list(pool.map(lambda _: _download(f"{srv.url}/blob", each), range(conns)))
        elapsed = time.monotonic() - t0
    want = conns * each / rate  # 0.5 s: four connections share the one rate
    assert 0.85 * want <= elapsed <= 2.0 * want, (elapsed, want)


def test_the_rate_limited_server_keeps_each_connections_rate(http_root):
    (http_root / "blob").write_bytes(os.urandom(4 * MiB))
    conn_rate, each = 8e6, 2 * 10**6
    with RangeHTTPServer(http_root, conn_rate=conn_rate) as srv, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        times = list(pool.map(lambda _: _download(f"{srv.url}/blob", each), range(2)))
    want = each / conn_rate  # 0.25 s each, side by side: the rates are not shared
    for t in times:
        assert 0.85 * want <= t <= 2.0 * want, (times, want)


def test_a_fetch_from_a_rate_limited_origin_takes_the_link_time(config, http_root, shard):
    size = shard.stat().st_size
    rate = 16e6
    with RangeHTTPServer(http_root, rate=rate) as srv:
        t0 = time.monotonic()
        snap = fetch(config.replace(chunk_size=MiB), f"{srv.url}/m")
        elapsed = time.monotonic() - t0
    assert snap.stats.bytes_fetched >= size
    assert elapsed >= 0.85 * size / rate, elapsed  # the bucket binds weightd too


# --- the range reader --------------------------------------------------------------------


def test_a_fetch_reuses_its_connections(config, http_server, shard):
    # 32 ranged GETs or more; one file: 4 reads in flight for the model
    cfg = config.replace(chunk_size=128 * 1024, concurrency=4, max_parallel_files=1)
    fetch(cfg, f"{http_server.url}/m")
    gets = http_server.log.count("GET", "model.safetensors")
    assert gets >= 32
    # one per read in flight (4), plus the listing's and the stat's own connections
    assert http_server.log.connections <= 4 + 4, http_server.log.connections


def test_a_connection_the_server_dropped_while_idle_costs_no_retry(config, http_server, shard):
    http_server.set_drop_idle(True)
    cfg = config.replace(chunk_size=256 * 1024, concurrency=2, retry_attempts=1)
    snap = fetch(cfg, f"{http_server.url}/m")
    assert hash_file(Path(snap.path) / "model.safetensors") == hash_file(shard)


def test_an_encoded_answer_is_retried_and_never_written(config, http_server, shard):
    seen: set[int] = set()
    lock = threading.Lock()

    def gzip_once(path: str, start: int, end: int, size: int) -> Lie | None:
        with lock:
            if start in seen:
                return None
            seen.add(start)
        return Lie(headers=(("Content-Encoding", "gzip"),))

    http_server.set_lie(gzip_once)
    snap = fetch(config.replace(chunk_size=MiB), f"{http_server.url}/m")
    assert hash_file(Path(snap.path) / "model.safetensors") == hash_file(shard)
    http_server.set_lie(lambda *a: Lie(headers=(("Content-Encoding", "gzip"),)))
    with pytest.raises(SourceUnavailable, match="Content-Encoding"):
        fetch(config.replace(cache_dir=config.cache_dir / "2", chunk_size=MiB,
                             retry_attempts=2), f"{http_server.url}/m")


def test_a_redirect_to_another_scheme_is_refused(config, http_server, shard):
    http_server.set_redirect(
        lambda m, p: "file:///etc/passwd" if p.endswith(".safetensors") and m == "GET" else None)
    with pytest.raises(NotPermitted, match="not an http"):
        fetch(config, f"{http_server.url}/m")


def test_a_failed_file_stops_the_other_downloads_of_its_model(config, http_root):
    d = http_root / "two"
    write_synthetic_model(d, total_bytes=32 * MiB, tensors=8, shards=2, seed=3)
    big = next(p for p in sorted(d.glob("*.safetensors")))
    rate = 4e6  # the other shard (16 MiB) would take 4.2 s at this rate

    def gone(method: str, path: str) -> int | None:
        return 404 if method == "GET" and path.endswith(big.name) else None

    with RangeHTTPServer(http_root, rate=rate, fault=gone) as srv:
        t0 = time.monotonic()
        with pytest.raises(SourceNotFound, match=big.name):
            fetch(config.replace(chunk_size=512 * 1024, concurrency=2), f"{srv.url}/two")
        elapsed = time.monotonic() - t0
        served = srv.log.bytes_served(".safetensors")
    assert served < 8 * MiB, served  # not the other shard's 16 MiB
    assert elapsed < 0.7 * 16 * MiB / rate, elapsed


# --- the model's reads: one window, in the model's order, ramped ------------------------


def _first_tensor_end_of(shard: Path) -> int:
    """Where the first tensor of the source's ``shard`` ends."""
    from weightd.formats import read_layout

    return min(t.offset + t.nbytes for t in read_layout(shard).tensors)


def _rf(name: str, size: int) -> RemoteFile:
    return RemoteFile(f"http://127.0.0.1:1/{name}", name, name, size, "id")


def test_ramped_ranges_cover_each_file_and_start_and_end_small():
    files = [_rf(f"s{i}.safetensors", 64 * MiB + 12345) for i in range(4)]
    sched = _Schedule(files, 32, 8 * MiB, start=8)
    plan = ChunkPlan(chunk_size=8 * MiB, concurrency=8, ramp=True)
    every: list[int] = []
    for f in files:
        _, start = sched.place(f)
        ranges = sched.ranges(f.size, plan, start)
        assert ranges[0][0] == 0 and ranges[-1][1] == f.size
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        sizes = [e - b for b, e in ranges]
        # within [chunk / the window's start, chunk], but a file's last range (the rest)
        assert all(MiB <= n <= 8 * MiB for n in sizes[:-1]), sizes
        every += sizes
    # the model's first chunk is one window of reads together, as many as the window
    # starts with (32 of 256 KiB made 32 requests, threads and connections at once, and
    # the first tensor at 200 MB/s came later); its middle whole chunks; its last window
    # of reads much less than a window of chunks
    assert every[:8] == [MiB] * 8
    assert 8 * MiB in every
    assert sum(every[-8:]) < 8 * 8 * MiB / 4
    # without the ramp (S3: moto reads a whole object per range), whole chunks
    fixed = sched.ranges(files[1].size, ChunkPlan(8 * MiB, 8), sched.place(files[1])[1])
    assert [e - b for b, e in fixed][:-1] == [8 * MiB] * 8


def test_a_schedule_begun_with_the_first_shard_reads_it_as_the_models_first_file():
    """The first shard is read before the rest of the model is listed (``_Lead``): its
    ranges are the model's first (no shrinking toward its end while more shards follow),
    and once the rest is placed the small side files come ahead of its waiting reads,
    the other shards after it, and the model's end is near in the last shard."""
    plan = ChunkPlan(chunk_size=8 * MiB, concurrency=8, ramp=True)
    shards = [_rf(f"s{i}.safetensors", 64 * MiB) for i in range(3)]
    side = _rf("config.json", 300)
    whole = _Schedule([side, *shards], 32, 8 * MiB, start=8)
    ahead = _Schedule(shards[:1], 32, 8 * MiB, start=8, more=True)
    early = [e - b for b, e in ahead.ranges(shards[0].size, plan, 0)]
    # as when the whole model is known (a 300-byte side file before it changes nothing)
    assert early == [e - b for b, e in whole.ranges(shards[0].size, plan, 0)]
    assert early[:-1] == sorted(early[:-1])  # growing to its end (the last: the rest)
    alone = _Schedule(shards[:1], 32, 8 * MiB, start=8)  # the only shard: it shrinks
    sizes = [e - b for b, e in alone.ranges(shards[0].size, plan, 0)]
    assert sizes[-2] < max(sizes) < max(early)
    ahead.extend([side, *shards[1:]], ahead=1)
    assert ahead.place(side)[0] < ahead.place(shards[0])[0] < ahead.place(shards[1])[0]
    assert ahead.total == 3 * 64 * MiB + 300 and not ahead.more
    last = [e - b for b, e in ahead.ranges(shards[2].size, plan, ahead.place(shards[2])[1])]
    assert last[-2] < max(last)  # the model's end shrinks its last ranges


def test_a_models_first_shard_is_read_header_first_then_its_first_tensor_by_the_window():
    """A model's first shard starts with one read alone, its header (``probe``); the
    bytes up to the end of its first tensor are then the window's first reads, as many
    as it starts with, and only after them the ramp goes on: a streaming replica's first
    tensor has the whole link (8 ranges of 1 MiB gave a first tensor of 5.4 MiB at
    200 MB/s only with the whole first chunk, 8 MiB)."""
    plan = ChunkPlan(chunk_size=8 * MiB, concurrency=8, ramp=True)
    shards = [_rf(f"s{i}.safetensors", 64 * MiB) for i in range(2)]
    side = _rf("config.json", 300)
    sched = _Schedule(shards[:1], 32, 8 * MiB, start=8, more=True, header_first=True)
    sched.extend([side, shards[1]], ahead=1)
    assert sched.probe(shards[0], plan) == HEADER_PROBE
    # one read alone per model: not its side files, not its other shards, not without a
    # ramp (S3, where moto reads a whole object per range)
    assert sched.probe(side, plan) == sched.probe(shards[1], plan) == 0
    assert sched.probe(shards[0], ChunkPlan(8 * MiB, 8)) == 0
    assert _Schedule([_rf("tiny.safetensors", HEADER_PROBE)], 8, 8 * MiB, header_first=True).probe(
        _rf("tiny.safetensors", HEADER_PROBE), plan) == 0
    # only where the shard is read ahead of its listing: a listing that gives sizes
    # (hf://) starts the model's files together, and a later shard's reads may hold the
    # window the header's read would wait for whole
    assert _Schedule([side, *shards], 32, 8 * MiB, start=8).probe(shards[0], plan) == 0
    # not with a window of one read, which reads the first chunk whole
    assert _Schedule(shards, 1, 8 * MiB, header_first=True).probe(shards[0], plan) == 0
    # never more than a chunk: a read's buffer holds one
    small = ChunkPlan(chunk_size=128 * 1024, concurrency=4, ramp=True)
    assert _Schedule(shards, 4, 128 * 1024, header_first=True).probe(shards[0], small) == 128 * 1024
    start = sched.place(shards[0])[1]

    def check(ranges: list[tuple[int, int]]) -> list[int]:
        assert ranges[0] == (0, HEADER_PROBE) and ranges[-1][1] == 64 * MiB
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        return [e - b for b, e in ranges]

    first_end = 5_700_000  # the first tensor's last byte, from the header
    ranges = sched.ranges(64 * MiB, plan, start, first=(HEADER_PROBE, first_end))
    check(ranges)
    assert [e for _, e in ranges].index(first_end) == 8  # the probe, then 8 reads
    assert sched.first_reads(HEADER_PROBE, first_end) == 8
    assert ranges[9][1] - ranges[9][0] == MiB  # then the ramp, as before
    # a short first tensor: fewer reads, of MIN_RANGE at least (no 1,440-byte tail)
    short = sched.ranges(64 * MiB, plan, start, first=(HEADER_PROBE, 525_728))
    check(short)
    head = [e - b for b, e in short[1:] if e <= 525_728]
    assert len(head) == sched.first_reads(HEADER_PROBE, 525_728) == 4
    assert min(head) >= MIN_RANGE and sum(head) == 525_728 - HEADER_PROBE
    # a first tensor in the header's read, or one larger than a chunk (an embedding):
    # the ramp goes on from the probe
    for end in (HEADER_PROBE - 1000, 40 * MiB):
        sizes = check(sched.ranges(64 * MiB, plan, start, first=(HEADER_PROBE, end)))
        assert sizes[1] == MiB, sizes[:4]


def test_the_first_shard_has_begun_once_its_first_tensor_is_written(
        config, http_root, http_server, monkeypatch):
    """What a listing's other ``HEAD``s wait for (``_Schedule.begun``, returned by the
    listing's ``first``): set once the first shard's bytes to its first tensor's end
    are written, not before, and set whatever happens after."""
    d = http_root / "begun"
    write_synthetic_model(d, total_bytes=8 * MiB, tensors=8, shards=2, seed=8)
    lead = sorted(d.glob("*.safetensors"))[0]
    first_end = _first_tensor_end_of(lead)
    made: list[_Schedule] = []
    make = Fetcher._schedule

    def spy(self, *a, **kw):  # type: ignore[no-untyped-def]
        made.append(make(self, *a, **kw))
        return made[-1]

    monkeypatch.setattr(Fetcher, "_schedule", spy)
    seen: list[tuple[int, bool]] = []  # (the shard's written front, begun then)

    class Events(FetchEvents):
        def written(self, rf, offset: int, nbytes: int) -> None:  # type: ignore[no-untyped-def]
            if rf.relpath == lead.name:
                seen.append((offset + nbytes, made[0].begun.is_set()))

    fetch(config.replace(chunk_size=2 * MiB), f"{http_server.url}/begun", events=Events(),
          streamed=True)
    assert seen[0][0] == HEADER_PROBE < first_end
    k = next(i for i, (front, _) in enumerate(seen) if front >= first_end)
    assert not any(b for _, b in seen[:k + 1]), seen  # (told after its write returned)
    assert all(b for _, b in seen[k + 1:]), seen
    assert made[0].begun.is_set()

    # a fetch no replica streams (a whole Acquire) reads no header first, nor cuts a
    # read at the first tensor's end (the ramp's are multiples of 64 KiB; its first,
    # 256 KiB here, may be written alone)
    seen.clear()
    made.clear()
    fetch(config.replace(chunk_size=2 * MiB, cache_dir=config.cache_dir / "2"),
          f"{http_server.url}/begun", events=Events())
    assert not made[0].header_first
    ends = [front for front, _ in seen]
    assert first_end not in ends, (first_end, ends)


def test_the_window_grants_reads_in_the_models_order():
    async def run() -> list[tuple[int, int]]:
        sched = _Schedule([_rf("a", 1), _rf("b", 1)], 2, 1)
        got: list[tuple[int, int]] = []

        async def one(key: tuple[int, int]) -> None:
            await sched.acquire(key, 1)
            got.append(key)

        await sched.acquire((0, 0), 1)
        await sched.acquire((0, 1), 1)  # the window is full
        late = [asyncio.ensure_future(one(k)) for k in [(1, 0), (0, 5), (1, 3), (0, 2)]]
        gone = asyncio.ensure_future(one((0, 3)))
        await asyncio.sleep(0)
        gone.cancel()  # a read that stops waiting gives its turn to the next
        await asyncio.sleep(0)
        for _ in range(4):
            sched.release(1)
            await asyncio.sleep(0)
        await asyncio.gather(*late)
        return got

    assert asyncio.run(run()) == [(0, 2), (0, 5), (1, 0), (1, 3)]


def test_the_first_shards_header_and_first_tensor_reads_take_the_whole_window():
    """The header's read (``share=1``) waits for the window to empty and holds it; the
    first tensor's reads (``share=k``) hold it together; only then the ramp's read
    after them, or a later file's, is granted a turn."""
    async def run() -> list[str]:
        sched = _Schedule([_rf("a", 1), _rf("b", 1)], 8, 100)  # capacity 800
        got: list[str] = []

        async def one(name: str, key: tuple[int, int], **kw: int) -> int:
            cost = await sched.acquire(key, 10, split=True, **kw)
            got.append(name)
            return cost

        side = await sched.acquire((0, 0), 10, split=True)  # a side file's read
        header = asyncio.ensure_future(one("header", (1, 0), share=1))
        await asyncio.sleep(0)
        assert got == []  # it waits for the window to empty
        sched.release(side)
        cost = await header
        assert cost == 800
        firsts = [asyncio.ensure_future(one(f"t{i}", (1, 10 + i), share=3)) for i in range(3)]
        ramp = asyncio.ensure_future(one("ramp", (1, 99)))
        later = asyncio.ensure_future(one("later", (2, 0)))
        await asyncio.sleep(0)
        assert got == ["header"]
        sched.release(cost)
        costs = await asyncio.gather(*firsts)
        await asyncio.sleep(0)
        assert got == ["header", "t0", "t1", "t2"], got  # together, and nothing else
        for c in costs:
            sched.release(c)
        await asyncio.gather(ramp, later)
        return got

    assert asyncio.run(run())[4:] == ["ramp", "later"]


def test_the_first_tensors_end_is_read_from_the_headers_bytes_or_is_their_length(tmp_path):
    """From the layout the shard's writer parses from its first bytes (the header read
    alone: ``_header_if_landed``), once; before its header is all in, what landed."""
    import json
    import struct

    from weightd.errors import FormatError

    def shard(header: dict) -> bytes:  # type: ignore[type-arg]
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw

    def end(data: bytes, f: RemoteFile) -> int:  # as the writer's first write finds it
        path = tmp_path / "temp"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            return _first_tensor_end(_header_if_landed(fd, f, len(data)), len(data))
        finally:
            os.close(fd)

    head = shard({"b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]},
                  "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    f = _rf("s.safetensors", len(head) + 32)
    body = head + b"\0" * 32
    assert end(body, f) == len(head) + 16  # in offset order
    assert end(body[:len(head) - 1], f) == len(head) - 1  # header cut off
    with pytest.raises(FormatError):  # not a header: the writer says why
        end(b"\xff" * 64, f)
    empty = shard({"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                   "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    assert end(empty + b"\0" * 8, _rf("e.safetensors", len(empty) + 8)) == (
        len(empty) + 8)  # a tensor of no bytes is not the first to land


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _land(g: _Growth, clock: _Clock, reads: int, nbytes: int, rate: float) -> int:
    """``reads`` reads of ``nbytes`` landing at ``rate`` bytes/s: the window's size after."""
    size = g.size
    for _ in range(reads):
        clock.now += nbytes / rate
        size = g.landed(nbytes)
    return size


def _sizes(g: _Growth, clock: _Clock, rate_at: Callable[[int], float]) -> list[int]:
    """Reads of 1 MiB landing at ``rate_at(window size)`` until the window settles: the
    sizes it took, in order."""
    sizes = [g.size]
    for _ in range(100_000):
        if g.settled:
            break
        clock.now += MiB / rate_at(g.size)
        if g.landed(MiB) != sizes[-1]:
            sizes.append(g.size)
    assert g.settled
    return sizes


def test_the_window_doubles_while_more_reads_land_more_bytes():
    # an origin that gives each connection 10 MB/s: twice the reads, twice the rate
    g = _Growth(8, 32, 10**10, _Clock())
    assert _sizes(g, g.clock, lambda size: size * 10e6) == [8, 16, 32]


def test_a_doubling_that_does_not_pay_goes_back_and_stays():
    # a link that 8 reads fill already (loopback, or one rate for all connections):
    # 5% more is not worth 8 more reads
    clock = _Clock()
    g = _Growth(8, 32, 10**10, clock)
    assert _sizes(g, clock, lambda size: 200e6 if size == 8 else 210e6) == [8, 16, 8]
    assert _land(g, clock, 500, MiB, 800e6) == 8  # settled for the rest of the download


def test_a_step_capped_by_the_limit_that_does_not_pay_goes_back_to_the_size_before_it():
    # max_parallel_files=3: a limit of 24, so the last step is 16 -> 24, not a doubling
    g = _Growth(8, 24, 10**10, _Clock())
    rates = {8: 100e6, 16: 200e6, 24: 210e6}
    assert _sizes(g, g.clock, lambda size: rates[size]) == [8, 16, 24, 16]


def test_the_reads_in_flight_at_a_doubling_are_not_counted_at_the_new_size():
    # 8 reads of 8 MiB in flight when the window doubles land soon after at the new
    # size; counted there, their bytes (read at the size before) made a link that 8
    # fill look faster at 16. With them left out, the rate at 16 is the link's
    clock = _Clock()
    g = _Growth(8, 32, 10**10, clock)
    assert _land(g, clock, 30, MiB, 200e6) == 16
    for _ in range(8):  # the reads begun at 8 land together, just after the doubling
        clock.now += 1e-4
        g.landed(MiB)
    assert _land(g, clock, 40, MiB, 200e6) == 8 and g.settled


def test_the_window_does_not_grow_when_little_is_left():
    clock = _Clock()
    # 256 MiB at 1 GB/s: after one epoch at 8 (0.1 s) what is left lands in less than
    # two epochs: a try at 16 would not pay for itself
    g = _Growth(8, 32, 256 * MiB, clock)
    g.landed(MiB)
    assert _land(g, clock, 120, MiB, 1e9) == 8 and g.settled


def test_the_window_counts_bytes_short_reads_are_many_whole_chunks_few():
    async def run() -> list[int]:
        sched = _Schedule([_rf("a", 64 * MiB)], 32, 8 * MiB, start=8)  # 64 MiB in flight
        counts = []
        # small files' reads (the limit, 32), whole chunks (8), and the ranges a ramp
        # cuts a file into (8: each costs a whole chunk, so that the model's first chunk
        # alone fills the window)
        for nbytes, split in ((256 * 1024, False), (8 * MiB, False), (MiB, True)):
            reads = [asyncio.ensure_future(sched.acquire((0, i), nbytes, split=split))
                     for i in range(40)]
            await asyncio.sleep(0)
            counts.append(sum(t.done() for t in reads))
            for t in reads:
                t.cancel()
            await asyncio.gather(*reads, return_exceptions=True)
            for t in reads:
                if not t.cancelled():
                    sched.release(t.result())
        return counts

    assert asyncio.run(run()) == [32, 8, 8]


def test_a_shared_rate_keeps_the_window_small_and_a_per_connection_one_grows_it(
        config, http_root):
    # a window of 8 fills a link whose rate all connections share, so the fetch does not
    # take 32 whole chunks in flight (it always did before, 4 files x 8); an origin that
    # rates each connection gets the window doubled. (On a loaded machine 8 reads may
    # leave a shared link idle between them and 16 measure faster, rightly; this model
    # is too small for a try at 32 after that, so the bound holds either way.)
    d = http_root / "big"
    write_synthetic_model(d, total_bytes=160 * MiB, tensors=16, shards=4, seed=9)
    # HTTP's plan: 8 reads per file, 4 files; 2 MiB reads, so that a read's own request
    # and write are small beside its transfer
    cfg = config.replace(chunk_size=2 * MiB)
    with RangeHTTPServer(http_root, rate=80e6) as srv:
        shared = fetch(cfg, f"{srv.url}/big").stats
    with RangeHTTPServer(http_root, conn_rate=5e6) as srv:
        each = fetch(cfg.replace(cache_dir=cfg.cache_dir.parent / "other"),
                     f"{srv.url}/big").stats
    assert shared.window <= 16, shared
    assert each.window >= 16, each


def test_a_listing_without_sizes_asks_for_them_side_by_side(config, http_root, http_server):
    # an HTTP index page gives names, not sizes: one HEAD per file, 10 files here. In
    # sequence they were ahead of the model's first byte, one round trip each
    d = http_root / "many"
    write_synthetic_model(d, total_bytes=MiB, tensors=16, shards=8, seed=3)
    lock = threading.Lock()
    now = [0]
    most = [0]

    def slow_head(method: str, path: str) -> None:
        if method == "HEAD":
            with lock:
                now[0] += 1
                most[0] = max(most[0], now[0])
            time.sleep(0.05)
            with lock:
                now[0] -= 1
        return None

    http_server.set_fault(slow_head)
    snap = fetch(config, f"{http_server.url}/many")
    assert len(snap.files) == 10
    # (in sequence: 1 during the listing, and 4 at most after it: the files fetched at
    # once stat themselves again when their bytes are in)
    assert most[0] >= 8, most[0]


def test_a_listing_whose_files_fail_their_head_names_the_first_of_them(
        config, http_root, http_server):
    # two files are gone; the later one's answer comes first, the error names the
    # earlier one, as in sequence
    d = http_root / "gone"
    write_synthetic_model(d, total_bytes=MiB, tensors=16, shards=8, seed=3)

    def gone(method: str, path: str) -> int | None:
        if "00002" in path:
            time.sleep(0.2)
            return 404
        return 404 if "00006" in path else None

    http_server.set_fault(gone)
    with pytest.raises(SourceNotFound, match="00002"):
        fetch(config, f"{http_server.url}/gone")


def test_a_listing_tells_the_first_shard_before_it_asks_the_other_files_heads(
        config, http_root, http_server, monkeypatch):
    """The first shard is read as soon as its own ``HEAD`` is in (``first``); the other
    files' ``HEAD``s are asked after it is told. Asked first, 17 of them (as many
    threads started, their requests on a 2-core machine's CPU) put the first shard's read
    4.5-9 ms later, of a first tensor's 42 ms."""
    # its answer within the head start, however busy the machine (5 ms: its own answer
    # takes 1.5-4 ms on loopback)
    monkeypatch.setattr("weightd.sources.base.FIRST_HEAD_START", 30.0)
    d = http_root / "told"
    write_synthetic_model(d, total_bytes=MiB, tensors=16, shards=8, seed=5)
    heads: list[str] = []
    lock = threading.Lock()

    def count(method: str, path: str) -> None:
        if method == "HEAD":
            with lock:
                heads.append(path.rsplit("/", 1)[-1])
        return None

    http_server.set_fault(count)
    told: list[tuple[str, list[str]]] = []

    def first(f: RemoteFile, more: bool) -> None:
        # a HEAD asked before this returns would come within the 0.5 s (in 1.5-4 ms)
        time.sleep(0.5)
        with lock:
            told.append((f.relpath, list(heads)))

    with open_source(f"{http_server.url}/told", config) as source:
        files = source.list_files(first=first)
    (shard, seen), = told
    assert shard == min(f.relpath for f in files if f.relpath.endswith(".safetensors"))
    assert seen == [shard], seen  # only its own
    assert sorted(heads) == sorted(f.relpath for f in files)  # then each file's, once


def test_a_listing_asks_the_other_files_heads_once_the_first_shard_has_begun(
        config, http_root, http_server, monkeypatch):
    """``first`` returns an event, set once the first shard's read has begun (its first
    tensor written): the other files' ``HEAD``s wait for it, at most ``LEAD_HOLD``. Asked
    while the shard's header and first tensor were read, they shared a 2-core machine's
    CPU with them: the streamed first tensor at 200 MB/s 44.7-47 ms, with them held
    15 ms 35.8-37.8 (medians of 4)."""
    monkeypatch.setattr("weightd.sources.base.FIRST_HEAD_START", 30.0)  # (as above)
    monkeypatch.setattr("weightd.sources.base.LEAD_HOLD", 30.0)
    d = http_root / "held"
    write_synthetic_model(d, total_bytes=MiB, tensors=16, shards=8, seed=5)
    heads: list[tuple[float, str]] = []
    http_server.set_fault(lambda m, p: heads.append((time.monotonic(), p)) if m == "HEAD"
                          else None)
    begun = threading.Event()
    t_begun: list[float] = []

    def first(f: RemoteFile, more: bool) -> threading.Event:
        def begin() -> None:
            t_begun.append(time.monotonic())
            begun.set()
        threading.Timer(0.3, begin).start()
        return begun

    t0 = time.monotonic()
    with open_source(f"{http_server.url}/held", config) as source:
        files = source.list_files(first=first)
    assert len(heads) == len(files)
    assert all(t > t_begun[0] for t, _ in heads[1:]), "a HEAD was asked before the shard began"
    assert time.monotonic() - t0 < 10, "the listing waited past the event"

    # an event never set holds them LEAD_HOLD at most
    monkeypatch.setattr("weightd.sources.base.LEAD_HOLD", 0.5)
    heads.clear()
    t0 = time.monotonic()
    with open_source(f"{http_server.url}/held", config) as source:
        source.list_files(first=lambda f, more: threading.Event())
    assert len(heads) == len(files)
    assert all(t - t0 >= 0.5 for t, _ in heads[1:])
    assert time.monotonic() - t0 < 10


def test_a_fetch_asks_its_other_files_heads_after_its_first_shards_first_tensor(
        config, http_root, http_server, monkeypatch):
    """The fetch's side of the listing's wait: the first shard's read returns its
    ``begun`` (``_Lead.start``), so its first tensor's bytes are fetched and written
    before any other file's ``HEAD`` is asked."""
    monkeypatch.setattr("weightd.sources.base.FIRST_HEAD_START", 30.0)
    monkeypatch.setattr("weightd.sources.base.LEAD_HOLD", 30.0)
    d = http_root / "after"
    write_synthetic_model(d, total_bytes=8 * MiB, tensors=8, shards=4, seed=9)
    lead = sorted(d.glob("*.safetensors"))[0]
    first_end = _first_tensor_end_of(lead)
    events: list[tuple[float, str]] = []
    lock = threading.Lock()

    def slow_first_tensor(path: str, start: int, end: int, size: int) -> Lie | None:
        if path.endswith(lead.name) and start >= HEADER_PROBE and end <= first_end:
            time.sleep(0.2)  # any HEAD asked meanwhile would be seen in the 0.2 s
            with lock:
                events.append((time.monotonic(), "first tensor"))
        return None

    def head(method: str, path: str) -> None:
        if method == "HEAD" and not path.endswith(lead.name):
            with lock:
                events.append((time.monotonic(), "HEAD"))
        return None

    http_server.set_lie(slow_first_tensor)
    http_server.set_fault(head)
    fetch(config, f"{http_server.url}/after", streamed=True)
    kinds = [k for _, k in sorted(events)]
    assert "first tensor" in kinds and "HEAD" in kinds, kinds
    assert kinds.index("HEAD") > max(i for i, k in enumerate(kinds) if k == "first tensor"), \
        kinds


def test_a_listings_heads_give_each_file_the_identity_fsspecs_info_gave(
        config, http_root, http_server):
    # the HEADs are weightd's own now (on the wire's connections); a file's identity is
    # the cache's key, so it must be what fsspec's info made of the same answer: else
    # every model cached before would be downloaded again
    from fsspec.implementations.http import HTTPFileSystem

    from weightd.sources.base import _identity

    d = http_root / "same"
    write_synthetic_model(d, total_bytes=MiB, tensors=8, shards=2, seed=6)
    fs = HTTPFileSystem(skip_instance_cache=True)
    with open_source(f"{http_server.url}/same", config) as source:
        files = source.list_files()
    assert len(files) == 4  # 2 shards, their index, config.json
    for f in files:
        info = fs.info(f.url)
        assert f.identity == f"{info['size']}:{_identity(info)}", f
        assert f.identity.split(":", 2)[1].startswith("ETag=")


def test_a_file_whose_head_is_refused_is_sized_by_a_gets_headers(
        config, http_root, http_server):
    # as fsspec's info does: a server that refuses HEAD (here 403, where a GET is
    # served: some presigned URLs sign one method) still gives the size
    d = http_root / "nohead"
    write_synthetic_model(d, total_bytes=MiB, tensors=8, shards=2, seed=6)
    http_server.set_fault(lambda method, path: 403 if method == "HEAD" else None)
    snap = fetch(config, f"{http_server.url}/nohead")
    assert {f.relpath: f.size for f in snap.files} == {
        p.name: p.stat().st_size for p in d.iterdir()}
    for f in snap.files:
        assert hash_file(config.cache_dir / "blobs" / f.digest[:2] / f.digest) == f.digest


def test_a_files_unwritten_bytes_are_bounded_in_its_order():
    async def run() -> list[int]:
        room = _Turns(10)
        got: list[int] = []

        async def one(n: int) -> None:
            await room.take(n)
            got.append(n)

        await room.take(8)
        waiting = [asyncio.ensure_future(one(n)) for n in (4, 1, 30)]
        await asyncio.sleep(0)
        assert got == [] and room.used == 8  # 4 does not fit, and 1 waits behind it
        room.give(8)
        await asyncio.sleep(0)
        assert got == [4, 1] and room.used == 5  # 30 waits for an empty file
        room.give(5)
        await asyncio.gather(*waiting)
        return got

    assert asyncio.run(run()) == [4, 1, 30]  # a range larger than the cap goes alone


def test_a_models_first_file_is_read_before_its_last(config, http_root):
    # 4 files fetched at once share one window in the model's order: the first file's
    # bytes come first (a streaming replica's first tensor), where each file's reads
    # had a share of the link of their own and the 4 files landed side by side
    d = http_root / "four"
    write_synthetic_model(d, total_bytes=16 * MiB, tensors=16, shards=4, seed=5)
    half: dict[str, float] = {}  # when half of a file was written
    whole: dict[str, float] = {}  # when all of it was
    lock = threading.Lock()

    class Events(FetchEvents):
        def written(self, rf: RemoteFile, offset: int, nbytes: int) -> None:
            now = time.monotonic()
            with lock:
                if offset + nbytes >= rf.size / 2:
                    half.setdefault(rf.relpath, now)
                if offset + nbytes == rf.size:
                    whole[rf.relpath] = now

    with RangeHTTPServer(http_root, rate=16e6) as srv:
        fetch(config.replace(chunk_size=256 * 1024, concurrency=2), f"{srv.url}/four",
              events=Events())
    shards = sorted(r for r in whole if r.endswith(".safetensors"))
    assert len(shards) == 4
    assert whole[shards[0]] < half[shards[3]], (whole, half)


# --- Retry-After -------------------------------------------------------------------------


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    for bad in (None, "", "soon", "-1"):
        assert parse_retry_after(bad) is None


def test_a_429_with_retry_after_is_waited_for(config, http_server, shard):
    asked: list[float] = []
    lock = threading.Lock()

    def busy_once(method: str, path: str) -> Fault | None:
        if method != "GET" or not path.endswith(".safetensors"):
            return None
        with lock:
            asked.append(time.monotonic())
            first = len(asked) == 1
        return Fault(429, (("Retry-After", "1"),)) if first else None

    http_server.set_fault(busy_once)
    # one read of the whole shard (a window of one: no ramp of smaller ranges)
    one = config.replace(chunk_size=8 * MiB, concurrency=1, max_parallel_files=1)
    snap = fetch(one, f"{http_server.url}/m")
    assert hash_file(Path(snap.path) / "model.safetensors") == hash_file(shard)
    assert len(asked) == 2
    # full-jitter backoff alone would have retried within 0.05 s
    assert asked[1] - asked[0] >= 0.95, asked


def test_a_retry_after_past_retry_max_seconds_fails_at_once(config, http_server, shard):
    http_server.set_fault(lambda m, p: Fault(429, (("Retry-After", "120"),))
                          if m == "GET" and p.endswith(".safetensors") else None)
    t0 = time.monotonic()
    with pytest.raises(SourceUnavailable, match="429.*Retry-After 120"):
        fetch(config.replace(retry_max_seconds=10.0, chunk_size=8 * MiB, concurrency=1,
                             max_parallel_files=1), f"{http_server.url}/m")
    assert time.monotonic() - t0 < 10
    assert http_server.log.count("FAULT") == 1  # asked once: no try could follow the wait


# --- what the writer reports (part B streams from it) ------------------------------------


def test_the_fetch_reports_each_file_in_order_its_header_and_when_it_is_ready(
        config, http_server, http_root):
    d = http_root / "three"
    write_synthetic_model(d, total_bytes=3 * MiB, tensors=12, shards=3, seed=9)
    seen: dict[str, list[tuple[int, int]]] = {}
    headers: dict[str, int] = {}
    ready: list[Ready] = []
    lock = threading.Lock()

    class Events(FetchEvents):
        def written(self, rf, offset: int, nbytes: int) -> None:  # type: ignore[no-untyped-def]
            with lock:
                seen.setdefault(rf.relpath, []).append((offset, nbytes))

        def header(self, rf, layout) -> None:  # type: ignore[no-untyped-def]
            with lock:  # once per shard, before the bytes after its header are reported
                assert rf.relpath not in headers
                headers[rf.relpath] = len(seen.get(rf.relpath, []))

        def ready(self, r: Ready) -> None:
            # every file verified; the shards are not durable yet (their temp files)
            assert all(not (config.cache_dir / "blobs" / dg[:2] / dg).exists()
                       and p.exists() for dg, p in r.pending.items())
            ready.append(r)

    snap = fetch(config.replace(chunk_size=128 * 1024, concurrency=4),
                 f"{http_server.url}/three", events=Events())
    sizes = {f.relpath: f.size for f in snap.files}
    assert set(seen) == set(sizes)
    for rel, parts in seen.items():
        ends = 0
        for offset, nbytes in parts:  # contiguous: each starts where the one before ended
            assert offset == ends, (rel, parts)
            ends += nbytes
        assert ends == sizes[rel]
    assert sorted(headers) == sorted(r for r in sizes if r.endswith(".safetensors"))
    assert all(n == 0 for n in headers.values())  # each header sits in the first chunk
    assert [len(r.pending) for r in ready] == [3]
    assert ready[0].revision == Path(snap.path).resolve().name
    reported = sum(len(v) for v in seen.values())
    again = fetch(config, f"{http_server.url}/three", events=Events())
    assert again.stats.bytes_fetched == 0  # a hit downloads nothing, so reports nothing
    assert sum(len(v) for v in seen.values()) == reported
    assert len(ready) == 2 and not ready[1].pending


def test_ranges_that_landed_while_a_write_ran_are_written_with_the_next_one(
        config, http_server, http_root):
    # after its header, the model's first shard is read as 32 short ranges at once;
    # while the first of them is written (held up), the others land, and the next write
    # takes them all: each range in a hop of its own through the event loop and the
    # writer thread reported a first chunk 15-40 ms after its bytes were in, on a busy
    # machine
    d = http_root / "one"
    write_synthetic_model(d, total_bytes=16 * MiB, tensors=8, seed=4)
    ends: list[int] = []

    class Events(FetchEvents):
        def written(self, rf, offset: int, nbytes: int) -> None:  # type: ignore[no-untyped-def]
            if rf.relpath.endswith(".safetensors"):
                ends.append(offset + nbytes)
                if len(ends) == 2:
                    time.sleep(0.5)  # in the first write after the header's: others land

    # 32 reads at once: HTTP's plan then reads the bytes to the end of the first tensor
    # (2 MiB) in 32 ranges of 64 KiB, then ramps
    fetch(config.replace(concurrency=32), f"{http_server.url}/one", events=Events(),
          streamed=True)
    (shard,) = d.glob("*.safetensors")
    first_end = _first_tensor_end_of(shard)
    assert ends[0] == HEADER_PROBE
    # the header's write, then one or two for the first tensor's 28 ranges (and what
    # landed after them): one write per range took 28
    assert len([e for e in ends if e < first_end]) <= 2, (first_end, ends[:4])


# --- the test origin itself ---------------------------------------------------------------


def _listen_overflows() -> int | None:
    """The kernel's count of connections dropped because a listen queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(row["ListenOverflows"]) if "ListenOverflows" in row else None
    return None


def test_the_test_origin_answers_a_small_file_without_waiting_for_an_ack(http_root):
    # its headers and a body shorter than a segment go out in two sends: with Nagle on
    # (Python's http.server default), the body waited for the client's delayed ACK of
    # the headers, 40 ms each time; real origins set TCP_NODELAY
    (http_root / "tiny").write_bytes(b"x" * 300)
    with RangeHTTPServer(http_root) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", urlsplit(srv.url).port, timeout=30)
        took = []
        for _ in range(5):
            t0 = time.monotonic()
            conn.request("GET", "/tiny")
            assert len(conn.getresponse().read()) == 300
            took.append(time.monotonic() - t0)
        conn.close()
    assert sorted(took)[2] < 0.025, took  # 0.043 s each with Nagle's wait


def test_the_test_origin_takes_a_fetchs_burst_of_connections(http_root):
    # a fetch opens its ranged reads at once (4 files x 8 here); with socketserver's
    # listen backlog of 5 the kernel dropped the connections past it and each of those
    # came a second later (a SYN retransmission): a 1 s stall in a third of the
    # benchmarks' cold fetches, on the test origin, not in weightd
    if _listen_overflows() is None:
        pytest.skip("no TcpExt ListenOverflows counter here")
    (http_root / "small").write_bytes(b"x" * 1024)
    with RangeHTTPServer(http_root) as srv:
        port = urlsplit(srv.url).port
        start = threading.Barrier(64)
        before = _listen_overflows()

        def connect() -> int:
            start.wait()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.request("GET", "/small")
                return len(conn.getresponse().read())
            finally:
                conn.close()

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            got = list(pool.map(lambda _: connect(), range(64)))
        after = _listen_overflows()
    assert got == [1024] * 64
    assert after == before, f"{after - before} connections dropped by a full listen queue"
