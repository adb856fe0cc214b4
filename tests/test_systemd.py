"""systemd/: the unit, sysusers and tmpfiles files, the example config, and the daemon's
sd_notify protocol (READY=1 only once the socket answers; STOPPING=1 on SIGTERM).

The files are checked with systemd's own tools where they are installed (systemd-analyze
verify, systemd-sysusers, systemd-tmpfiles) and by a small parser of their syntax that
always runs. systemd 252 (Debian 12) has ``systemd-sysusers --dry-run`` but no
``systemd-tmpfiles --dry-run`` (that came in 256): the tmpfiles file is applied for real
under ``--root`` of a temporary directory instead, after sysusers created the user there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from weightd.config import env_values, load_config, settings
from weightd_client._proto.weightd.v1 import weightd_pb2 as pb
from weightd_client._proto.weightd.v1 import weightd_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "weightd.service"
SYSUSERS = SYSTEMD / "weightd.sysusers"
TMPFILES = SYSTEMD / "weightd.tmpfiles"
EXAMPLE = SYSTEMD / "weightd.toml"


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (it comes with systemd)")
    return path


def need_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


def tool_env() -> dict[str, str]:
    return {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0",
            "SYSTEMD_PAGER": "", "LC_ALL": "C"}


# --- the unit -----------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Key`` → every value it is given in the unit (``[Section]`` headers dropped)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def weightd_executable() -> str:
    """The weightd this test runs under: the venv's console script, else the module."""
    script = Path(sys.executable).parent / "weightd"
    if script.exists():
        return str(script)
    found = shutil.which("weightd")
    return found if found else f"{sys.executable} -m weightd.cli"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = need("systemd-analyze")
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/weightd " in text
    # verify checks that ExecStart's program exists: point it at the weightd under test.
    copy = tmp_path / "weightd.service"
    copy.write_text(text.replace("/usr/bin/weightd", weightd_executable()))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                          env=tool_env(), timeout=120)
    output = proc.stdout + proc.stderr
    # Lines about other units of this host (missing dependencies of the host's own
    # units, …) are not ours; every line that names our unit is a finding.
    ours = [ln for ln in output.splitlines() if "weightd.service" in ln or str(tmp_path) in ln]
    assert not ours, "systemd-analyze verify complains about the unit:\n" + "\n".join(ours)
    assert proc.returncode == 0, output


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key is reported with the unit's name."""
    analyze = need("systemd-analyze")
    copy = tmp_path / "weightd.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/weightd", weightd_executable())
                    .replace("NotifyAccess=main", "NotifyAcces=main"))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                          env=tool_env(), timeout=120)
    assert "NotifyAcces" in proc.stdout + proc.stderr
    assert "weightd.service" in proc.stdout + proc.stderr


def test_unit_directives() -> None:
    d = unit_directives(UNIT.read_text())

    def one(key: str) -> str:
        assert len(d.get(key, [])) == 1, f"{key}: {d.get(key)}"
        return d[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == "/usr/bin/weightd --config /etc/weightd/weightd.toml serve"
    assert one("User") == one("Group") == "weightd"
    assert one("RuntimeDirectory") == "weightd" and one("RuntimeDirectoryMode") == "0750"
    assert one("CacheDirectory") == "weightd"
    assert one("LimitMEMLOCK") == "infinity"
    assert one("Restart") == "on-failure"
    assert one("UMask") == "0007"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictNamespaces",
                "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID"):
        assert one(key) == "yes", key
    assert one("ProtectSystem") == "strict"
    assert one("SystemCallArchitectures") == "native"
    assert one("DevicePolicy") == "closed"
    allowed = d["DeviceAllow"]
    for dev in ("char-nvidia-frontend rw", "char-nvidia-uvm rw", "/dev/nvidiactl rw",
                "/dev/nvidia-uvm rw", "/dev/nvidia-uvm-tools rw"):
        assert dev in allowed
    # GPUs need the real /dev; CUDA's JIT and cupy need W+X memory; the lease reaper
    # needs to see client processes in /proc.
    for forbidden in ("PrivateDevices", "MemoryDenyWriteExecute", "ProtectProc", "PrivateIPC"):
        assert forbidden not in d, forbidden
    # The socket and cache the unit gives the daemon are the directories it creates.
    env = dict(e.split("=", 1) for e in d["Environment"])
    assert env["WEIGHTD_SOCKET"] == "/run/weightd/weightd.sock"
    assert env["WEIGHTD_CACHE_DIR"] == "/var/cache/weightd"
    # Every WEIGHTD_* the unit sets is a setting, and goes with the example config.
    assert set(env_values(env)) <= set(settings())
    cfg = load_config(EXAMPLE, environ=env)
    assert str(cfg.socket) == "/run/weightd/weightd.sock"
    assert str(cfg.cache_dir) == "/var/cache/weightd"


