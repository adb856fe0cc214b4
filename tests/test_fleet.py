"""A cluster of nodes on this machine: daemons as real processes (each its own cache and
socket), one local HTTP origin that counts the bytes it serves, moto's S3 server as the
shared mirror; the clients are ``weightd`` commands in processes of their own. What an
operator sees: Status, ``weightd status``, the metrics, ``weightd mirror push``."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess, wait_for
from tests.test_mirror import model_bytes
from weightd.store import hash_file
from weightd.testing import MotoS3Server, RangeHTTPServer, write_synthetic_model

MiB = 1024 * 1024


@pytest.fixture
def model(http_root: Path) -> Path:
    d = http_root / "org" / "m"
    write_synthetic_model(d, total_bytes=4 * MiB, tensors=8, shards=2, seed=11)
    return d


@pytest.fixture
def mirror_env(s3_server: MotoS3Server) -> Iterator[dict[str, str]]:
    s3_server.set_fault(None)
    s3_server.set_conditions("honour")
    bucket = f"fleet-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    yield {"WEIGHTD_MIRRORS": f"s3://{bucket}/cluster",
           "WEIGHTD_MIRROR_ENDPOINT_URL": s3_server.endpoint_url,
           "WEIGHTD_MIRROR_ACCESS_KEY_ID": "mirror-key",
           "WEIGHTD_MIRROR_SECRET_ACCESS_KEY": "mirror-secret",
           "WEIGHTD_MIRROR_LOCK_TIMEOUT": "5s", "WEIGHTD_CHUNK_SIZE": "512KiB"}


def start_nodes(tmp_path: Path, n: int, env: dict[str, str]) -> list[DaemonProcess]:
    return [DaemonProcess(tmp_path / f"node{i}", env=env) for i in range(n)]


def cli(d: DaemonProcess, *args: str) -> subprocess.Popen[str]:
    """``weightd ARGS`` against daemon ``d``, in a process of its own (not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "weightd.cli", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**d.env, "WEIGHTD_LOG_LEVEL": "WARNING"})


def finish(p: subprocess.Popen[str], timeout: float = 120) -> str:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out


def test_daemons_fetching_one_model_at_once_pull_it_from_the_origin_once(
        tmp_path, http_root, model, mirror_env):
    # a slow origin (8 MB/s: about half a second for the model) so that the pulls overlap
    with RangeHTTPServer(http_root, rate=8e6) as origin:
        url = f"{origin.url}/org/m"
        nodes = start_nodes(tmp_path, 3, mirror_env)
        try:
            paths = [finish(p).strip() for p in [cli(d, "fetch", url) for d in nodes]]
            assert origin.log.bytes_served() == model_bytes(model)  # once, not 3 times
            for path in paths:
                for f in model.iterdir():
                    assert hash_file(Path(path) / f.name) == hash_file(f)
            by_where = []
            for d in nodes:
                [mb] = d.status().model_bytes
                by_where.append((mb.origin, mb.mirror, mb.cache))
            size = model_bytes(model)
            assert sorted(by_where) == [(0, size, 0), (0, size, 0), (size, 0, 0)], by_where
            text = finish(cli(nodes[0], "status"))
            assert re.search(r"^MODEL\s+ORIGIN\s+MIRROR\s+CACHE$", text, re.M), text
            assert "mirror s3://" in text and "conditional writes yes" in text
        finally:
            for d in nodes:
                assert d.stop() == 0, d.log()


def test_the_metrics_count_a_models_bytes_by_where_they_came_from(
        tmp_path, http_server, model, mirror_env):
    env = {**mirror_env, "WEIGHTD_METRICS_ADDRESS": "127.0.0.1:0"}
    a, b = start_nodes(tmp_path, 2, env)
    try:
        url = f"{http_server.url}/org/m"
        finish(cli(a, "fetch", url))
        a.stop()  # waits for its write-back
        finish(cli(b, "fetch", url))
        finish(cli(b, "fetch", url))  # again: every file in the cache
        m = re.search(r"metrics on (http://\S+)", b.log())
        assert m, b.log()
        with urllib.request.urlopen(m.group(1), timeout=10) as r:
            text = r.read().decode()
        size = model_bytes(model)
        values = {where: float(v) for where, v in re.findall(
            r'^weightd_model_bytes_total\{fetched_from="(\w+)",model="[^"]+"\} (\S+)$',
            text, re.M)}
        assert values == {"origin": 0, "mirror": size, "cache": size}, values
    finally:
        for d in (a, b):
            d.stop()


