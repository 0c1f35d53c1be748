"""Progress bars and logging on stderr, so stdout carries only data (tables, JSON paths).

On a terminal a progress bar is rich's live bar. When stderr is not a terminal (redirected to a
file, a CI log, a pipe) a live bar shows nothing until it ends, so there each bar becomes plain log
lines instead: the description, done/total, the rate and the time left, every 10 % of the total or
every 30 s, whichever comes first, and one line when it ends.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)
log = logging.getLogger("knowbench.progress")

PLAIN_EVERY_FRACTION = 0.10  # plain mode: a line every 10 % of the total ...
PLAIN_EVERY_SECONDS = 30.0  # ... or every 30 s, whichever comes first


def setup_logging(verbose: int = 0) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    handler = RichHandler(console=stderr, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)
    for noisy in ("transformers", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _enabled() -> bool:
    return os.environ.get("KNOWBENCH_PROGRESS", "1") != "0"


def _interactive() -> bool:
    """Whether stderr is a terminal a live bar can redraw (``KNOWBENCH_PROGRESS=plain`` forces lines)."""
    if os.environ.get("KNOWBENCH_PROGRESS") == "plain":
        return False
    return bool(stderr.is_terminal)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """``with progress_bar("editing", n) as advance: ... advance(1)``; a no-op when disabled, plain
    periodic log lines when stderr is not a terminal (:class:`PlainProgress`)."""
    if not _enabled() or not sys.stderr:
        yield lambda n=1: None
        return
    if not _interactive():
        plain = PlainProgress(description, total)
        yield plain.advance
        plain.finish()
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class PlainProgress:
    """Progress as log lines ("rome · single: 412/1000 (41%), 3.1/s, 3m10s left"): one every
    ``every_fraction`` of the total or every ``every_seconds``, whichever comes first, and a last one
    when the work ends (not when it was cut short by an exception). Without a total only the timed
    lines are written."""

    def __init__(self, description: str, total: int | None, *, every_fraction: float = PLAIN_EVERY_FRACTION,
                 every_seconds: float = PLAIN_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None):
        self.description = description
        self.total = total if total and total > 0 else None
        self.done = 0
        self.clock = clock
        self.t0 = self.last_t = clock()
        self.every_seconds = every_seconds
        self.step = max(1, int(self.total * every_fraction)) if self.total else None
        self.next_at = self.step
        self.emit = emit or (lambda line: log.info("%s", line))
        self.lines = 0

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        rate_s = f"{rate:.2f}/s" if rate < 10 else f"{rate:.0f}/s"
        if self.total:
            text = f"{self.description}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), {rate_s}"
            if 0 < self.done < self.total and rate > 0:
                text += f", {_duration((self.total - self.done) / rate)} left"
            elif self.done >= self.total:
                text += f", done in {_duration(elapsed)}"
            return text
        return f"{self.description}: {self.done} done, {rate_s}, {_duration(elapsed)} elapsed"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        due_count = self.next_at is not None and self.done >= self.next_at
        due_time = now - self.last_t >= self.every_seconds
        finished = self.total is not None and self.done >= self.total
        if (due_count or due_time) and not finished:
            self._emit(now)
        if due_count:
            while self.next_at is not None and self.next_at <= self.done:
                self.next_at += self.step  # type: ignore[operator]

    def finish(self) -> None:
        if self.done and self.total is not None:  # an open-ended count only reports while it runs long
            self._emit(self.clock())

    def _emit(self, now: float) -> None:
        self.last_t = now
        self.lines += 1
        self.emit(self.line())
