"""Progress for people: a rich bar on a terminal, plain lines otherwise (stderr only).

Library code takes an fsspec-style callback (``set_size``, ``relative_update``); only the
CLI builds one of these. Sizes are IEC (MiB, GiB) as everywhere in weightd, and a line
fits the terminal (80 columns for plain lines): a long label is shortened in the middle,
keeping its end (the model's name).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from fsspec.callbacks import Callback

from weightd.config import format_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Task
    from rich.text import Text

#: Plain progress lines stay within this many columns.
LINE_WIDTH = 80


def shorten(label: str, width: int) -> str:
    """``label`` in at most ``width`` characters: its start and its end around ``…``.

    Example
    -------
    >>> shorten("s3://bucket/models/org/llama-3-8b-instruct", 28)
    's3://b…g/llama-3-8b-instruct'
    """
    if len(label) <= width:
        return label
    if width <= 1:
        return label[-width:] if width else ""
    head = (width - 1) // 4
    tail = width - 1 - head
    return f"{label[:head]}…{label[len(label) - tail:]}"


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

    def line(self, now: float) -> str:
        """The line for the progress so far, at most :data:`LINE_WIDTH` columns."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.value / elapsed
        total = self.size or 0
        eta = (total - self.value) / rate if rate > 0 and total else 0.0
        rest = (f": {format_size(self.value)} / {format_size(total)} "
                f"({format_size(rate)}/s, ETA {eta:.0f}s)")
        return shorten(self.label, max(12, LINE_WIDTH - len(rest))) + rest

    def call(self, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and self.value < (self.size or 0):
            return
        self.last = now
        print(self.line(now), file=self.stream, flush=True)


#: Columns of the bar besides the label and the bar itself: bytes ("1023.9 MiB /
#: 1023.9 MiB"), rate ("1023.9 MiB/s"), ETA ("0:00:12") and the gaps between columns.
_FIXED_COLUMNS = 23 + 12 + 7 + 5


def _columns(label: str, width: int) -> tuple[str, int]:
    """The shortened label and the bar's width for a terminal ``width`` columns wide."""
    text = shorten(label, max(12, min(len(label), width - _FIXED_COLUMNS - 10)))
    return text, max(10, min(40, width - _FIXED_COLUMNS - len(text)))


class RichProgress(Callback):  # type: ignore[misc]
    """A rich progress bar with bytes, rate and ETA, in IEC units, that fits the terminal."""

    def __init__(self, label: str, console: Console | None = None) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class BytesColumn(ProgressColumn):  # type: ignore[misc]
            def render(self, task: Task) -> Text:
                total = format_size(task.total) if task.total is not None else "?"
                return Text(f"{format_size(task.completed)} / {total}", style="progress.download")

        class RateColumn(ProgressColumn):  # type: ignore[misc]
            def render(self, task: Task) -> Text:
                speed = task.finished_speed or task.speed
                text = f"{format_size(speed)}/s" if speed is not None else "?"
                return Text(text, style="progress.data.speed")

        console = console or Console(stderr=True)
        text, bar = _columns(label, console.width)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=bar),
                                 BytesColumn(), RateColumn(), TimeRemainingColumn(),
                                 console=console)
        self.task = self.progress.add_task(text, total=None)
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