# --- sysusers and tmpfiles -------------------------------------------------------------


def config_lines(path: Path) -> list[list[str]]:
    """The non-comment lines of a sysusers.d / tmpfiles.d file, split into fields
    (double quotes group a field, as in both formats)."""
    out = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            out.append([f.strip('"') for f in re.findall(r'"[^"]*"|\S+', line)])
    return out


def test_sysusers_syntax() -> None:
    lines = config_lines(SYSUSERS)
    assert ["g", "weightd", "-"] in lines
    users = [f for f in lines if f[0] == "u"]
    assert users == [["u", "weightd", "-", "weightd model-weight daemon", "/var/cache/weightd"]]
    for fields in lines:
        assert fields[0] in ("u", "g", "m", "r"), fields
        assert re.fullmatch(r"[a-z_][a-z0-9_-]*", fields[1]), fields


def test_tmpfiles_syntax() -> None:
    lines = config_lines(TMPFILES)
    by_path = {f[1]: f for f in lines}
    assert by_path["/var/cache/weightd"] == ["d", "/var/cache/weightd", "0750", "weightd",
                                             "weightd", "-"]
    assert by_path["/etc/weightd"][:3] == ["d", "/etc/weightd", "0755"]
    known_users = {"root"} | {f[1] for f in config_lines(SYSUSERS) if f[0] in ("u", "g")}
    for fields in lines:
        kind, path, mode, user, group, age = fields[:6]
        assert kind in ("d", "D", "f", "L", "z", "Z"), fields
        assert path.startswith("/"), fields
        assert re.fullmatch(r"0[0-7]{3}", mode), fields
        assert user in known_users and group in known_users, fields
        # the cache is never aged out: weightd evicts by budget and knows about leases
        assert age == "-", fields


def test_sysusers_dry_run() -> None:
    tool = need("systemd-sysusers")
    proc = subprocess.run([tool, "--dry-run", str(SYSUSERS)], capture_output=True, text=True,
                          env=tool_env(), timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert str(SYSUSERS) not in output, output  # no complaint about a line of ours


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)  # sysusers writes etc/passwd, but not etc/ itself
    return root


