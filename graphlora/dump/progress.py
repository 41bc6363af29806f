"""Progress of a dump: one line per stage as it completes, through the ``logging`` module.

Every progress line is an INFO record of the logger ``graphlora.dump`` whose message is the line's
text (``load model: 0.2 s (LlavaForConditionalGeneration)``). :func:`progress_to` shows them, for the
time of one dump, on a stream as ``[graphlora] <text>`` (graphlora/progress.py owns the handler), flushed line by line, so a person at the
command line sees each stage when it finishes (and only there: the records are not passed on to the
root logger meanwhile, so a configured root handler does not print them twice). :data:`STDERR` stands
for whatever ``sys.stderr`` is when a line is written (pytest's capture, a redirected stream). Without
a stream the records go only where the application's logging configuration sends them.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, TextIO

from graphlora.progress import PREFIX, STDERR, ProgressHandler, _Stderr
from graphlora.progress import progress_to as _progress_to

#: The logger every progress line of a dump goes to.
logger = logging.getLogger("graphlora.dump")

__all__ = ["PREFIX", "STDERR", "ProgressHandler", "first_line", "logger", "progress_to", "say"]


@contextlib.contextmanager
def progress_to(progress: "TextIO | _Stderr | None") -> Iterator[None]:
    """Within the block, show the dump's progress records on ``progress`` (graphlora.progress.progress_to)."""
    with _progress_to(logger, progress):
        yield


def say(text: str) -> None:
    """One progress line."""
    logger.info("%s", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (``""`` for none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
