"""Who may talk to the daemon: the socket is 0660, so its owner and its group, nobody else.

These tests run client processes as other users, so they need root (to create the users
and to switch to them) and ``useradd``/``groupadd``; they skip, saying why, otherwise.
The other users run the system's Python 3.11 with the project's virtual environment
added as a site directory (the venv's own interpreter may live under ``/root``, which
other users cannot enter).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon import DaemonProcess

OUTSIDER = "weightd-test-other"
MEMBER = "weightd-test-member"
GROUP = "weightd-test-group"

#: What the other user's process runs: a raw connect() on the socket, then a weightd
#: client call. Prints one line: "<connect outcome> <client outcome>".
PROBE = r"""
import errno, os, site, socket, sys
sock_path, site_dir = sys.argv[1], sys.argv[2]
site.addsitedir(site_dir)
assert os.path.exists(sock_path), "the socket must be reachable by path"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sock_path)
    raw = "connected"
except PermissionError:
    raw = "EACCES"
except OSError as e:
    raw = errno.errorcode.get(e.errno, str(e.errno))
finally:
    s.close()
import weightd_client
try:
    with weightd_client.Client(sock_path, timeout=10) as c:
        out = "status-pid-%d" % c.status().pid
except weightd_client.errors.DaemonUnavailable:
    out = "DaemonUnavailable"
except Exception as e:
    out = type(e).__name__
print(raw, out)
"""


def _python_for_others() -> str:
    """An interpreter of the same version that other users can execute."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, os.path.realpath(sys.executable), f"/usr/bin/{want}",
                      f"/usr/local/bin/{want}"):
        if candidate and os.path.exists(candidate) and _world_reachable(candidate):
            return candidate
    pytest.skip(f"no {want} that other users can run (the venv's is under a private home)")


def _world_reachable(path: str) -> bool:
    p = Path(os.path.realpath(path))
    for parent in [*reversed(p.parents)]:
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(p).st_mode & stat.S_IXOTH)


