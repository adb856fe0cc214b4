"""The daemon's runtime directory: created by the daemon, or refused when it is unsafe.

Before the daemon binds its socket, the socket's directory must be one that only the
daemon's user (or root) can change: it is created here with mode 0700 when it is
missing, and an existing one is checked without following links (``lstat``): a
directory, owned by the daemon's user or root, with no write bit for group or others,
and every directory above it writable by nobody else unless sticky (the rules are
in :mod:`weightd_client.rundir`, which clients apply to the socket too). Otherwise the
daemon refuses to start and says which directory and why.

To let a group reach the socket, prepare the directory beforehand with mode 0750 and
that group (systemd's ``RuntimeDirectory=`` with ``RuntimeDirectoryMode=0750`` does);
the daemon keeps it as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from weightd_client.rundir import UnsafeDirectory, check_chain, user_name

log = logging.getLogger(__name__)

#: The mode of a runtime directory the daemon creates itself.
RUNTIME_DIR_MODE = 0o700


class UnsafeRuntimeDir(Exception):
    """The socket's directory could be changed by someone else than the daemon's user."""


def prepare_runtime_dir(directory: Path) -> None:
    """Create the socket's directory (0700) if it is missing, then check it.

    Raises:
        UnsafeRuntimeDir: the directory (or one above it) is owned by another user, is a
            link, or is writable by others; the message names it and says what to do.
    """
    directory = Path(os.path.abspath(directory))
    me = os.geteuid()
    missing = [p for p in (directory, *directory.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        try:
            os.mkdir(p, RUNTIME_DIR_MODE)
            log.info("created the runtime directory %s (mode %04o)", p, RUNTIME_DIR_MODE)
        except FileExistsError:
            pass  # made meanwhile, by whom the check below will tell
    try:
        check_chain(os.path.realpath(directory), {0, me})
        if os.path.islink(directory):
            check_chain(os.path.realpath(directory.parent), {0, me})
    except (UnsafeDirectory, OSError) as e:
        who = "root" if me == 0 else f"{user_name(me)} or root"
        raise UnsafeRuntimeDir(
            f"refusing to serve in {directory}: {e}. Remove it, or point WEIGHTD_SOCKET "
            f"at a directory that only {who} can change") from e
