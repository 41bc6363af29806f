"""Progress lines for the steps a person waits for, through the ``logging`` module.

Each progress line is an INFO record (its message the line's text) of a logger under ``graphlora``:
``graphlora.rewrite`` for :func:`graphlora.rewrite` (and what calls it: ``explain``, ``load_adapter``),
``graphlora.dump`` for the dump (graphlora/dump/progress.py). :func:`progress_to` shows one logger's records,
for the time of a block, on a stream as ``[graphlora] <text>``, flushed line by line (and only there: they
are not passed on to the root logger meanwhile, so a configured root handler does not print them twice).
Without a stream the records go only where the application's logging configuration sends them.

:func:`progress_stream` decides where ``rewrite(progress=...)`` shows them: ``True`` on stderr, ``False``
nowhere (quiet), ``None`` (the default) on stderr when it is a terminal, unless ``GRAPHLORA_PROGRESS`` says
otherwise (``1``: always, ``0``: never). Tests and redirected runs are therefore silent by default.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Callable, Iterator, TextIO

#: What :class:`ProgressHandler` writes before each message.
PREFIX = "[graphlora] "
#: The environment variable that forces progress on (``1``) or off (``0``) where the caller left it to graphlora.
ENV = "GRAPHLORA_PROGRESS"
#: The logger of :func:`graphlora.rewrite`'s steps.
rewrite_logger = logging.getLogger("graphlora.rewrite")


class _Stderr:
    """A stream standing for whatever ``sys.stderr`` is when a line is printed."""

    def __repr__(self) -> str:
        return "sys.stderr"


STDERR = _Stderr()


class ProgressHandler(logging.Handler):
    """Writes each record as ``[graphlora] <message>`` on its own line of ``stream`` and flushes it."""

    def __init__(self, stream: "TextIO | _Stderr"):
        super().__init__(logging.INFO)
        self.stream = stream
        self.setFormatter(logging.Formatter(PREFIX + "%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if self.stream is STDERR else self.stream
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own error reporting
            self.handleError(record)


@contextlib.contextmanager
def progress_to(logger: logging.Logger, stream: "TextIO | _Stderr | None") -> Iterator[None]:
    """Within the block, show ``logger``'s progress records on ``stream``, each line once (None: only where
    logging is configured to send them). Meanwhile the logger takes INFO records if it would drop them, and
    does not pass them on to the root logger's handlers as well. Nested blocks on one logger show each line
    once (the outer block's handler)."""
    if stream is None or any(isinstance(h, ProgressHandler) for h in logger.handlers):
        yield
        return
    handler = ProgressHandler(stream)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def progress_stream(setting: "bool | None | TextIO") -> "TextIO | _Stderr | None":
    """Where a ``progress=`` argument shows progress lines (see the module docstring); a stream is used as is."""
    if setting is True:
        return STDERR
    if setting is False:
        return None
    if setting is not None:
        return setting
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return STDERR if forced == "1" else None
    isatty = getattr(sys.stderr, "isatty", None)
    return STDERR if callable(isatty) and isatty() else None


@contextlib.contextmanager
def step(logger: logging.Logger, what: str, detail: Callable[[], str] | None = None) -> Iterator[None]:
    """Log ``<what>: <seconds> s (<detail()>)`` when the block ends (``<what> failed after ...`` if it raises)."""
    t0 = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("%s failed after %.1f s", what, time.perf_counter() - t0)
        raise
    extra = detail() if detail is not None else ""
    logger.info("%s: %.1f s%s", what, time.perf_counter() - t0, f" ({extra})" if extra else "")
