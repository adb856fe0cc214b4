"""HTTP sources through a forward proxy (how a node routes them through Dragonfly's
dfdaemon or a corporate proxy): the ``http_proxy`` setting and the environment's
``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY``, absolute-URI requests for ``http://``,
``CONNECT`` tunnels for ``https://`` with ``http_ca_bundle``, and ``allowed_sources``
still applied to the origins. A real proxy on 127.0.0.1 (weightd.testing.ForwardProxy)
counts what it relays; the origins count what they serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightd.config import Config
from weightd.errors import NotPermitted, SourceUnavailable
from weightd.store import Fetcher, Store, hash_file
from weightd.testing import ForwardProxy, RangeHTTPServer, write_synthetic_model
from weightd.testing.tls import make_tls

MiB = 1024 * 1024


def fetch(config: Config, ref: str):  # type: ignore[no-untyped-def]
    with Store.open(config.cache_dir) as store:
        return Fetcher(store, config).fetch(ref)


@pytest.fixture
def model(http_root: Path) -> Path:
    d = http_root / "org" / "m"
    write_synthetic_model(d, total_bytes=2 * MiB, tensors=8, shards=2, seed=3)
    return d


@pytest.fixture
def proxy():  # type: ignore[no-untyped-def]
    with ForwardProxy() as p:
        yield p


def assert_same_files(snapshot: str, model: Path) -> None:
    for f in model.iterdir():
        assert hash_file(Path(snapshot) / f.name) == hash_file(f), f.name


def origin_target(server: RangeHTTPServer) -> str:
    return server.url.split("://", 1)[1]


def test_every_request_to_an_http_origin_goes_through_the_http_proxy_setting(
        config, http_server, model, proxy):
    url = f"{http_server.url}/org/m"
    # allowed_sources names the origin only: the proxy is not a hop that must be allowed
    cfg = config.replace(http_proxy=proxy.url, allowed_sources=(url,), chunk_size=256 * 1024)
    snap = fetch(cfg, url)
    assert_same_files(snap.path, model)
    served = http_server.log.count()
    relayed = proxy.log.count(target=origin_target(http_server))
    assert relayed == served and proxy.log.count("GET") >= 8, (relayed, served)
    assert proxy.log.count() == relayed  # nothing else went through it


def test_the_environments_http_proxy_is_honoured_and_no_proxy_goes_direct(
        config, http_server, model, proxy, monkeypatch):
    url = f"{http_server.url}/org/m"
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    fetch(config, url)
    assert proxy.log.count(target=origin_target(http_server)) == http_server.log.count() > 0
    proxy.log.requests.clear()
    http_server.log.reset()
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    fetch(config.replace(cache_dir=config.cache_dir / "2"), url)
    assert http_server.log.count("GET") > 0 and proxy.log.count() == 0


def test_an_https_origin_is_tunnelled_with_connect_and_trusts_http_ca_bundle(
        config, http_root, model, proxy, tmp_path):
    ca, server_tls = make_tls(tmp_path / "tls")
    with RangeHTTPServer(http_root, tls=server_tls) as origin:
        url = f"{origin.url}/org/m"
        cfg = config.replace(http_proxy=proxy.url, http_ca_bundle=ca, chunk_size=256 * 1024)
        # the wire's reads go through CONNECT; so do the listing's (aiohttp)
        snap = fetch(cfg, url)
        assert_same_files(snap.path, model)
        assert proxy.log.count("CONNECT", origin_target(origin)) >= 1
        assert proxy.log.count() == proxy.log.count("CONNECT")  # no plain request for it
        assert origin.log.count("GET") >= 8
        # without the CA the origin's certificate is refused, through the proxy or not
        for extra in ({"http_proxy": proxy.url}, {}):
            with pytest.raises(SourceUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
                fetch(config.replace(cache_dir=tmp_path / f"c{len(extra)}", retry_attempts=1,
                                     **extra), url)


def test_a_redirect_out_of_allowed_sources_is_refused_through_the_proxy(
        config, http_server, model, proxy, http_root, tmp_path):
    other = tmp_path / "other"
    write_synthetic_model(other / "org" / "m", total_bytes=MiB, tensors=4, seed=9)
    with RangeHTTPServer(other) as elsewhere:
        http_server.set_redirect(
            lambda m, p: f"{elsewhere.url}{p}" if p.endswith(".safetensors") and m == "GET"
            else None)
        url = f"{http_server.url}/org/m"
        cfg = config.replace(http_proxy=proxy.url, allowed_sources=(url,))
        with pytest.raises(NotPermitted, match="not under any of allowed_sources"):
            fetch(cfg, url)
        assert proxy.log.count(target=origin_target(elsewhere)) == 0
        assert elsewhere.log.count() == 0


def test_proxy_credentials_from_the_setting_are_sent_and_never_shown(
        config, http_server, model, tmp_path):
    with ForwardProxy(auth=("node", "s3cret")) as proxy:
        url = f"{http_server.url}/org/m"
        cfg = config.replace(http_proxy=f"http://node:s3cret@127.0.0.1:{proxy.port}")
        assert "s3cret" not in repr(cfg)
        fetch(cfg, url)
        assert proxy.log.refused == 0 and proxy.log.count("GET") > 0
        with pytest.raises(SourceUnavailable) as info:
            fetch(cfg.replace(cache_dir=tmp_path / "c2", retry_attempts=1,
                              http_proxy=f"http://node:wrong@127.0.0.1:{proxy.port}"), url)
        assert "wrong" not in str(info.value)


def test_a_proxy_that_is_down_is_named_in_the_error(config, http_server, model):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: refuses connections
        port = s.getsockname()[1]
        cfg = config.replace(http_proxy=f"http://127.0.0.1:{port}", retry_attempts=1)
        with pytest.raises(SourceUnavailable, match=f"127.0.0.1:{port}"):
            fetch(cfg, f"{http_server.url}/org/m")
    assert http_server.log.count() == 0