def test_sysusers_and_tmpfiles_apply_to_a_fresh_root(fake_root: Path) -> None:
    sysusers = need("systemd-sysusers")
    tmpfiles = need("systemd-tmpfiles")
    need_root("systemd-tmpfiles chowns the cache to the weightd user")
    proc = subprocess.run([sysusers, f"--root={fake_root}", str(SYSUSERS)],
                          capture_output=True, text=True, env=tool_env(), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passwd = {ln.split(":")[0]: ln.split(":") for ln in
              (fake_root / "etc/passwd").read_text().splitlines()}
    group = {ln.split(":")[0]: ln.split(":") for ln in
             (fake_root / "etc/group").read_text().splitlines()}
    user = passwd["weightd"]
    assert user[4] == "weightd model-weight daemon" and user[5] == "/var/cache/weightd"
    assert user[6].endswith("nologin")
    assert user[3] == group["weightd"][2]  # primary group weightd

    proc = subprocess.run([tmpfiles, f"--root={fake_root}", "--create", str(TMPFILES)],
                          capture_output=True, text=True, env=tool_env(), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cache = (fake_root / "var/cache/weightd").stat()
    assert stat.S_ISDIR(cache.st_mode) and stat.S_IMODE(cache.st_mode) == 0o750
    assert (cache.st_uid, cache.st_gid) == (int(user[2]), int(user[3]))
    etc = (fake_root / "etc/weightd").stat()
    assert stat.S_IMODE(etc.st_mode) == 0o755 and etc.st_uid == 0


# --- the example config ----------------------------------------------------------------

_COMMENTED_SETTING = re.compile(r"^#\s?([a-z][a-z0-9_]* = .*)$")


def test_example_config_loads() -> None:
    cfg = load_config(EXAMPLE, environ={})
    assert cfg.allowed_sources == ("s3://models/", "/var/lib/models/")
    assert cfg.metrics_address == "127.0.0.1:9464"
    # the same places the unit gives the daemon, so that `weightd --config ... status`
    # run by an admin finds it
    env = dict(e.split("=", 1) for e in unit_directives(UNIT.read_text())["Environment"])
    assert str(cfg.socket) == env["WEIGHTD_SOCKET"]
    assert str(cfg.cache_dir) == env["WEIGHTD_CACHE_DIR"]


def test_example_config_documents_every_setting(tmp_path: Path) -> None:
    """Every setting appears, set or commented out; the commented values are valid too."""
    text = EXAMPLE.read_text()
    active = set(tomllib.loads(text))
    uncommented = "\n".join(
        m.group(1) if (m := _COMMENTED_SETTING.match(line)) else line
        for line in text.splitlines())
    documented = set(tomllib.loads(uncommented))
    assert documented - active, "no commented-out settings found: check the pattern"
    assert documented == set(settings()), (
        f"missing from systemd/weightd.toml: {sorted(set(settings()) - documented)}; "
        f"unknown: {sorted(documented - set(settings()))}")
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    load_config(path, environ={})


# --- sd_notify: READY=1 means the socket answers ------------------------------------------


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket that collects the messages."""

    def __init__(self, directory: Path) -> None:
        # AF_UNIX paths are limited to 107 bytes: use a short directory if tmp_path is long.
        if len(str(directory / "notify")) > 100:
            directory = Path(tempfile.mkdtemp(prefix="wd-"))
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.received: list[str] = []

    def wait_for(self, message: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
        """Receive until ``message`` (e.g. READY=1) arrives; fail on timeout or if the
        process dies first."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {message} within {timeout}s; got {self.received}")
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"daemon exited with {proc.returncode} before {message}; "
                        f"got {self.received}") from None
                continue
            lines = data.decode().splitlines()
            self.received.extend(lines)
            if message in lines:
                return

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def test_ready_only_when_the_socket_answers_and_stopping_on_sigterm(tmp_path: Path) -> None:
    sock_path = tmp_path / "run" / "weightd" / "weightd.sock"
    notify = NotifySocket(tmp_path)
    log_path = tmp_path / "daemon.log"
    env = {**os.environ, "WEIGHTD_SOCKET": str(sock_path),
           "WEIGHTD_CACHE_DIR": str(tmp_path / "cache"), "NOTIFY_SOCKET": str(notify.path)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "weightd.cli", "serve"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            notify.wait_for("READY=1", proc, timeout=60)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{log_path.read_text(errors='replace')}") from None
        assert "STOPPING=1" not in notify.received
        # The property systemd relies on: at READY=1 the socket already takes calls. One
        # call, no retry, no sleep: it must succeed.
        with grpc.insecure_channel(f"unix://{sock_path}") as channel:
            status = pb_grpc.WeightdStub(channel).Status(pb.StatusRequest(), timeout=5)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
        assert isinstance(status, pb.StatusResponse)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", proc, timeout=30)
        assert proc.wait(timeout=30) == 0, log_path.read_text(errors="replace")
        assert not sock_path.exists()
        assert notify.received.count("READY=1") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()
