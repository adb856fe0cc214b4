"""Every test gets its own cache, socket directory and a clean environment
(huggingface_hub's ``patch_constants`` pattern); real servers on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from weightd.config import Config
from weightd.testing import MotoS3Server, RangeHTTPServer

REPO = Path(__file__).resolve().parent.parent


def isolate(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """A clean environment under ``home``: no WEIGHTD_* or AWS_* from outside, caches and
    the runtime directory of its own, fake S3 credentials, no Hub."""
    for key in list(os.environ):
        if key.startswith(("WEIGHTD_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))
    run = home / "run"
    run.mkdir(exist_ok=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    isolate(monkeypatch, tmp_path)
    yield


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def config(cache_dir: Path) -> Config:
    return Config(cache_dir=cache_dir)


@pytest.fixture
def http_root(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture
def http_server(http_root: Path) -> Iterator[RangeHTTPServer]:
    with RangeHTTPServer(http_root) as srv:
        yield srv


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    with MotoS3Server() as srv:
        yield srv


@pytest.fixture
def s3(s3_server: MotoS3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoS3Server]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    s3_server.log.reset()
    s3_server.set_fault(None)
    s3_server.set_body(None)
    yield s3_server
    s3_server.set_fault(None)
    s3_server.set_body(None)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``weightd ARGS`` as a separate process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "weightd.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"weightd {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc
