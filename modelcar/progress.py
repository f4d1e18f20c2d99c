"""Progress bars on a terminal, nothing elsewhere: CI logs stay clean, humans see bytes move."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

LOGGERS = ("modelcar", "huggingface_hub")  # what the CLI logs to stderr (cli._setup_logging)


def _writing_to_the_terminal() -> list[logging.Logger]:
    """The loggers of LOGGERS with a handler of their own on stderr or stdout: those whose lines
    are redirected above the bars. A logger without one (a library caller who set up the root
    logger) is left alone: redirected, its lines came out twice, through the bars and the root."""
    loggers = [logging.getLogger(n) for n in LOGGERS]
    return [
        lg
        for lg in loggers
        if any(
            isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
            for h in lg.handlers
        )
    ]


class _LogsAboveBars:
    """tqdm's redirect of log lines above the bars, entered by the first bar drawn in the process
    and left by the last. It swaps the loggers' handlers and puts back what it found: two redirects
    interleaved (two builds with bars, in threads) put back the first one's tqdm handler for good,
    and the host's own handler was gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._redirect: Any = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with self._lock:
            if self._users == 0:
                self._redirect = logging_redirect_tqdm(_writing_to_the_terminal())
                self._redirect.__enter__()
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._redirect.__exit__(None, None, None)
                    self._redirect = None


_logs_above_bars = _LogsAboveBars()


class Progress:
    """Named byte counters shown as tqdm bars on stderr, when enabled."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: dict[str, Any] = {}
        self._lock = threading.Lock()

    @contextmanager
    def bar(self, key: str, total: int, desc: str) -> Iterator[None]:
        if not self.enabled or total <= 0:  # nothing to count (a no-op build downloads nothing): no bar
            yield
            return
        from tqdm import tqdm

        with ExitStack() as stack:
            if not self._bars:  # log lines go above the bars while any is drawn, not through them
                stack.enter_context(_logs_above_bars())
            bar = tqdm(
                total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=True
            )
            self._bars[key] = bar
            try:
                yield
            finally:
                self._bars.pop(key, None)
                bar.close()

    def advance(self, key: str, n: int) -> None:
        bar = self._bars.get(key)
        if bar is not None:
            with self._lock:
                bar.update(n)


class Transfer:
    """One blob's bytes on bar `key`, over every attempt at reading it: each attempt starts by
    taking back what the one before it counted, so a read retried from the start (a dropped
    connection) does not count its bytes twice and end the bar past its total."""

    def __init__(self, progress: Progress, key: str) -> None:
        self._progress, self._key = progress, key
        self._counted = 0

    def attempt(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        self._progress.advance(self._key, -self._counted)
        self._counted = 0
        for chunk in chunks:
            self._counted += len(chunk)
            self._progress.advance(self._key, len(chunk))
            yield chunk