def test_mirror_push_seeds_the_mirror_without_and_through_a_daemon(
        tmp_path, http_server, model, mirror_env):
    url = f"{http_server.url}/org/m"
    env = {**os.environ, **mirror_env, "WEIGHTD_CACHE_DIR": str(tmp_path / "cli-cache"),
           "WEIGHTD_SOCKET": str(tmp_path / "none.sock")}
    run = subprocess.run([sys.executable, "-m", "weightd.cli", "mirror", "push", url],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("uploaded") for line in lines), lines
    assert "4 uploaded" in run.stderr and "manifest written" in run.stderr
    again = subprocess.run([sys.executable, "-m", "weightd.cli", "mirror", "push", url],
                           capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "already in" in again.stderr
    assert all(line.startswith("in the mirror") for line in again.stdout.splitlines())
    # a node that starts now reads it all from the mirror
    http_server.log.reset()
    [d] = start_nodes(tmp_path, 1, mirror_env)
    try:
        finish(cli(d, "fetch", url))
        assert http_server.log.bytes_served() == 0
        # through the daemon: another model, fetched by the daemon, read from its cache
        other = http_server.url + "/org/other"
        write_synthetic_model(Path(http_server._server.root) / "org" / "other",
                              total_bytes=MiB, tensors=4, seed=12)
        pushed = subprocess.run([sys.executable, "-m", "weightd.cli", "mirror", "push", other],
                                capture_output=True, text=True, env=d.env, timeout=120)
        assert pushed.returncode == 0, pushed.stderr
        assert len(pushed.stdout.splitlines()) == 2 and "manifest written" in pushed.stderr
    finally:
        assert d.stop() == 0, d.log()


def test_mirror_push_without_a_mirror_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "weightd.cli", "mirror", "push",
                          "http://127.0.0.1:1/m"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "WEIGHTD_CACHE_DIR": str(tmp_path / "c")})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "no mirror is configured" in run.stderr


def test_mirror_push_to_a_mirror_that_is_down_is_one_line_and_exit_1(
        tmp_path, http_server, model):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        port = s.getsockname()[1]
        env = {**os.environ, "WEIGHTD_CACHE_DIR": str(tmp_path / "c"),
               "WEIGHTD_SOCKET": str(tmp_path / "none.sock"),
               "WEIGHTD_MIRRORS": "s3://mirror/cluster",
               "WEIGHTD_MIRROR_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "WEIGHTD_MIRROR_ACCESS_KEY_ID": "k", "WEIGHTD_MIRROR_SECRET_ACCESS_KEY": "s",
               "WEIGHTD_MIRROR_TIMEOUT": "2s"}
        run = subprocess.run([sys.executable, "-m", "weightd.cli", "mirror", "push",
                              f"{http_server.url}/org/m"], capture_output=True, text=True,
                             timeout=60, env=env)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "mirror s3://mirror/cluster" in run.stderr


def test_a_stream_from_a_mirror_with_a_corrupt_blob_gets_the_origins_bytes(
        tmp_path, http_server, model, mirror_env, s3_server):
    # a shard read from the mirror is streamed only once its digest matched; here the
    # mirror's copy of one shard is corrupt: the stream must yield the origin's bytes
    # for it (read again after the mirror's failed), never the mirror's
    from safetensors.torch import load_file

    from tests.test_stream import raw
    from weightd_client import Client

    url = f"{http_server.url}/org/m"
    [a] = start_nodes(tmp_path, 1, mirror_env)
    try:
        finish(cli(a, "fetch", url))
    finally:
        a.stop()  # waits for its write-back: the mirror has the model
    bucket, prefix = mirror_env["WEIGHTD_MIRRORS"].removeprefix("s3://").split("/", 1)
    s3c = s3_server.client()
    shard = model / "model-00001-of-00002.safetensors"
    key = f"{prefix}/blobs/{hash_file(shard)}"
    good = s3c.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3c.put_object(Bucket=bucket, Key=key, Body=good[:-1] + bytes([good[-1] ^ 0xFF]))
    want = {}
    for p in sorted(model.glob("*.safetensors")):
        want.update(load_file(p))
    with DaemonProcess(tmp_path / "b", env=mirror_env) as b, Client(b.socket) as client:
        got = {}
        with client.stream(url) as weights:
            for name, tensor in weights:
                got[name] = tensor.clone()
        assert sorted(got) == sorted(want)
        # bytes, not values (random bytes hold NaNs)
        assert [n for n in want if raw(got[n]) != raw(want[n])] == []
        # counted when the fetch ends (durable), which may be just after the stream's end
        [mb] = wait_for(lambda: b.status().model_bytes, what="the fetch's byte counts")
        assert mb.origin == shard.stat().st_size  # that shard came from the origin
        assert "reading it from the origin" in b.log()
