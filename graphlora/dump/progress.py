"""Progress of a dump: one line per stage as it completes, through the ``logging`` module.

Every progress line is an INFO record of the logger ``graphlora.dump`` whose message is the line's
text (``load model: 0.2 s (LlavaForConditionalGeneration)``). :func:`progress_to` shows them, for the
time of one dump, on a stream as ``[graphlora] <text>``, flushed line by line, so a person at the
command line sees each stage when it finishes (and only there: the records are not passed on to the
root logger meanwhile, so a configured root handler does not print them twice). :data:`STDERR` stands
for whatever ``sys.stderr`` is when a line is written (pytest's capture, a redirected stream). Without
a stream the records go only where the application's logging configuration sends them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator, TextIO

#: The logger every progress line of a dump goes to.
logger = logging.getLogger("graphlora.dump")
#: What :class:`ProgressHandler` writes before each message.
PREFIX = "[graphlora] "


class _Stderr:
    """Default ``progress``: whatever ``sys.stderr`` is when a line is printed."""

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
def progress_to(progress: "TextIO | _Stderr | None") -> Iterator[None]:
    """Within the block, show the dump's progress records on ``progress``, each line once (None: only
    where logging is configured to send them). Meanwhile the logger takes INFO records if it would
    drop them, and does not pass them on to the root logger's handlers as well."""
    if progress is None:
        yield
        return
    handler = ProgressHandler(progress)
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


def say(text: str) -> None:
    """One progress line."""
    logger.info("%s", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (``""`` for none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
