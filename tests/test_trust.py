"""The trust boundary, tried as an attacker on this machine would (docs/security.md).

weightd's first promise is that a replica maps the source's own bytes, verified, and
nobody else's. Each test here is one attack with real parts: the daemon as a process on
a real unix socket, clients as separate processes, HTTP origins on 127.0.0.1 that
redirect, list links out of the model and lie about ranges, other local users (created
here; those tests need root and skip otherwise), a process that swaps a link in while
the daemon reads.

1. a squatted runtime directory and a socket of another user;
2. two sources that used to share one model name;
3. an HTTP redirect out of ``allowed_sources``;
4. a directory link that climbs out of the model;
5. a link swapped in during a ``file://`` fetch;
6. a ``Content-Range`` (or a 200) that is not the range asked for;
7. cache files readable by every local user.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.daemon import ClientError, ClientProcess, DaemonProcess, client_info
from tests.test_access import OUTSIDER, _ensure_user, _python_for_others
from weightd.store import hash_file
from weightd.testing import RangeHTTPServer, write_synthetic_model
from weightd.testing.servers import Lie
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc

MiB = 1024 * 1024
KiB = 1024
CHUNK = 64 * KiB


@dataclass
class World:
    top: Path               # 0711, under /tmp: other users can traverse it, nothing more
    models: Path            # allowed (local)
    outside: Path           # not allowed
    origin: RangeHTTPServer  # allowed under /allowed
    elsewhere: RangeHTTPServer  # not allowed at all
    daemon: DaemonProcess

    @property
    def cache(self) -> Path:
        return self.daemon.cache_dir

    @property
    def allowed_url(self) -> str:
        return f"{self.origin.url}/allowed"


def _private_tmp(prefix: str) -> Path:
    top = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(top, 0o711)
    return top


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    top = _private_tmp("weightd-trust-")
    models, outside = top / "models", top / "outside"
    models.mkdir(mode=0o755)
    outside.mkdir(mode=0o700)
    (top / "run").mkdir(mode=0o711)
    os.chmod(top / "run", 0o711)
    write_synthetic_model(models / "good", total_bytes=MiB, tensors=8)
    www, evil = top / "www", top / "evil"
    origin, elsewhere = RangeHTTPServer(www), RangeHTTPServer(evil)
    old_umask = os.umask(0o022)  # what a daemon started by hand gets, outside systemd
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                if key.startswith(("WEIGHTD_", "AWS_")):
                    mp.delenv(key)
            mp.setenv("XDG_CACHE_HOME", str(top / "xdg-cache"))
            daemon = DaemonProcess(top, env={
                "WEIGHTD_ALLOWED_SOURCES": f"{models},{origin.url}/allowed",
                "WEIGHTD_CHUNK_SIZE": "64KiB", "WEIGHTD_RETRY_ATTEMPTS": "4"})
    finally:
        os.umask(old_umask)
    w = World(top, models, outside, origin, elsewhere, daemon)
    try:
        yield w
    finally:
        code = daemon.stop()
        origin.stop()
        elsewhere.stop()
        shutil.rmtree(top, ignore_errors=True)
        assert code == 0, daemon.log()


def stub(w: World) -> pb_grpc.WeightdStub:
    return w.daemon.stub()


def acquire(w: World, source: str | Path) -> pb.AcquireResponse:
    return stub(w).Acquire(pb.AcquireRequest(source=str(source),
                                             client=client_info("test_trust")), timeout=120)


def done(w: World, got: pb.AcquireResponse) -> None:
    """Release a lease and evict its model (the module's daemon stays as it was)."""
    s = stub(w)
    s.Release(pb.ReleaseRequest(lease_id=got.lease_id), timeout=10)
    s.Evict(pb.EvictRequest(source=got.model), timeout=10)


def fetch(w: World, source: str | Path) -> pb.FetchProgress:
    *_, last = stub(w).Fetch(pb.FetchRequest(source=str(source)), timeout=120)
    assert last.done
    return last


def shard_digests(got: pb.AcquireResponse) -> list[str]:
    return [s.digest for s in got.shards]


def blobs(w: World) -> set[str]:
    return {p.name for p in (w.cache / "blobs").glob("*/*")}


def error_class(e: grpc.RpcError) -> str | None:
    return dict(e.trailing_metadata() or ()).get("weightd-error")  # type: ignore[arg-type]


def refused(w: World, call: Any, code: grpc.StatusCode) -> grpc.RpcError:
    try:
        out = call()
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        return e
    if isinstance(out, pb.AcquireResponse):
        done(w, out)
    pytest.fail(f"expected {code.name}; the call succeeded: {str(out)[:300]}")


def snapshot_files(path: str | Path) -> dict[str, bytes]:
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# 2. two sources, one model name ----------------------------------------------------------


@pytest.mark.parametrize("pair", [("org/llama", "org--llama"), ("llama 7b", "llama_7b")])
def test_two_sources_never_share_a_model_name(world, pair):
    a, b = (world.models / "names" / p for p in pair)
    write_synthetic_model(a, total_bytes=MiB // 2, tensors=4, seed=21)
    write_synthetic_model(b, total_bytes=MiB // 2, tensors=4, seed=22)
    want_a, want_b = hash_file(a / "model.safetensors"), hash_file(b / "model.safetensors")
    first = acquire(world, a)
    assert shard_digests(first) == [want_a]
    stub(world).Release(pb.ReleaseRequest(lease_id=first.lease_id), timeout=10)
    fetch(world, b)  # the other source, fetched by someone else
    again = acquire(world, a)
    other = acquire(world, b)
    try:
        assert shard_digests(again) == [want_a], "the victim got the other source's weights"
        assert shard_digests(other) == [want_b]
        assert again.model != other.model
        assert Path(again.snapshot_path) != Path(other.snapshot_path)
        assert snapshot_files(again.snapshot_path)["model.safetensors"] == (
            a / "model.safetensors").read_bytes()
    finally:
        done(world, again)
        done(world, other)


def test_a_cache_named_the_old_way_is_migrated_and_served_without_a_fetch(tmp_path,
                                                                          monkeypatch):
    import weightd.store.fetch
    from weightd.config import Config
    from weightd.sources import canonical_url, model_name
    from weightd.sources.base import _legacy_model_name
    from weightd.store import Fetcher, Store

    models = tmp_path / "models"
    src = models / "org" / "llama"
    write_synthetic_model(src, total_bytes=MiB // 2, tensors=4, seed=23)
    url = canonical_url(str(src))
    legacy, new = _legacy_model_name(url), model_name(url)
    cache = tmp_path / "cache"
    # the layout weightd 0.1 wrote: snapshots/<legacy>, .revs/<legacy>/, index rows, a pin
    with monkeypatch.context() as mp:
        mp.setattr(weightd.store.fetch, "model_name", _legacy_model_name)
        with Store.open(cache) as store:
            snap = Fetcher(store, Config(cache_dir=cache)).fetch(str(src))
            store.index.add_pin(url, "host", "cpu")
    assert snap.name == legacy and (cache / "snapshots" / legacy).is_symlink()
    daemon = DaemonProcess(tmp_path, env={"WEIGHTD_ALLOWED_SOURCES": str(models)})
    try:
        got = daemon.stub().Acquire(pb.AcquireRequest(source=str(src), client=client_info()),
                                    timeout=60)
        daemon.stub().Release(pb.ReleaseRequest(lease_id=got.lease_id), timeout=10)
        pins = list(daemon.status().pins)
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert not got.fetched, "the migrated model was fetched again"
    # the view names its own revision's directory (issue 13), under the migrated name
    assert got.model == new
    assert Path(got.snapshot_path).parent == cache / "snapshots" / ".revs" / new
    assert snapshot_files(got.snapshot_path) == snapshot_files(src)
    assert not (cache / "snapshots" / legacy).exists()
    assert not (cache / "snapshots" / ".revs" / legacy).exists()
    assert [(p.model, p.state) for p in pins] == [(new, "resident")]
    manifests = list((cache / "snapshots" / ".revs" / new).glob("*.manifest.json"))
    assert [json.loads(m.read_text())["name"] for m in manifests] == [new]


def test_verify_narrows_modes_wider_than_the_stores(tmp_path):
    from tests.conftest import run_cli

    src = tmp_path / "m"
    write_synthetic_model(src, total_bytes=MiB // 4, tensors=2)
    cache = tmp_path / "cache"
    run_cli("fetch", str(src), "--cache-dir", str(cache), check=True)
    blob = next((cache / "blobs").glob("*/*"))
    manifest = next((cache / "snapshots" / ".revs").glob("*/*.manifest.json"))
    # what weightd 0.1 (or a umask of 0) left: world-readable blobs and directories
    os.chmod(blob, 0o444)
    os.chmod(blob.parent, 0o777)
    os.chmod(manifest, 0o666)
    os.chmod(cache / "snapshots", 0o755)
    res = run_cli("verify", "--cache-dir", str(cache))
    assert res.returncode == 0, res.stderr
    for path, old, new in ((blob, "0444", "0440"), (blob.parent, "0777", "0750"),
                           (manifest, "0666", "0640"), (cache / "snapshots", "0755", "0750")):
        assert f"MODE {path}: {old} " in res.stdout and f"narrowed to {new}" in res.stdout, \
            res.stdout
        assert stat.S_IMODE(path.stat().st_mode) == int(new, 8)
    assert "4 modes narrowed" in res.stderr, res.stderr
    again = run_cli("verify", "--cache-dir", str(cache))
    assert again.returncode == 0 and "MODE" not in again.stdout, again.stdout


def test_verify_and_fetches_keep_the_setgid_bit_of_the_cache_directories(tmp_path):
    """An operator who shares a cache with a group sets g+s on its directories so that
    new blobs inherit the group: verify and the next fetch keep it (review 1, defect 9)."""
    from tests.conftest import run_cli

    first, second = tmp_path / "m1", tmp_path / "m2"
    write_synthetic_model(first, total_bytes=MiB // 4, tensors=2, seed=1)
    write_synthetic_model(second, total_bytes=MiB // 4, tensors=2, seed=2)
    cache = tmp_path / "cache"
    run_cli("fetch", str(first), "--cache-dir", str(cache), check=True)
    dirs = [cache, cache / "blobs", cache / "snapshots", *(cache / "blobs").iterdir()]
    for d in dirs:
        os.chmod(d, 0o2750)
    res = run_cli("verify", "--cache-dir", str(cache))
    assert res.returncode == 0, res.stderr
    assert "MODE" not in res.stdout and "0 modes narrowed" in res.stderr, res.stdout
    run_cli("fetch", str(second), "--cache-dir", str(cache), check=True)
    new = [p for p in (cache / "blobs").iterdir() if p not in dirs]
    assert new, "the second model's blobs went into fan-out directories that existed"
    for d in dirs + new:
        assert stat.S_IMODE(d.stat().st_mode) == 0o2750, (d, oct(d.stat().st_mode))


# 3. redirects ------------------------------------------------------------------------------


def test_a_redirect_out_of_allowed_sources_is_never_followed(world):
    write_synthetic_model(world.origin._server.root / "allowed" / "redir",  # type: ignore
                          total_bytes=MiB // 2, tensors=4, seed=31)
    write_synthetic_model(world.elsewhere._server.root / "evil",  # type: ignore
                          total_bytes=MiB // 2, tensors=4, seed=32)
    evil = f"{world.elsewhere.url}/evil"

    def redirect(method: str, path: str) -> str | None:
        if "/allowed/redir/" in path and not path.endswith("/"):
            return f"{evil}/{path.rsplit('/', 1)[-1]}"
        return None

    world.origin.set_redirect(redirect)
    world.elsewhere.log.reset()
    try:
        for ref in (f"{world.allowed_url}/redir", f"{world.allowed_url}/redir/model.safetensors"):
            e = refused(world, lambda r=ref: acquire(world, r),
                        grpc.StatusCode.PERMISSION_DENIED)
            assert error_class(e) == "NotPermitted"
            assert evil in e.details() and "allowed_sources" in e.details(), e.details()
        assert world.elsewhere.log.count() == 0, world.elsewhere.log.requests
        assert hash_file(world.elsewhere._server.root / "evil" / "model.safetensors") \
            not in blobs(world)  # type: ignore[attr-defined]
    finally:
        world.origin.set_redirect(None)


def test_a_redirect_inside_allowed_sources_is_followed(world):
    www = world.origin._server.root  # type: ignore[attr-defined]
    write_synthetic_model(www / "allowed" / "real", total_bytes=MiB // 2, tensors=4, seed=33)
    (www / "allowed" / "moved").mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        (www / "allowed" / "moved" / name).write_bytes(b"placeholder")

    def redirect(method: str, path: str) -> str | None:
        if path.startswith("/allowed/moved/") and not path.endswith("/"):
            return "/allowed/real/" + path.rsplit("/", 1)[-1]
        return None

    world.origin.set_redirect(redirect)
    try:
        got = acquire(world, f"{world.allowed_url}/moved")
        done(world, got)
    finally:
        world.origin.set_redirect(None)
    assert shard_digests(got) == [hash_file(www / "allowed" / "real" / "model.safetensors")]


# 4. directory links out of the model -------------------------------------------------------


def test_a_directory_link_out_of_the_model_is_never_requested(world):
    www = world.origin._server.root  # type: ignore[attr-defined]
    write_synthetic_model(www / "allowed" / "dirlink", total_bytes=MiB // 2, tensors=4,
                          seed=41)
    write_synthetic_model(www / "allowed" / "neighbour", total_bytes=MiB // 2, tensors=4,
                          seed=42)
    write_synthetic_model(www / "secret-model", total_bytes=MiB // 2, tensors=4, seed=43)
    climbing = ["sub/../../neighbour/", "%2e%2e/neighbour/", "%2E%2E/%2E%2E/secret-model/",
                "sub%2f..%2f..%2f..%2fsecret-model/", "./../neighbour/"]

    world.origin.set_links(lambda rel: climbing if rel.rstrip("/").endswith("/dirlink")
                           else [])
    world.origin.log.reset()
    try:
        ref = f"{world.allowed_url}/dirlink"
        try:
            got = acquire(world, ref)
        except grpc.RpcError as e:  # refusing the model is fine; requesting the link is not
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e.details()
        else:
            done(world, got)
            assert sorted(snapshot_files(got.snapshot_path)) == ["config.json",
                                                                 "model.safetensors"]
    finally:
        world.origin.set_links(None)
    requested = sorted({p for (_, p) in world.origin.log.requests})
    outside = [p for p in requested if not p.startswith("/allowed/dirlink")]
    assert outside == [], f"requests out of the model root: {outside}"


# 5. a link swapped in during a file:// fetch ------------------------------------------------


SWAPPER = r"""
import os, sys, time
target, keep, secret, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
link_tmp, decoy_tmp = keep + ".link", keep + ".tmp"  # beside keep: not in the model
end = time.monotonic() + seconds
while time.monotonic() < end:
    os.symlink(secret, link_tmp)
    os.rename(link_tmp, target)      # the name is a link to the secret now ...
    os.link(keep, decoy_tmp)
    os.rename(decoy_tmp, target)     # ... and the decoy again, the very same inode
"""


def test_a_link_swapped_in_during_a_local_fetch_never_serves_its_target(world):
    secret_text = b'{"secret": "' + b"S3CR3T" * 20 + b'"}'
    secret = world.outside / "secret.json"
    secret.write_bytes(secret_text)
    os.chmod(secret, 0o600)
    model = world.models / "race"
    write_synthetic_model(model, total_bytes=MiB // 4, tensors=4, seed=51)
    target = model / "secret.json"
    target.write_bytes(b'{"decoy": "' + b"x" * (len(secret_text) - 13) + b'"}')
    assert target.stat().st_size == len(secret_text)
    keep = world.top / "race-keep"
    keep.mkdir(exist_ok=True)
    os.link(target, keep / "decoy")
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(target), str(keep / "decoy"),
                                str(secret), "30"])
    served = refusals = 0
    breach = None
    base = time.time_ns()
    deadline = time.monotonic() + 10
    try:
        for attempt in range(200):
            if time.monotonic() > deadline:
                break
            # a new mtime: the decoy is downloaded again on every attempt
            os.utime(keep / "decoy", ns=(base + attempt * 1000, base + attempt * 1000))
            try:
                last = fetch(world, model)
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                    grpc.StatusCode.DATA_LOSS,
                                    grpc.StatusCode.NOT_FOUND), (e.code(), e.details())
                refusals += 1
                continue
            served += 1
            got = (Path(last.snapshot_path) / "secret.json").read_bytes()
            if b"S3CR3T" in got:
                breach = attempt
                break
    finally:
        swapper.kill()
        swapper.wait(10)
    assert breach is None, f"the secret was served on attempt {breach + 1}"
    assert served >= 3, (served, refusals)  # the race was run, not only refused
    assert hash_file(secret) not in blobs(world)


# 6. a lying Content-Range -----------------------------------------------------------------------


def _liar_model(w: World, name: str, seed: int) -> tuple[str, str]:
    d = w.origin._server.root / "allowed" / name  # type: ignore[attr-defined]
    write_synthetic_model(d, total_bytes=MiB, tensors=16, seed=seed)
    return f"{w.allowed_url}/{name}", hash_file(d / "model.safetensors")


def test_a_lying_range_answer_is_retried_and_never_written(world):
    asked: Counter[tuple[str, int]] = Counter()

    def lie_once(path: str, start: int, end: int, size: int) -> Lie | None:
        """The first answer for each chunk of these shards is another range (its header
        honest about which), or a 200 with other bytes."""
        if not path.endswith(".safetensors") or "/liar-" not in path:
            return None
        asked[(path, start)] += 1
        if asked[(path, start)] > 1:
            return None
        if "/liar-200" in path and start == 0:
            return Lie(serve=(CHUNK, CHUNK + end), status=200)
        if "/liar-once" in path and start >= CHUNK:
            return Lie(serve=(start - CHUNK, end - CHUNK))
        if "/liar-short" in path:
            return Lie(body_bytes=(end - start) // 2)  # a short body, its length honest
        return None

    once, want_once = _liar_model(world, "liar-once", 61)
    ok200, want_200 = _liar_model(world, "liar-200", 62)
    short, want_short = _liar_model(world, "liar-short", 64)
    world.origin.set_lie(lie_once)
    try:
        for ref, want in ((once, want_once), (ok200, want_200), (short, want_short)):
            got = acquire(world, ref)
            done(world, got)
            assert shard_digests(got) == [want], f"{ref}: wrong bytes were written"
    finally:
        world.origin.set_lie(None)
    assert any(n > 1 for n in asked.values())  # it did lie, and was asked again


def test_a_range_that_keeps_lying_is_source_unavailable_and_leaves_nothing(world):
    ref, want = _liar_model(world, "liar-always", 63)

    def lie_always(path: str, start: int, end: int, size: int) -> Lie | None:
        if path.endswith("liar-always/model.safetensors") and start == 3 * CHUNK:
            return Lie(serve=(0, end - start))  # the first bytes, labelled honestly
        return None

    world.origin.set_lie(lie_always)
    try:
        e = refused(world, lambda: acquire(world, ref), grpc.StatusCode.UNAVAILABLE)
    finally:
        world.origin.set_lie(None)
    assert error_class(e) == "SourceUnavailable"
    assert "liar-always/model.safetensors" in e.details(), e.details()
    assert "Content-Range" in e.details(), e.details()
    snaps = {p.name for p in (world.cache / "snapshots").iterdir()}
    assert not any("liar-always" in s for s in snaps), snaps
    assert not os.listdir(world.cache / "tmp")
    # what was written is nothing but the model's own, verified files
    for digest in blobs(world):
        assert hash_file(next((world.cache / "blobs").glob(f"*/{digest}"))) == digest


# 7. who can read the cache ----------------------------------------------------------------------


def _read_as(user: pwd.struct_passwd, path: Path) -> str:
    code = "import sys\ntry:\n open(sys.argv[1], 'rb').read(1); print('read')\n" \
           "except PermissionError: print('EACCES')\n"
    res = subprocess.run(["/usr/bin/env", "python3", "-c", code, str(path)],
                         user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                         env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.fixture(scope="module")
def outsider() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root to create another user and run a process as it")
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    return _ensure_user(OUTSIDER)


def test_the_cache_is_not_readable_by_other_users(world, outsider):
    got = acquire(world, world.models / "good")
    done(world, got)
    blob = Path(got.shards[0].path)
    side = Path(got.snapshot_path) / "config.json"
    assert _read_as(outsider, blob) == "EACCES", f"{outsider.pw_name} read {blob}"
    assert _read_as(outsider, side) == "EACCES", f"{outsider.pw_name} read {side}"
    gid = os.getegid()
    for p in [world.cache, *world.cache.rglob("*")]:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        assert not mode & 0o007, f"{p} is {mode:o}: other users can use it"
        assert st.st_gid == gid, f"{p} belongs to group {st.st_gid}, not {gid}"
        if stat.S_ISDIR(st.st_mode):
            assert mode in (0o750, 0o700), f"{p} is {mode:o}"
        elif p.parent.parent.name == "blobs":
            assert mode == 0o440, f"blob {p} is {mode:o}"
    assert blob.stat().st_mode & 0o777 == 0o440


# 1. a squatted runtime directory ------------------------------------------------------------------

#: Another user's fake daemon: answers Acquire with its own shard. Run as that user.
FAKE_DAEMON = r"""
import json, os, site, struct, sys
sock, site_dir, shard = sys.argv[1], sys.argv[2], sys.argv[3]
site.addsitedir(site_dir)
from concurrent import futures
import grpc
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb, weightd_pb2_grpc as pb_grpc
with open(shard, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
size = os.path.getsize(shard)
tensors = [pb.TensorLayout(name=k, dtype=v["dtype"], shape=v["shape"], shard=0,
                           offset=8 + n + v["data_offsets"][0],
                           length=v["data_offsets"][1] - v["data_offsets"][0])
           for k, v in header.items() if k != "__metadata__"]

class Fake(pb_grpc.WeightdServicer):
    def Acquire(self, request, context):
        return pb.AcquireResponse(
            lease_id="attacker", model="model", tier=pb.TIER_HOST, device="cpu",
            shards=[pb.Shard(relpath="model.safetensors", digest="0" * 32, size=size,
                             path=shard)], tensors=tensors, snapshot_path=os.path.dirname(shard))
    def Release(self, request, context):
        return pb.ReleaseResponse()

server = grpc.server(futures.ThreadPoolExecutor(4))
pb_grpc.add_WeightdServicer_to_server(Fake(), server)
server.add_insecure_port("unix://" + sock)
server.start()
print("listening", flush=True)
server.wait_for_termination(timeout=120)
"""


def _first_bytes(shard: Path, name: str = "layers.0.weight") -> list[int]:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    start = json.loads(data[8:8 + n])[name]["data_offsets"][0]
    return list(data[8 + n + start:8 + n + start + 16])


def _squat(owner: pwd.struct_passwd, mode: int) -> Path:
    """What another user leaves behind: a directory of theirs in /tmp, where our socket
    goes (``/tmp/weightd-<uid>`` is the default; a unique name here)."""
    d = Path(tempfile.mkdtemp(prefix=f"weightd-{os.getuid()}-squat-", dir="/tmp"))
    os.chown(d, owner.pw_uid, owner.pw_gid)
    os.chmod(d, mode)
    return d


def test_a_squatted_runtime_directory_stops_the_daemon(outsider, tmp_path):
    for mode in (0o777, 0o755):
        run = _squat(outsider, mode)
        try:
            with pytest.raises(RuntimeError) as e:
                DaemonProcess(tmp_path, socket=run / "weightd.sock", timeout=30).stop()
            log = str(e.value)
            assert str(run) in log and "owned by" in log, log
            assert "Traceback" not in log, log
            assert not (run / "weightd.sock").exists()
        finally:
            shutil.rmtree(run, ignore_errors=True)


def test_a_world_writable_runtime_directory_stops_the_daemon(tmp_path):
    run = _private_tmp("weightd-open-") / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    try:
        with pytest.raises(RuntimeError) as e:
            DaemonProcess(tmp_path, socket=run / "weightd.sock", timeout=30).stop()
        assert str(run) in str(e.value) and "writable" in str(e.value), str(e.value)
        # a setting's mistake: exit 2, one line, saying plainly who may change it
        assert "exited with 2" in str(e.value) and "Traceback" not in str(e.value)
        assert "that only root can change" in str(e.value), str(e.value)
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)


def test_a_refused_runtime_directory_stops_the_daemon_before_it_does_any_work(tmp_path):
    # the check comes first: no pin is warmed (fetched, mlocked), no CUDA tier started,
    # no reaper, when the socket cannot be served anyway (review 1, defect 11)
    from weightd.store import Store

    src = tmp_path / "pinned"
    write_synthetic_model(src, total_bytes=MiB // 2, tensors=2, seed=5)
    store = Store.open(tmp_path / "d" / "cache", exclusive=True)
    store.index.add_pin(f"file://{src}", "host", "cpu")
    store.close()
    run = _private_tmp("weightd-open-") / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    try:
        with pytest.raises(RuntimeError) as e:
            DaemonProcess(tmp_path / "d", socket=run / "weightd.sock", timeout=30).stop()
        assert "writable" in str(e.value), str(e.value)
        assert "cuda tier" not in str(e.value), str(e.value)  # node.start() did not run
        time.sleep(0.5)  # a warm-up thread, had one started, would have fetched by now
        assert not list((tmp_path / "d" / "cache" / "blobs").glob("*/*")), str(e.value)
    finally:
        shutil.rmtree(run.parent, ignore_errors=True)


def test_the_client_refuses_a_socket_another_user_listens_on(outsider, tmp_path):
    victim = tmp_path / "models" / "victim"
    write_synthetic_model(victim, total_bytes=MiB // 2, tensors=4, seed=71)
    run = _squat(outsider, 0o755)
    fake = None
    try:
        evil = run / "evil"
        write_synthetic_model(evil, total_bytes=MiB // 2, tensors=4, seed=72)
        for p in [evil, *evil.iterdir()]:
            os.chown(p, outsider.pw_uid, outsider.pw_gid)
        sock = run / "weightd.sock"
        fake = subprocess.Popen(
            [_python_for_others(), "-c", FAKE_DAEMON, str(sock),
             sysconfig.get_paths()["purelib"], str(evil / "model.safetensors")],
            user=outsider.pw_uid, group=outsider.pw_gid, extra_groups=[], cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, stdout=subprocess.PIPE,
            text=True)
        assert fake.stdout is not None and fake.stdout.readline().strip() == "listening"
        assert sock.stat().st_uid == outsider.pw_uid
        client = ClientProcess(sock)
        try:
            with pytest.raises(ClientError) as e:
                client.call("load", source=str(victim), fallback=False)
            assert e.value.kind == "DaemonUnavailable", e.value
            assert str(sock) in str(e.value) and outsider.pw_name in str(e.value), e.value
            # with the fallback, the source's own weights, read straight from the source
            client.call("load", source=str(victim), fallback=True)
            got = client.call("read", source=str(victim), name="layers.0.weight")["bytes"]
        finally:
            client.close()
        assert got == _first_bytes(victim / "model.safetensors")
        assert got != _first_bytes(evil / "model.safetensors")
    finally:
        if fake is not None:
            fake.kill()
            fake.wait(10)
        shutil.rmtree(run, ignore_errors=True)


def test_the_client_refuses_a_socket_in_a_directory_others_can_write(world, tmp_path):
    # the daemon's own socket, reached through a directory that anyone can write in
    # (who can rename entries there can put their own socket in its place)
    open_dir = _private_tmp("weightd-open-") / "run"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    try:
        os.link(world.daemon.socket, open_dir / "weightd.sock")
        client = ClientProcess(open_dir / "weightd.sock")
        try:
            with pytest.raises(ClientError) as e:
                client.call("load", source=str(world.models / "good"), fallback=False)
        finally:
            client.close()
        assert e.value.kind == "DaemonUnavailable", e.value
        assert "writable" in str(e.value), e.value
    finally:
        shutil.rmtree(open_dir.parent, ignore_errors=True)


FALLBACK_LOAD = r"""
import logging, sys
import weightd_client
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
with weightd_client.Client(sys.argv[1]) as client:
    print(len(client.load(sys.argv[2], fallback=True)), flush=True)
"""


def test_the_cli_and_the_fallback_say_why_the_socket_was_refused(tmp_path):
    # The daemon's runtime directory made writable by everyone while it runs: the CLI
    # says the socket is refused and why (not "no daemon", not "the cache is in use"),
    # and load()'s fallback warning carries the same reason.
    from tests.conftest import run_cli

    model = tmp_path / "m"
    write_synthetic_model(model, total_bytes=MiB // 2, tensors=4)
    with DaemonProcess(tmp_path / "d") as d:
        env = {"WEIGHTD_SOCKET": str(d.socket), "WEIGHTD_CACHE_DIR": str(d.cache_dir)}
        os.chmod(d.socket.parent, 0o777)
        try:
            for command in (("status",), ("ls",), ("verify",)):
                res = run_cli(*command, env=env)
                assert res.returncode == 1, (command, res.stderr)
                lines = res.stderr.strip().splitlines()
                assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
                assert "refusing the weightd socket" in lines[0], (command, lines)
                assert "writable by its group and others" in lines[0], (command, lines)
            res = subprocess.run([sys.executable, "-c", FALLBACK_LOAD, str(d.socket),
                                  str(model)], capture_output=True, text=True, timeout=120)
            assert res.returncode == 0 and res.stdout.strip() == "4", res.stderr
            assert "writable by its group and others" in res.stderr, res.stderr
            assert "straight from the source" in res.stderr, res.stderr
        finally:
            os.chmod(d.socket.parent, 0o700)


def test_the_client_trusts_a_socket_of_the_daemons_user_in_its_directory(world, outsider):
    # /run/weightd: made by root (systemd's RuntimeDirectory=) for the daemon's user
    top = _private_tmp("weightd-delegated-")
    run = top / "weightd"
    run.mkdir(mode=0o750)
    os.chown(run, outsider.pw_uid, grp.getgrgid(os.getegid()).gr_gid)
    try:
        from weightd_client.rundir import check_socket

        sock_path = run / "weightd.sock"
        script = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]);"
                  " print('bound', flush=True); sys.stdin.read()")
        holder = subprocess.Popen([_python_for_others(), "-c", script, str(sock_path)],
                                  user=outsider.pw_uid, group=outsider.pw_gid, cwd="/",
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
            check_socket(sock_path)  # the directory's owner, given it by root: trusted
            os.chmod(top, 0o777)  # ... unless others could have made that directory
            with pytest.raises(Exception) as e:
                check_socket(sock_path)
            assert type(e.value).__name__ == "DaemonUnavailable", e.value
        finally:
            holder.kill()
            holder.wait(10)
    finally:
        shutil.rmtree(top, ignore_errors=True)
