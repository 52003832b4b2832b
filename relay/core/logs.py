"""Structured logs: one JSON object per line, carrying the job id of the work in progress.

The job id lives in a context variable, which greenlets keep apart, so every line logged while
a greenlet serves or runs a job names it — without passing it to every call.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import orjson

job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)


def bind_job(job_id: str) -> None:
    """Name the job for the rest of this greenlet's work (a request, for instance)."""
    job_id_var.set(job_id)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        if job_id:
            entry["job_id"] = job_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    """Plain lines; a line break inside a message (a model name a client chose, say) is
    escaped, so that no request can forge a log line of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], super().formatMessage(record))


_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def configure(level: str = "INFO", fmt: str = "json") -> None:
    """Send every log line to stderr, as JSON (or plain text with ``fmt="text"``)."""
    # What no line of ours shows, and what each record would otherwise look up (the logging
    # HOWTO's "Optimization"): the caller's file and line (a walk up the stack), the thread's
    # and the process's names. A job's log line is on the first token's path.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