def _ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    try:
        pwd.getpwnam(name)
    except KeyError:
        res = subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                              name], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"useradd {name} failed: {res.stderr.strip()}")
    for g in groups:
        if name not in grp.getgrnam(g).gr_mem:
            subprocess.run(["usermod", "-a", "-G", g, name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def _ensure_group(name: str) -> grp.struct_group:
    try:
        return grp.getgrnam(name)
    except KeyError:
        res = subprocess.run(["groupadd", name], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"groupadd {name} failed: {res.stderr.strip()}")
        return grp.getgrnam(name)


def need_other_users() -> None:
    """Skip, saying why, unless this process may create users and run processes as them."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users and run processes as them")
    for tool in ("useradd", "groupadd", "usermod"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    _ensure_group(GROUP)


@pytest.fixture(scope="module")
def users() -> dict[str, pwd.struct_passwd]:
    need_other_users()
    return {"outsider": _ensure_user(OUTSIDER), "member": _ensure_user(MEMBER, (GROUP,))}


@pytest.fixture(scope="module")
def daemon(users: dict[str, pwd.struct_passwd]) -> Iterator[DaemonProcess]:
    # pytest's tmp_path is 0700: other users could not even reach the socket by path.
    # Here every directory on the way is 0711, so what stops them is the socket's mode.
    top = Path(tempfile.mkdtemp(prefix="weightd-access-", dir="/tmp"))
    try:
        os.chmod(top, 0o711)
        (top / "run").mkdir(mode=0o711)
        os.chmod(top / "run", 0o711)
        with pytest.MonkeyPatch.context() as mp:
            for key in list(os.environ):
                if key.startswith("WEIGHTD_"):
                    mp.delenv(key)
            d = DaemonProcess(top)
        try:
            yield d
        finally:
            assert d.stop() == 0, d.log()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def probe(d: DaemonProcess, user: pwd.struct_passwd, extra_groups: list[int]) -> list[str]:
    """Run PROBE as ``user`` with exactly ``extra_groups`` as supplementary groups."""
    res = subprocess.run(
        [_python_for_others(), "-c", PROBE, str(d.socket), sysconfig.get_paths()["purelib"]],
        user=user.pw_uid, group=user.pw_gid, extra_groups=extra_groups, cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"},
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_socket_is_owned_by_the_daemon_user_and_0660(daemon):
    st = daemon.socket.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == os.geteuid()
    assert st.st_gid == os.getegid()


def test_the_owner_can_connect(daemon, users):
    import weightd_client

    with weightd_client.Client(daemon.socket, timeout=10) as c:
        assert c.status().pid == daemon.proc.pid


def test_another_user_outside_the_group_is_refused(daemon, users):
    outsider = users["outsider"]
    assert os.getegid() not in os.getgrouplist(OUTSIDER, outsider.pw_gid)
    # no supplementary groups: not even root's group, which the socket belongs to
    assert probe(daemon, outsider, []) == ["EACCES", "DaemonUnavailable"]
    assert daemon.status().pid == daemon.proc.pid  # the daemon did not notice


def _model(d: DaemonProcess, name: str) -> Path:
    from weightd.testing import write_synthetic_model

    path = d.cache_dir.parent / "models" / name
    if not path.exists():
        write_synthetic_model(path, total_bytes=256 * 1024, tensors=2, seed=len(name))
    return path


def _lease_ids(d: DaemonProcess) -> set[str]:
    from tests.daemon import raw_stub
    from weightd_client._proto.weightd.v1 import weightd_pb2 as pb

    return {x.lease_id for x in raw_stub(d.socket).Status(pb.StatusRequest(), timeout=10).leases}


def test_an_operator_sees_and_releases_another_processs_leases(daemon, users):
    # root (or the daemon's user) is told every lease id by Status and ends any lease
    # with `weightd release ID` or `--pid PID` (review 1, gap G1): here the holder is
    # this test process, the operator a `weightd` command run as root
    from tests.conftest import run_cli

    env = {"WEIGHTD_SOCKET": str(daemon.socket), "WEIGHTD_CACHE_DIR": str(daemon.cache_dir)}
    first = daemon.acquire(_model(daemon, "op-a")).lease_id
    second = daemon.acquire(_model(daemon, "op-b")).lease_id
    status = run_cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert f"id {first}" in status.stdout and f"id {second}" in status.stdout, status.stdout
    res = run_cli("release", first, env=env)
    assert res.returncode == 0, res.stderr
    assert f"released lease {first} of pid {os.getpid()}" in res.stderr, res.stderr
    assert _lease_ids(daemon) == {second}
    res = run_cli("release", "--pid", str(os.getpid()), env=env)
    assert res.returncode == 0, res.stderr
    assert _lease_ids(daemon) == set()
    res = run_cli("release", "--pid", str(os.getpid()), env=env)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "holds no lease" in res.stderr, res.stderr
    res = run_cli("release", env=env)
    assert res.returncode == 2 and "--pid" in res.stderr, res.stderr


#: What a member of the socket's group runs: `weightd status`, then `weightd release`
#: of the lease id it was given, then `--pid` of the holder.
MEMBER_CLI = r"""
import subprocess, site, sys
site.addsitedir(sys.argv[1])
from weightd.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_group_member_neither_sees_nor_releases_another_processs_leases(daemon, users):
    member = users["member"]
    gid = grp.getgrnam(GROUP).gr_gid
    cred = Path(f"{daemon.socket}.cred")
    before = [(p, p.stat().st_gid) for p in (daemon.socket, cred)]
    lease = daemon.acquire(_model(daemon, "member-a")).lease_id
    try:
        for p, _ in before:
            os.chown(p, -1, gid)

        def member_cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [_python_for_others(), "-c", MEMBER_CLI, sysconfig.get_paths()["purelib"],
                 *args], user=member.pw_uid, group=member.pw_gid, extra_groups=[gid],
                cwd="/", capture_output=True, text=True, timeout=60,
                env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
                     "WEIGHTD_SOCKET": str(daemon.socket)})

        status = member_cli("status")
        assert status.returncode == 0, status.stderr
        assert "1 lease" in status.stdout and lease not in status.stdout, status.stdout
        res = member_cli("release", lease)
        assert res.returncode == 1 and "NotPermitted" in res.stderr, res.stderr
        assert f"belongs to pid {os.getpid()}" in res.stderr, res.stderr
        res = member_cli("release", "--pid", str(os.getpid()))
        assert res.returncode == 1 and "root or the daemon's user" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert _lease_ids(daemon) == {lease}  # still held
    finally:
        for p, g in before:
            os.chown(p, -1, g)
        daemon.release(lease)


def test_a_member_of_the_socket_group_can_connect(daemon, users):
    # (last: it changes the socket's group)
    member, outsider = users["member"], users["outsider"]
    gid = grp.getgrnam(GROUP).gr_gid
    os.chown(daemon.socket, -1, gid)  # what systemd's Group= or SocketGroup= gives
    assert probe(daemon, member, [gid]) == ["connected", f"status-pid-{daemon.proc.pid}"]
    assert probe(daemon, outsider, []) == ["EACCES", "DaemonUnavailable"]
