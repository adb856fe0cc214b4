"""Whom a unix socket of weightd can be trusted from: checks shared by daemon and client.

A unix socket is only as trustworthy as the directories above it. Whoever may write in
one of them can rename the daemon's socket away and listen in its place, and a client
that connects then maps that user's weights (another user who pre-created
``/tmp/weightd-<uid>/`` could do exactly that). So the daemon creates its runtime
directory itself, or refuses one that someone else could change, and the client checks
the socket's owner and every directory on the way before it trusts an answer.

Who is trusted
--------------
Root, the process's own user, and the *daemon's user*: the user that owns the socket,
when it also owns the socket's directory and was given that directory by root: walking
up from it, every directory is that user's and writable by nobody else, until one that
belongs to root and is writable by nobody else (systemd's ``RuntimeDirectory=`` makes
``/run/weightd`` for ``User=weightd`` so; so does ``install -d -o weightd /run/weightd``).
A directory in ``/tmp`` (writable by everyone) is never given by root, so a user who
made ``/tmp/weightd-<uid>`` cannot pass as the daemon.

What is checked
---------------
The socket (links resolved) is a socket owned by a trusted user. Its directory belongs
to a trusted user and has no write bit for group or others. Every directory above it
belongs to a trusted user and is writable by nobody else, unless it is sticky (like
``/tmp``: others cannot rename what is not theirs there).

This module imports nothing but the standard library and the error classes, so the
daemon uses it too (``weightd/rundir.py``).
"""

from __future__ import annotations

import os
import pwd
import stat

from weightd_errors import DaemonUnavailable

__all__ = ["UnsafeDirectory", "check_chain", "check_socket", "user_name"]

_WRITE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UnsafeDirectory(Exception):
    """A directory (or socket) that a user other than the trusted ones could change."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def user_name(uid: int) -> str:
    """``name (uid N)``, or ``uid N`` for a user the system does not know."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _lstat_dir(path: str) -> os.stat_result:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(path, "is a symbolic link (it was swapped while being checked)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(path, "is not a directory")
    return st


def _writers(mode: int) -> str:
    both = mode & stat.S_IWGRP and mode & stat.S_IWOTH
    return "its group and others" if both else "others" if mode & stat.S_IWOTH else "its group"


def _parents(path: str) -> list[str]:
    """``path`` and every directory above it, up to ``/``."""
    out = [path]
    while path != os.path.dirname(path):
        path = os.path.dirname(path)
        out.append(path)
    return out


def check_chain(directory: str | os.PathLike[str], trusted: set[int]) -> None:
    """Check a socket's directory and every directory above it (see the module's Note).

    Args:
        directory: an absolute path without links (``os.path.realpath``).
        trusted: the uids that may own these directories.

    Raises:
        UnsafeDirectory: the first directory that fails, and why.
        OSError: a directory cannot be examined.
    """
    final = os.fspath(directory)
    for d in _parents(final):
        st = _lstat_dir(d)
        if st.st_uid not in trusted:
            raise UnsafeDirectory(d, f"is owned by {user_name(st.st_uid)}, who is not trusted "
                                     f"({', '.join(user_name(u) for u in sorted(trusted))})")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _WRITE_BY_OTHERS and (d == final or not mode & stat.S_ISVTX):
            raise UnsafeDirectory(d, f"is writable by {_writers(mode)} (mode {mode:04o}): "
                                     "another user could put a socket of their own in the "
                                     "daemon's place")


def _given_by_root(directory: str, uid: int) -> bool:
    """Whether ``directory`` (owned by ``uid``) came from root: above it only directories
    of ``uid`` writable by nobody else, up to one of root's writable by nobody else."""
    for d in _parents(directory):
        st = _lstat_dir(d)
        if stat.S_IMODE(st.st_mode) & _WRITE_BY_OTHERS:
            return False
        if st.st_uid == 0:
            return d != directory
        if st.st_uid != uid:
            return False
    return False


def check_socket(path: str | os.PathLike[str]) -> str:
    """Check that the socket at ``path`` can be trusted to be the daemon's.

    Returns:
        The socket's real path (links resolved).

    Raises:
        DaemonUnavailable: the socket is missing, not a socket, owned by an untrusted
            user, or reached through a directory another user could change; the message
            says which and why.

    Example:
        >>> check_socket("/run/weightd/weightd.sock")              # doctest: +SKIP
        '/run/weightd/weightd.sock'
    """
    given = os.path.abspath(os.fspath(path))
    real = os.path.realpath(given)
    me = os.geteuid()
    try:
        st = os.lstat(real)
        if not stat.S_ISSOCK(st.st_mode):
            raise UnsafeDirectory(real, "is not a socket")
        trusted = {0, me}
        owner = st.st_uid
        directory = os.path.dirname(real)
        if owner not in trusted:
            dir_owner = _lstat_dir(directory).st_uid
            if dir_owner != owner or not _given_by_root(directory, owner):
                raise UnsafeDirectory(real, f"belongs to {user_name(owner)}, not to "
                                            f"{user_name(me)}, root, or a daemon user that root "
                                            f"gave {directory} to")
            trusted.add(owner)
        check_chain(directory, trusted)
        if real != given:  # the name that is connected to lies in a directory too
            check_chain(os.path.realpath(os.path.dirname(given)), trusted)
    except UnsafeDirectory as e:
        raise DaemonUnavailable(f"refusing the weightd socket {given}: {e}") from e
    except FileNotFoundError as e:
        raise DaemonUnavailable(f"weightd daemon unreachable at {given}: no such socket") from e
    except OSError as e:
        raise DaemonUnavailable(f"refusing the weightd socket {given}: cannot check it "
                                f"({e})") from e
    return real
