"""The ``weightd`` command as a person meets it: every ``--help``, every documented
mistake, ``status`` and ``ls``, through the installed entry point in a subprocess.

A user's mistake gets exactly one line on stderr, no traceback, and a documented exit
code: 2 for usage and configuration errors, 1 for an operation that failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess
from weightd.cli import build_parser
from weightd.leases import process_start_time
from weightd.testing import MotoS3Server, write_synthetic_model
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

MiB = 1024 * 1024

#: The entry point pip installed next to this interpreter: what a user types.
WEIGHTD = Path(sys.executable).with_name("weightd")


def weightd(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``weightd ARGS``; ``env`` is the whole environment (default:
    this process's)."""
    if not WEIGHTD.exists():
        pytest.fail(f"{WEIGHTD} is missing: the package is not installed in this venv "
                    "(make venv)")
    return subprocess.run([str(WEIGHTD), *args], capture_output=True, text=True,
                          env=dict(os.environ) if env is None else env, timeout=timeout)


def one_error_line(res: subprocess.CompletedProcess[str], code: int) -> str:
    """The single stderr line of a command that must fail with ``code``."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == code, f"exit {res.returncode}, not {code}:\n{res.stderr}"
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{res.stderr}"
    assert lines[0].startswith("weightd"), lines[0]
    return lines[0]


def _daemon_env(d: DaemonProcess) -> dict[str, str]:
    return {**os.environ, "WEIGHTD_SOCKET": str(d.socket), "WEIGHTD_CACHE_DIR": str(d.cache_dir)}


def subcommands() -> list[str]:
    """Every subcommand of the real parser: a new one is covered without a new test."""
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return sorted(actions[0].choices)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections: bound (so nothing else takes it during
    the test) but not listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path)
    yield d
    assert d.stop() == 0, d.log()


# help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["", *subcommands()])
def test_every_command_prints_its_help(command: str) -> None:
    res = weightd(*([command] if command else []), "--help")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and res.stderr == ""
    assert res.stdout.startswith(f"usage: weightd {command}".rstrip()), res.stdout[:200]


def test_help_writes_defaults_as_the_settings_take_them() -> None:
    # "(default: ('hf.co', ...))" and "64.0 MiB" where the flags take "a,b" and "64MiB"
    out = " ".join(weightd("--help").stdout.split())
    assert "--hf-download-hosts LIST" in out and "('" not in out, out
    assert "(default: hf.co,*.hf.co,huggingface.co,*.huggingface.co)" in out, out
    assert "--staging-buffer-size SIZE bytes per pinned staging buffer (default: 64MiB)" in out
    assert "64.0 MiB" not in out


def test_help_and_readme_say_verify_and_gc_run_through_the_daemon() -> None:
    # they did need the daemon stopped once; since issue 13 they run through it, for
    # root or the daemon's user, and the help and the README said otherwise (review 1, G2)
    out = " ".join(weightd("--help").stdout.split())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for text in (out, readme):
        assert "daemon stopped" not in text
    for command in ("verify", "gc"):
        line = re.search(rf"\b{command} (.*?\)) ", out)
        assert line and "through the daemon" in line[1] and "root or the daemon's user" in \
            line[1], out
    assert re.search(r"`weightd verify`.*\| either \|", readme), readme


def test_help_names_the_defaults_the_metrics_setting_and_the_exit_codes(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "c"),
           "XDG_RUNTIME_DIR": str(tmp_path / "r")}
    out = " ".join(weightd("--help", env=env).stdout.split())  # argparse wraps lines
    assert str(tmp_path / "c" / "weightd") in out
    assert str(tmp_path / "r" / "weightd.sock") in out
    assert "--metrics-address" in out and "WEIGHTD_METRICS_ADDRESS" in out
    assert "exit codes" in out.lower() and "2" in out and "1" in out


# a source that cannot be reached, read or named ------------------------------------------


def test_a_source_that_refuses_the_connection_says_so(refused_port: int) -> None:
    res = weightd("fetch", f"http://127.0.0.1:{refused_port}/org/model")
    line = one_error_line(res, 1)
    assert f"cannot connect to 127.0.0.1:{refused_port}: connection refused" in line
    assert "no files" not in line


def test_a_source_host_that_does_not_resolve_says_so() -> None:
    # .invalid never resolves (RFC 2606): no query leaves a resolver that knows it
    res = weightd("fetch", "http://weightd-test.invalid/org/model")
    line = one_error_line(res, 1)
    assert "cannot resolve" in line and "weightd-test.invalid" in line
    assert "no files" not in line


def test_an_unknown_protocol_lists_the_protocols_there_are() -> None:
    line = one_error_line(weightd("fetch", "nosuch://bucket/model"), 1)
    assert "unknown protocol 'nosuch'" in line
    for protocol in ("s3", "http", "https", "file"):
        assert re.search(rf"\b{protocol}\b", line), line


def test_s3_without_credentials_names_the_ways_to_give_them(s3: MotoS3Server,
                                                            tmp_path: Path) -> None:
    write_synthetic_model(tmp_path / "m", total_bytes=MiB, tensors=4)
    url = s3.upload_dir(tmp_path / "m", "nocreds", "m")  # it is there: only the keys lack
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ENDPOINT_URL=s3.endpoint_url, AWS_CONFIG_FILE=str(empty),
               AWS_SHARED_CREDENTIALS_FILE=str(empty), AWS_EC2_METADATA_DISABLED="true")
    line = one_error_line(weightd("fetch", url, env=env), 1)
    assert "credentials" in line
    for way in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "s3_endpoint_url"):
        assert way in line, line


# configuration and usage mistakes: exit 2 -------------------------------------------------


def test_a_metrics_port_in_use_is_one_line_and_leaves_no_socket(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "weightd.sock"
    env = {**os.environ, "WEIGHTD_SOCKET": str(sock), "WEIGHTD_CACHE_DIR": str(tmp_path / "c")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = weightd("serve", "--metrics-address", f"127.0.0.1:{port}", env=env)
    line = one_error_line(res, 2)
    assert f"127.0.0.1:{port}" in line and "in use" in line and "metrics_address" in line
    assert not sock.exists() and not sock.is_socket()


@pytest.mark.parametrize("length", [104, 110])
def test_a_socket_path_too_long_for_unix_sockets_is_one_line_and_exit_2(
        tmp_path: Path, length: int) -> None:
    # 104 bytes: the gRPC socket would fit, its credential socket (".cred" more) not
    base = tmp_path / "run"
    sock = base / ("x" * (length - len(f"{base}//weightd.sock"))) / "weightd.sock"
    assert len(str(sock)) == length
    env = {**os.environ, "WEIGHTD_CACHE_DIR": str(tmp_path / "c")}
    line = one_error_line(weightd("--socket", str(sock), "serve", env=env), 2)
    assert str(sock) in line and "107 bytes" in line, line
    assert not (tmp_path / "c").exists() and not sock.parent.exists()  # nothing done


@pytest.mark.parametrize("args,expect", [
    (("gc", "--max-bytes", "1x"), "not a size: '1x'"),
    (("ls", "--host-budget", "lots"), "not a size: 'lots'"),
    (("status", "--gpu-budget", "150%"), "at most 100%"),
    (("status", "--gpu-budget", "most%"), "not a share: 'most%'"),
    (("ls", "--retry-max-seconds", "soon"), "not a duration: 'soon'"),
    (("ls", "--concurrency", "many"), "not an integer: 'many'"),
    (("gc",), "--max-bytes"),
    (("frobnicate",), "invalid choice"),
])
def test_a_bad_value_or_usage_is_one_line_and_exit_2(args: tuple[str, ...], expect: str) -> None:
    line = one_error_line(weightd(*args), 2)
    assert expect in line, line


def test_a_bad_setting_in_the_environment_is_one_line_and_exit_2() -> None:
    env = {**os.environ, "WEIGHTD_DISK_BUDGET": "1x"}
    assert "not a size: '1x'" in one_error_line(weightd("ls", env=env), 2)


def test_no_daemon_is_one_line_and_exit_1(tmp_path: Path) -> None:
    env = {**os.environ, "WEIGHTD_SOCKET": str(tmp_path / "none.sock")}
    line = one_error_line(weightd("status", env=env), 1)
    assert "none.sock" in line and "weightd serve" in line


# pin: by the name `weightd ls` prints; nothing pinned when the reference resolves to nothing


def _pins_in_index(cache_dir: Path) -> list[tuple[str, ...]]:
    with sqlite3.connect(cache_dir / "index.sqlite3") as db:
        return db.execute("SELECT * FROM pins").fetchall()


def test_pin_of_a_reference_that_resolves_to_nothing_fails_at_once_and_pins_nothing(
        daemon: DaemonProcess, tmp_path: Path, refused_port: int) -> None:
    env = _daemon_env(daemon)
    missing = tmp_path / "no-such-model"
    line = one_error_line(weightd("pin", str(missing), env=env), 1)
    assert str(missing) in line and "not found" in line
    line = one_error_line(weightd("pin", f"http://127.0.0.1:{refused_port}/m", env=env), 1)
    assert "connection refused" in line
    status = weightd("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "0 pins" in status.stdout and "no-such-model" not in status.stdout
    assert daemon.stop() == 0
    assert _pins_in_index(daemon.cache_dir) == []


def test_a_model_name_that_names_nothing_is_an_error_not_success(daemon: DaemonProcess,
                                                                   tmp_path: Path) -> None:
    # `weightd evict nosuch-model` printed "freed 0 B" and exited 0 (a typo looked like
    # success); `weightd pin nosuchname` spoke of file://<cwd>/nosuchname (review 1, nits)
    env = _daemon_env(daemon)
    for command in ("evict", "pin", "unpin"):
        res = subprocess.run([str(WEIGHTD), command, "nosuch-model"], capture_output=True,
                             text=True, env=env, cwd=tmp_path, timeout=60)
        line = one_error_line(res, 1)
        assert "nosuch-model: not found: no model of that name is cached" in line, line
        assert "file://" not in line, line


def test_evicting_a_model_that_is_not_resident_says_so(daemon: DaemonProcess,
                                                      tmp_path: Path) -> None:
    # a cached model that is not in host memory printed "freed 0 B" and exited 0, as if
    # the eviction had worked (as `unpin` of a model not pinned says so, and exits 1)
    env = _daemon_env(daemon)
    write_synthetic_model(tmp_path / "src" / "cold", total_bytes=2 * MiB, tensors=4)
    assert weightd("fetch", str(tmp_path / "src" / "cold"), env=env).returncode == 0
    name = weightd("ls", env=env).stdout.splitlines()[1].split()[0]
    line = one_error_line(weightd("evict", name, env=env), 1)
    assert line == f"weightd: {name} is not resident on the host tier: nothing to evict", line
    assert name in weightd("ls", env=env).stdout  # still cached


def test_pin_and_unpin_take_the_model_name_that_ls_prints(daemon: DaemonProcess,
                                                          tmp_path: Path) -> None:
    env = _daemon_env(daemon)
    write_synthetic_model(tmp_path / "src" / "tiny", total_bytes=2 * MiB, tensors=4)
    assert weightd("fetch", str(tmp_path / "src" / "tiny"), env=env).returncode == 0
    rows = weightd("ls", env=env).stdout.splitlines()[1:]
    name = rows[0].split()[0]
    assert "--tiny--" in name and "/" not in name
    other = tmp_path / "elsewhere"  # a name is not resolved against the working directory
    other.mkdir()
    res = subprocess.run([str(WEIGHTD), "pin", name], capture_output=True, text=True, env=env,
                         cwd=other, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"pinned {name}" in res.stderr
    pins = _pin_lines(weightd("status", env=env).stdout)
    assert len(pins) == 1 and name in pins[0], pins
    res = weightd("unpin", name, env=env)
    assert res.returncode == 0, res.stderr
    assert _pin_lines(weightd("status", env=env).stdout) == []


def _pin_lines(status: str) -> list[str]:
    return [line for line in status.splitlines() if line.strip().startswith("pin ")]


# one look at the node ---------------------------------------------------------------------


def test_status_lists_each_resident_model_with_size_pins_and_lease_holders(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    write_synthetic_model(tmp_path / "src" / "held", total_bytes=3 * MiB, tensors=4)
    source = str(tmp_path / "src" / "held")
    me = os.getpid()
    lease = daemon.stub().Acquire(pb.AcquireRequest(source=source, client=pb.ClientInfo(
        pid=me, start_time=process_start_time(me), name="replica-7")), timeout=60)
    daemon.stub().Pin(pb.PinRequest(source=source), timeout=10)
    out = weightd("status", env=_daemon_env(daemon)).stdout
    row = next(line for line in out.splitlines() if line.startswith(lease.model))
    assert re.search(r"\bhost\b", row) and "MiB" in row, row
    assert re.search(r"\bpinned\b", row) and re.search(r"\b1 lease\b", row), row
    holder = next(line for line in out.splitlines() if f"pid {me}" in line)
    assert "replica-7" in holder and re.search(r"age \d+s", holder), holder
    daemon.stub().Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=10)


def test_ls_has_a_header_and_the_same_columns_with_and_without_a_daemon(tmp_path: Path) -> None:
    write_synthetic_model(tmp_path / "src" / "m", total_bytes=2 * MiB, tensors=4)
    env = {**os.environ, "WEIGHTD_SOCKET": str(tmp_path / "run" / "weightd.sock"),
           "WEIGHTD_CACHE_DIR": str(tmp_path / "cache")}
    assert weightd("fetch", str(tmp_path / "src" / "m"), env=env).returncode == 0
    offline = weightd("ls", env=env).stdout.splitlines()
    with DaemonProcess(tmp_path):
        online = weightd("ls", env=env).stdout.splitlines()
    assert offline[0] == online[0] and offline[0].split()[:3] == ["MODEL", "FILES", "SIZE"]
    assert len(offline) == len(online) == 2

    def cells(row: str) -> list[str]:
        return re.sub(r"\s\d+s ago\s", " AGO ", row).split()  # (seconds apart)

    assert cells(offline[1]) == cells(online[1])  # cached, not resident: the same row
    assert "2.0 MiB" in offline[1] and re.search(r"\sok\s+disk\s+\d+s ago\s", offline[1]), offline
    _blobs(tmp_path / "cache")[0].unlink()  # a blob lost: both say so
    assert " broken " in weightd("ls", env=env).stdout
    with DaemonProcess(tmp_path):
        assert " broken " in weightd("ls", env=env).stdout


def test_ls_says_when_each_model_was_last_used(tmp_path: Path) -> None:
    # the order `weightd gc` evicts in (least recently used first) was nowhere to be seen
    import sqlite3

    write_synthetic_model(tmp_path / "src" / "m", total_bytes=2 * MiB, tensors=4)
    env = {**os.environ, "WEIGHTD_SOCKET": str(tmp_path / "run" / "weightd.sock"),
           "WEIGHTD_CACHE_DIR": str(tmp_path / "cache")}
    assert weightd("fetch", str(tmp_path / "src" / "m"), env=env).returncode == 0
    header, row = weightd("ls", env=env).stdout.splitlines()
    assert header.index("LAST USED") == row.index(re.search(r"\d+s ago", row)[0]), (header, row)
    with sqlite3.connect(tmp_path / "cache" / "index.sqlite3") as db:  # two days ago
        db.execute("UPDATE models SET last_used = last_used - 2 * 86400 - 60")
    assert " 2d ago " in weightd("ls", env=env).stdout.splitlines()[1]
    with DaemonProcess(tmp_path) as daemon:
        assert " 2d ago " in weightd("ls", env=env).stdout.splitlines()[1]
        me = os.getpid()
        lease = daemon.stub().Acquire(pb.AcquireRequest(
            source=str(tmp_path / "src" / "m"),
            client=pb.ClientInfo(pid=me, start_time=process_start_time(me))), timeout=60)
        # used now: the daemon says so before its index learns it
        assert re.search(r" \ds ago ", weightd("ls", env=env).stdout.splitlines()[1])
        daemon.stub().Release(pb.ReleaseRequest(lease_id=lease.lease_id), timeout=10)


# the daemon's log and the demo ------------------------------------------------------------


def _cuda_warnings(d: DaemonProcess) -> list[str]:
    return [line for line in d.log().splitlines() if "WARNING" in line and "cuda" in line]


def test_no_warning_about_cuda_that_nobody_asked_for(tmp_path: Path) -> None:
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("the cuda extra is installed: that is asking for CUDA")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    for home in ("unasked", "asked"):
        (tmp_path / home).mkdir()
    with DaemonProcess(tmp_path / "unasked", env=env) as d:
        problems = d.status().problems
        assert _cuda_warnings(d) == [], d.log()
    assert any(p.startswith("cuda tier:") for p in problems)  # Status still says it
    with DaemonProcess(tmp_path / "asked", env={**env, "CUDA_VISIBLE_DEVICES": "0"}) as d:
        assert len(_cuda_warnings(d)) == 1, d.log()


def _blobs(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "blobs").rglob("*") if p.is_file())


def test_the_demo_twice_the_second_a_warm_node_that_fetches_nothing(tmp_path: Path) -> None:
    # the demo on its defaults: this test's own XDG_CACHE_HOME and XDG_RUNTIME_DIR
    cmd = [sys.executable, "-m", "weightd.demo", "--replicas", "2", "--size", "8MiB"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "weightd"
    blobs = _blobs(cache)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    out = second.stdout
    for res in (first, second):
        assert "Traceback" not in res.stderr and "WARNING" not in res.stdout + res.stderr
        assert "0 warnings in its log" in res.stdout, res.stdout
    assert re.search(r"8\.0 MiB from the source in [\d.]+s \(1\.00 × the model\)", first.stdout)
    assert "/ 0 B" not in first.stdout + first.stderr  # a fetch too fast for a progress message
    assert "0 bytes from the source" in out and "8.0 MiB from the source" not in out
    assert len(re.findall(r"replica \d \(pid \d+\): .* ready in [\d.]+ ms", out)) == 2, out
    assert re.search(r"sum .* = \d+\.\d\d × the model \(8\.0 MiB\) for 2 replicas", out), out
    assert re.search(r"load_file.*\n\s+ready in [\d.]+ ms, .*; added .* = \d+\.\d\d × the "
                     r"model", out), out
    assert "the same bytes in every replica and the baseline" in out
    assert _blobs(cache) == blobs  # the same model: the cache does not grow
    log = re.search(r"its log: (\S+)", out)
    assert log and Path(log.group(1)).is_file()


# progress -----------------------------------------------------------------------------------

LONG = "s3://a-bucket-with-a-long-name/organisation/team/models/llama-3-70b-instruct-awq"


@pytest.mark.parametrize("width", [80, 132])
def test_a_progress_bar_fits_its_terminal_in_iec_units(width: int) -> None:
    import io

    from rich.console import Console

    from weightd.progress import RichProgress

    bar = RichProgress(LONG, console=Console(file=io.StringIO(), width=width))
    bar.set_size(300 * MiB)
    bar.relative_update(120 * MiB)
    bar.close()
    out = io.StringIO()
    Console(file=out, width=1000).print(bar.progress.make_tasks_table(bar.progress.tasks))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and len(lines[0].rstrip()) <= width, lines
    assert "120.0 MiB / 300.0 MiB" in lines[0] and "MB" not in lines[0].replace("MiB", "")
    assert "instruct-awq" in lines[0]  # the end of the name survives the shortening


def test_a_plain_progress_line_fits_80_columns() -> None:
    import io

    from weightd.progress import PlainProgress

    stream = io.StringIO()
    plain = PlainProgress(LONG, stream=stream, interval=0)
    plain.set_size(3 * 1024 * MiB)
    plain.relative_update(1024 * MiB)
    line = stream.getvalue().splitlines()[-1]
    assert len(line) <= 80 and "1.0 GiB / 3.0 GiB" in line and "instruct-awq" in line, line
