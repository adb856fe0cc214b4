"""Progress for people: a rich bar on a terminal, plain lines otherwise (stderr only).

Library code takes an fsspec-style callback (``set_size``, ``relative_update``); only the
CLI builds one of these.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from fsspec.callbacks import Callback

from weightd.config import format_size


class PlainProgress(Callback):  # type: ignore[misc]
    """One line every ``interval`` seconds: bytes, rate, ETA."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, interval: float = 2.0) -> None:
        super().__init__()
        self.label = label
        self.stream = stream
        self.interval = interval
        self.start = time.monotonic()
        self.last = 0.0
        self.lock = threading.Lock()

    def call(self, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and self.value < (self.size or 0):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.value / elapsed
        total = self.size or 0
        eta = (total - self.value) / rate if rate > 0 and total else 0.0
        print(f"{self.label}: {format_size(self.value)} / {format_size(total)} "
              f"({format_size(rate)}/s, ETA {eta:.0f}s)", file=self.stream, flush=True)


class RichProgress(Callback):  # type: ignore[misc]
    """A rich progress bar with bytes, rate and ETA."""

    def __init__(self, label: str) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.task = self.progress.add_task(label, total=None)
        self.progress.start()

    def call(self, *args: Any, **kwargs: Any) -> None:
        self.progress.update(self.task, completed=self.value, total=self.size)

    def close(self) -> None:
        self.progress.stop()


def progress_for(label: str, stream: TextIO = sys.stderr) -> Callback:
    """A rich bar when ``stream`` is a terminal, plain lines otherwise."""
    if stream.isatty():
        return RichProgress(label)
    return PlainProgress(label, stream)
