"""One name per setting across TOML, environment and flags; flags > env > file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from weightd.config import Config, ConfigError, load_config, parse_size


def test_defaults_follow_xdg(tmp_path):
    cfg = load_config(environ={"XDG_CACHE_HOME": str(tmp_path)})
    assert isinstance(cfg, Config)


def test_default_cache_dir_is_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert load_config().cache_dir == tmp_path / "c" / "weightd"


def test_precedence_flags_over_env_over_file(tmp_path):
    toml = tmp_path / "w.toml"
    toml.write_text('cache_dir = "/from/file"\nchunk_size = "8MiB"\nconcurrency = 3\n')
    env = {"WEIGHTD_CACHE_DIR": "/from/env"}
    cfg = load_config(toml, environ=env)
    assert cfg.cache_dir == Path("/from/env")
    assert cfg.chunk_size == 8 * 1024 * 1024 and cfg.concurrency == 3
    cfg = load_config(toml, environ=env, overrides={"cache_dir": "/from/flag", "concurrency": None})
    assert cfg.cache_dir == Path("/from/flag") and cfg.concurrency == 3


@pytest.mark.parametrize("text,message", [
    ("cache_dirr = '/x'", "unknown setting 'cache_dirr'"),
    ("chunk_size = 'lots'", "chunk_size: not a size"),
    ("concurrency = 0", "concurrency must be 1..256"),
    ("load_workers = 0", "load_workers must be 1..256"),
    # a setting that was split says what replaced it
    ("cold_workers = 4", "'cold_workers' is now fetch_workers and load_workers"),
    ("cache_dir = ", "cannot read config"),
])
def test_bad_config_files_are_refused(tmp_path, text, message):
    toml = tmp_path / "w.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(toml, environ={})


def test_unknown_environment_variable_is_refused():
    with pytest.raises(ConfigError, match="environment: unknown setting 'cahce_dir'"):
        load_config(environ={"WEIGHTD_CAHCE_DIR": "/x"})


def test_lists_from_env_and_file(tmp_path):
    cfg = load_config(environ={"WEIGHTD_ALLOWED_SOURCES": "s3://a, file:///b"})
    assert cfg.allowed_sources == ("s3://a", "file:///b")
    toml = tmp_path / "w.toml"
    toml.write_text('allowed_sources = ["s3://x"]')
    assert load_config(toml, environ={}).allowed_sources == ("s3://x",)


@pytest.mark.parametrize("text,value", [("1", 1), ("64MiB", 64 << 20), ("2GB", 2 * 10**9),
                                        ("1.5GiB", 3 << 29), ("10 kib", 10240)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1XB", "MiB", "1.2.3"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_cli_flag_env_and_file_use_one_name(tmp_path):
    toml = tmp_path / "w.toml"
    toml.write_text(f'cache_dir = "{tmp_path / "file-cache"}"\n')
    run_cli("--config", str(toml), "ls", check=True)
    assert (tmp_path / "file-cache" / "index.sqlite3").exists()
    run_cli("--config", str(toml), "ls", env={"WEIGHTD_CACHE_DIR": str(tmp_path / "env-cache")},
            check=True)
    assert (tmp_path / "env-cache" / "index.sqlite3").exists()
    run_cli("--config", str(toml), "--cache-dir", str(tmp_path / "flag-cache"), "ls",
            env={"WEIGHTD_CACHE_DIR": str(tmp_path / "env-cache")}, check=True)
    assert (tmp_path / "flag-cache" / "index.sqlite3").exists()
    bad = run_cli("--cache-dir", str(tmp_path), "--concurrency", "999", "ls")
    assert bad.returncode == 2 and "concurrency must be 1..256" in bad.stderr


@pytest.mark.parametrize("env,message", [
    ({"WEIGHTD_MIRRORS": "http://minio:9000/b"}, "not an s3://bucket/prefix URL"),
    ({"WEIGHTD_MIRRORS": "s3://a/x,s3://b/y"}, "one mirror is supported"),
    ({"WEIGHTD_MIRROR_ACCESS_KEY_ID": "k"}, "go together"),
    ({"WEIGHTD_MIRROR_ACCESS_KEY_ID": "k", "WEIGHTD_MIRROR_SECRET_ACCESS_KEY": "s",
      "WEIGHTD_MIRROR_PROFILE": "p"}, "not both"),
    ({"WEIGHTD_MIRROR_WAIT": "soon"}, "not a duration"),
    ({"WEIGHTD_HTTP_PROXY": "https://proxy:3128"}, "not a proxy URL"),
    ({"WEIGHTD_HTTP_PROXY": "socks5://proxy:1080"}, "not a proxy URL"),
])
def test_bad_mirror_and_proxy_settings_are_refused(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ=env)


def test_mirror_and_proxy_settings_have_one_name_and_keep_their_secrets(tmp_path):
    toml = tmp_path / "w.toml"
    toml.write_text('mirrors = ["s3://weights/cluster-a/"]\nmirror_wait = "2m"\n')
    cfg = load_config(toml, environ={
        "WEIGHTD_MIRROR_ENDPOINT_URL": "http://minio:9000",
        "WEIGHTD_MIRROR_ACCESS_KEY_ID": "AKIDMIRROR", "WEIGHTD_MIRROR_SECRET_ACCESS_KEY": "sec",
        "WEIGHTD_HTTP_PROXY": "http://node:pw@127.0.0.1:65001"},
        overrides={"mirror_lock_timeout": "30s"})
    assert cfg.mirrors == ("s3://weights/cluster-a",) and cfg.mirror_wait == 120.0
    assert cfg.mirror_endpoint_url == "http://minio:9000" and cfg.mirror_lock_timeout == 30.0
    text = repr(cfg)
    assert "AKIDMIRROR" in text and "sec'" not in text and "pw@" not in text
    bad = run_cli("--mirror-timeout", "never", "ls")
    assert bad.returncode == 2 and "mirror-timeout" in bad.stderr and "not a duration" in bad.stderr
