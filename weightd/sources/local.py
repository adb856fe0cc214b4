"""Local files (``file://`` and plain paths): each file opened once, read from its descriptor.

A model directory may be writable by someone else than the daemon (a shared models
directory), who could swap a file for a link between the listing and the read. So a
file is opened once, for the whole download: its path resolved, checked against
``allowed_sources``, opened with ``O_NOFOLLOW`` (the last component cannot be a link at
open), then the descriptor itself is checked: a regular file whose path, as the kernel
names it (``/proc/self/fd``), lies under ``allowed_sources``, and whose size, mtime and
inode are those of the listing. Every chunk is then read from that descriptor
(``pread``), and what changed is asked of it (``fstat``), never of the path.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Sequence
from typing import Any

from weightd.errors import IntegrityError, NotPermitted
from weightd.sources.base import (
    SOURCE_CLASSES,
    Buffer,
    FileReader,
    RemoteFile,
    Source,
    check_allowed,
    translate_error,
)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _identity_of(st: os.stat_result) -> str:
    """The identity a listing gives a local file (see ``_identity`` in base.py)."""
    return f"{st.st_size}:mtime={st.st_mtime_ns}:{st.st_ino}"


def _realpath(path: str, url: str) -> str:
    """``os.path.realpath``, which raises when a link on the way is swapped for a file
    while it resolves it (``EINVAL`` from ``readlink``): a path that changes under it."""
    try:
        return os.path.realpath(path)
    except OSError as e:
        raise NotPermitted(f"{url}: changed while its links were resolved ({e})") from e


class LocalSource(Source):
    """A model on the local filesystem."""

    def _find(self, root: str) -> list[tuple[str, str, dict[str, Any]]]:
        found = super()._find(root)
        for p, _, _ in found:  # any link out refuses the model, even one left out by globs
            self._check_link(p)
        return found

    def _file_info(self, path: str, info: dict[str, Any]) -> dict[str, Any]:
        self._check_link(path)  # again: it may have become a link since the listing
        # a listing describes a link itself; what is read is its target
        try:
            st = os.stat(path)
        except OSError as e:
            raise translate_error(e, self._url_of(path)) from e
        return {"size": st.st_size, "mtime": st.st_mtime_ns, "ino": st.st_ino}

    def _check_link(self, path: str) -> None:
        """A local file reached through a link must still lie under allowed_sources."""
        if not self.config.allowed_sources:
            return
        real = _realpath(path, self._url_of(path))
        if real != os.path.normpath(path):
            try:
                check_allowed("file://" + real, self.config.allowed_sources)
            except NotPermitted as e:
                raise NotPermitted(f"file://{path}: a link to {real}, outside "
                                   "allowed_sources") from e

    def open_fd(self, path: str) -> int:
        """Open a file of the model for reading, checked as the module's docstring says.

        Raises:
            NotPermitted: the file is (or became) a link out of ``allowed_sources``, a link
                at open time, or not a regular file.
            SourceNotFound: it is gone.
        """
        url = self._url_of(path)
        self._check_link(path)
        real = _realpath(path, url)
        try:
            fd = os.open(real, _OPEN_FLAGS)
        except OSError as e:
            if e.errno == errno.ELOOP:  # it became a link after it was resolved
                raise NotPermitted(f"{url}: became a symbolic link while being opened") from e
            raise translate_error(e, url) from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotPermitted(f"{url}: not a regular file")
            os.set_blocking(fd, True)
            if self.config.allowed_sources:
                try:
                    opened = os.readlink(f"/proc/self/fd/{fd}")
                except OSError:  # no /proc: O_NOFOLLOW on the resolved path must do
                    opened = real
                try:
                    check_allowed("file://" + opened, self.config.allowed_sources)
                except NotPermitted as e:
                    raise NotPermitted(f"{url}: opened {opened}, outside allowed_sources (a "
                                       "directory on its way was swapped for a link)") from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_file(self, rf: RemoteFile) -> FileReader:
        return _LocalReader(self, rf)

    def _read_small(self, path: str, limit: int) -> bytes:
        fd = self.open_fd(path)
        try:
            return os.pread(fd, limit + 1, 0)
        finally:
            os.close(fd)

    async def _read_range(self, path: str, start: int, end: int,
                          size: int | None) -> Sequence[Buffer]:
        """A range read outside a download: opened and checked like any other."""
        fd = await asyncio.to_thread(self.open_fd, path)
        try:
            return [await asyncio.to_thread(_pread_all, fd, start, end)]
        finally:
            os.close(fd)


def _pread_all(fd: int, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of ``fd`` (fewer only at the end of the file)."""
    data = os.pread(fd, end - start, start)
    if len(data) == end - start or not data:
        return data
    parts = [data]
    got = len(data)
    while got < end - start:
        more = os.pread(fd, end - start - got, start + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _preadv_all(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``fd`` at ``offset`` (the kernel copies into it: no Python
    copy); the bytes read, fewer only at the end of the file."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


class _LocalReader(FileReader):
    """A local file's descriptor, opened once; every chunk comes from it."""

    def __init__(self, source: LocalSource, rf: RemoteFile) -> None:
        super().__init__(source, rf, None)
        self.fd = source.open_fd(rf.path)
        opened = _identity_of(os.fstat(self.fd))
        if opened != rf.identity:
            os.close(self.fd)
            raise IntegrityError(f"{rf.url}: changed between the listing and its opening "
                                 f"({rf.identity} -> {opened}); fetch again")

    fills_buffer = True

    async def read(self, start: int, end: int,
                   into: memoryview | None = None) -> Sequence[Buffer]:
        buf = into if into is not None else memoryview(bytearray(end - start))
        got = await asyncio.to_thread(_preadv_all, self.fd, buf, start)
        if got != end - start:
            raise IntegrityError(f"{self.rf.url}: asked for bytes {start}-{end}, the file "
                                 f"has only {start + got}: it shrank during the fetch")
        return [buf]

    def identity(self) -> str:
        return _identity_of(os.fstat(self.fd))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


SOURCE_CLASSES["file"] = LocalSource
