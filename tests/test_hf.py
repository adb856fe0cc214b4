"""hf:// as a first-class source, against a local hub (weightd.testing.FakeHub: the hub's
endpoints on 127.0.0.1, and a second server as its CDN for LFS bytes)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from weightd.config import Config
from weightd.errors import IntegrityError, NotPermitted, SourceNotFound
from weightd.sources import canonical_url, check_allowed, model_name
from weightd.sources.digests import from_hf_info
from weightd.sources.hf import parse_ref
from weightd.store import Fetcher, Store, hash_file
from weightd.testing import FakeHub, Fault, write_synthetic_model
from weightd.testing.hub import git_blob_id

MiB = 1024 * 1024
TOKEN = "hf_secret_1234567890abcdef"


def fetch(config: Config, ref: str, **kw: object):  # type: ignore[no-untyped-def]
    with Store.open(config.cache_dir) as store:
        return Fetcher(store, config).fetch(ref, **kw)  # type: ignore[arg-type]


@pytest.fixture
def hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    with FakeHub(tmp_path / "hub", token=TOKEN, page_size=3) as h:
        yield h


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    write_synthetic_model(d, total_bytes=2 * MiB, tensors=12, shards=2, seed=5)
    (d / "tokenizer.json").write_text('{"vocab": {}}')
    return d


def files_of(d: Path) -> dict[str, Path]:
    return {p.relative_to(d).as_posix(): p for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def hf_config(config: Config, hub: FakeHub) -> Config:
    return config.replace(hf_endpoint=hub.url, hf_download_hosts=(hub.cdn_host,),
                          chunk_size=256 * 1024, concurrency=4)


def assert_snapshot_is(snapshot: str, source: Path) -> None:
    snap = Path(snapshot)
    assert sorted(files_of(source)) == sorted(
        p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file())
    for rel, p in files_of(source).items():
        assert hash_file(snap / rel) == hash_file(p), rel


# --- references ----------------------------------------------------------------------------


def test_references_and_their_canonical_form():
    assert parse_ref("hf://org/m").revision == "main"
    assert parse_ref("hf://org/m@v1.0/sub/x.safetensors").path == "sub/x.safetensors"
    assert parse_ref("hf://org/m@refs/pr/7/sub").revision == "refs/pr/7"
    assert parse_ref("hf://org/m@refs%2Fpr%2F7/sub") == parse_ref("hf://org/m@refs/pr/7/sub")
    assert canonical_url("hf://org/m@main") == canonical_url("hf://org/m") == "hf://org/m"
    assert canonical_url("hf://org/m@refs/pr/7") == "hf://org/m@refs%2Fpr%2F7"
    assert model_name(canonical_url("hf://org/m@main")) == model_name("hf://org/m")
    assert model_name(canonical_url("hf://org/m@v2")) != model_name("hf://org/m")
    for bad in ("hf://org", "hf://datasets/org/d", "hf://org/m@/x"):
        with pytest.raises(SourceNotFound):
            parse_ref(bad)


def test_allowed_sources_name_repositories_and_revisions():
    check_allowed(canonical_url("hf://org/m@v1"), ("hf://org",))
    check_allowed(canonical_url("hf://org/m@v1"), ("hf://org/m",))
    check_allowed(canonical_url("hf://org/m@v1/sub"), ("hf://org/m@v1",))
    for url, allowed in (("hf://org/m@v2", "hf://org/m@v1"), ("hf://org/model", "hf://org/m"),
                         ("hf://other/m", "hf://org")):
        with pytest.raises(NotPermitted):
            check_allowed(canonical_url(url), (allowed,))


def test_a_files_git_blob_id_is_checked_like_an_lfs_sha256():
    digest = from_hf_info({"size": 13, "oid": git_blob_id(b'{"vocab": {}}')})
    assert digest is not None and digest.algorithm == "git-sha1"
    h = digest.hasher()
    h.update(b'{"vocab": ')
    h.update(memoryview(b"{}}"))
    assert h.hexdigest() == digest.expected


# --- fetching ------------------------------------------------------------------------------


def test_a_model_is_resolved_to_its_commit_listed_and_read_in_ranges(hf_config, hub, model):
    commit = hub.commit("org/model", files_of(model))
    snap = fetch(hf_config, "hf://org/model")
    assert_snapshot_is(snap.path, model)
    assert hub.log.count("API", "/revision/main") == 1
    assert hub.log.count("API", f"/tree/{commit}") >= 2  # pages of 3 entries
    shards = [rel for rel in files_of(model) if rel.endswith(".safetensors")]
    # the LFS files: a redirect from the hub, then ranged GETs at the CDN
    assert hub.log.count("REDIRECT") >= len(shards)
    assert hub.cdn.log.count("GET") > len(shards)
    assert hub.cdn.log.bytes_served() == sum(files_of(model)[s].stat().st_size for s in shards)
    # side files come from the hub itself
    assert hub.log.bytes_served("config.json") > 0


def test_a_new_commit_reads_only_the_files_it_changed(hf_config, hub, model):
    hub.commit("org/model", files_of(model))
    first = fetch(hf_config, "hf://org/model")
    hub.cdn.log.reset()
    hub.commit("org/model", {"config.json": b'{"changed": true}'})
    second = fetch(hf_config, "hf://org/model")
    assert hub.cdn.log.bytes_served() == 0  # the shards' sha256 did not change
    assert second.stats.bytes_fetched == len(b'{"changed": true}')
    assert (Path(second.path) / "config.json").read_bytes() == b'{"changed": true}'
    assert second.name == first.name


def test_a_revision_is_a_model_of_its_own(hf_config, hub, model):
    old = hub.commit("org/model", files_of(model))
    hub.tag("org/model", "v1", old)
    hub.commit("org/model", {"config.json": b'{"new": 1}'})
    main = fetch(hf_config, "hf://org/model")
    v1 = fetch(hf_config, "hf://org/model@v1")
    pinned = fetch(hf_config, f"hf://org/model@{old}")
    assert (Path(main.path) / "config.json").read_bytes() == b'{"new": 1}'
    assert_snapshot_is(v1.path, model)
    assert_snapshot_is(pinned.path, model)
    assert len({main.name, v1.name, pinned.name}) == 3
    assert fetch(hf_config, "hf://org/model@main").name == main.name
    with pytest.raises(SourceNotFound, match="no revision 'v9'"):
        fetch(hf_config, "hf://org/model@v9")
    with pytest.raises(SourceNotFound, match="no repository org/absent"):
        fetch(hf_config, "hf://org/absent")


def test_a_single_file_and_an_index_json_reference(hf_config, hub, model):
    hub.commit("org/model", {f"sub/{k}": v for k, v in files_of(model).items()})
    one = fetch(hf_config, "hf://org/model/sub/model-00001-of-00002.safetensors")
    assert [f.relpath for f in one.files] == ["model-00001-of-00002.safetensors"]
    index = fetch(hf_config, "hf://org/model/sub/model.safetensors.index.json")
    assert {f.relpath for f in index.files} == set(files_of(model))


def test_bytes_that_are_not_the_lfs_sha256_are_integrity_error(hf_config, hub, model):
    hub.commit("org/model", files_of(model))
    blob = next((hub.root / "cdn" / "lfs").iterdir())
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # the right size, the last byte flipped
    os.unlink(blob)
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        fetch(hf_config, "hf://org/model")
    cache = hf_config.cache_dir
    assert not os.listdir(cache / "tmp")
    assert [p.name for p in (cache / "snapshots").iterdir()] == [".revs"]


def test_a_redirect_to_a_host_that_is_not_the_hubs_is_refused(config, hub, model):
    hub.commit("org/model", files_of(model))
    cfg = config.replace(hf_endpoint=hub.url)  # the CDN's host is not in hf_download_hosts
    with pytest.raises(NotPermitted, match=f"redirected to http://{hub.cdn_host}.*"
                                           "hf_download_hosts"):
        fetch(cfg, "hf://org/model")
    assert hub.cdn.log.count() == 0  # refused before it was asked


def test_the_token_goes_to_the_hub_only_and_is_never_logged(hf_config, hub, model,
                                                            monkeypatch, caplog):
    hub.commit("org/private", files_of(model), private=True)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceNotFound, match="set HF_TOKEN"):
        fetch(hf_config, "hf://org/private")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_0000000000")
    with pytest.raises(SourceNotFound, match="a token was sent") as wrong:
        fetch(hf_config, "hf://org/private")
    assert "hf_wrong_token" not in str(wrong.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    snap = fetch(hf_config, "hf://org/private")
    assert_snapshot_is(snap.path, model)
    assert hub.cdn.log.count("GET") > 0
    assert hub.cdn.log.header_names["authorization"] == 0  # never sent off the hub
    assert TOKEN not in caplog.text and "hf_wrong_token" not in caplog.text


def test_the_token_file_of_huggingface_cli_login_is_read(hf_config, hub, model, monkeypatch,
                                                         tmp_path):
    hub.commit("org/private", files_of(model), private=True)
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert_snapshot_is(fetch(hf_config, "hf://org/private").path, model)


def test_a_429_with_retry_after_is_waited_for_at_the_hub_and_the_cdn(hf_config, hub, model):
    hub.commit("org/model", files_of(model))
    asked: dict[str, list[float]] = {"hub": [], "cdn": []}
    lock = threading.Lock()

    def once(where: str, match: str):  # type: ignore[no-untyped-def]
        def hook(method: str, path: str) -> Fault | None:
            if match not in path:
                return None
            with lock:
                asked[where].append(time.monotonic())
                first = len(asked[where]) == 1
            return Fault(429, (("Retry-After", "1"),)) if first else None
        return hook

    hub.set_fault(once("hub", "/revision/"))
    hub.cdn.set_fault(once("cdn", "/lfs/"))
    # one read at a time: the CDN's second GET is the retry of its first
    snap = fetch(hf_config.replace(concurrency=1, max_parallel_files=1), "hf://org/model")
    assert_snapshot_is(snap.path, model)
    for where, times in asked.items():
        assert len(times) >= 2, where
        assert times[1] - times[0] >= 0.95, (where, times)


def test_the_fake_hub_speaks_what_huggingface_hub_expects(hub, model, tmp_path, monkeypatch):
    """The fake is checked against the real client, so that weightd is tested against
    the protocol huggingface_hub speaks, not against itself."""
    hf = pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    commit = hub.commit("org/model", files_of(model))
    api = hf.HfApi(endpoint=hub.url, token=False)
    assert api.model_info("org/model").sha == commit
    tree = {e.path: e for e in api.list_repo_tree("org/model", recursive=True)}
    shard = "model-00001-of-00002.safetensors"
    assert tree[shard].lfs is not None and tree[shard].lfs.sha256
    got = hf.hf_hub_download("org/model", shard, revision=commit, endpoint=hub.url,
                             cache_dir=str(tmp_path / "hf-cache"), token=False)
    assert hash_file(Path(got)) == hash_file(model / shard)
    got = hf.hf_hub_download("org/model", "config.json", endpoint=hub.url,
                             cache_dir=str(tmp_path / "hf-cache"), token=False)
    assert Path(got).read_bytes() == (model / "config.json").read_bytes()


def test_the_cli_fetches_from_the_hub_and_says_what_is_missing(hub, model, cache_dir):
    """What a person types: HF_ENDPOINT as with huggingface_hub, hosts by setting."""
    hub.commit("org/model", files_of(model))
    env = {"WEIGHTD_CACHE_DIR": str(cache_dir), "HF_ENDPOINT": hub.url,
           "WEIGHTD_HF_DOWNLOAD_HOSTS": hub.cdn_host}
    got = run_cli("fetch", "hf://org/model", env=env, check=True)
    assert_snapshot_is(got.stdout.strip(), model)
    missing = run_cli("fetch", "hf://org/absent", env=env)
    assert missing.returncode == 1, missing
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "no repository org/absent" in lines[0] \
        and "HF_TOKEN" in lines[0], missing.stderr
    refused = run_cli("fetch", "hf://org/model@v9", env={**env, "WEIGHTD_CACHE_DIR":
                                                        str(cache_dir / "2")})
    assert refused.returncode == 1 and "no revision 'v9'" in refused.stderr, refused.stderr
