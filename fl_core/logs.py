"""Structured logs: one JSON object per line (time, level, component, logger, event, trace id, run id, hospital and
an event's own fields), for a log shipper, switched on by a config's `log_format: json`.

What a log line may hold is what the code puts in it: events and counts, never a request's text, a token or a
record. An exception is logged by its type alone (its message and traceback can hold what a request sent).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TextIO

from opentelemetry import trace

_context: ContextVar[dict[str, str]] = ContextVar("log_context", default={})  # noqa: B039 (never mutated)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


# A run's events (each round, with what the console line shows): INFO, for JSON lines only; it never reaches the
# console, whose lines are printed.
events = logging.getLogger("federated_dp_llm.events")
events.setLevel(logging.INFO)
events.propagate = False


@contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Within the block, every JSON line carries these fields (run_id, hospital)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


OWN_LOGGERS = ("federated_dp_llm", "gateway", "fl_core", "fl_server", "fl_client", "strategies", "privacy", "fl-node")
EVENT_CHARS = 200
# logging.captureWarnings logs a warning already formatted: "FILE:LINE: CATEGORY: its text"
WARNING_ORIGIN = re.compile(r"(.*?:\d+: \w+): ")


def _ours(name: str) -> bool:
    return name.split(".", 1)[0] in OWN_LOGGERS


class JsonLines(logging.Formatter):
    """This project's records in full (their message and their `extra` fields, which its code chooses); another
    library's by the first line of its message template alone, without the values put into it, since those can be
    an exception's text or a traceback (Flower logs a failing ClientApp's), and never its extra fields; Python's
    warnings by where they were raised and their category."""

    def __init__(self, component: str, fixed: dict[str, str] | None = None) -> None:
        super().__init__()
        self.component = component
        self.fixed = fixed or {}  # every line's, whatever thread logs (a node's hospital)

    def format(self, record: logging.LogRecord) -> str:
        span = trace.get_current_span().get_span_context()
        ours = _ours(record.name)
        if ours:
            event = record.getMessage()
        elif isinstance(record.msg, BaseException):
            event = type(record.msg).__name__
        elif record.name == "py.warnings":  # where and what kind, never the warning's text
            origin = WARNING_ORIGIN.match(str(record.msg))
            event = origin.group(1) if origin else "warning"
        else:
            event = str(record.msg).strip().split("\n", 1)[0][:EVENT_CHARS]
        fields = {k: v for k, v in vars(record).items() if k not in _STANDARD} if ours else {}
        line: dict[str, object] = {
            **fields,  # an event's own fields first: none of them can stand in for those below
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "component": self.component, "logger": record.name, "event": event,
            "trace_id": f"{span.trace_id:032x}" if span.is_valid else None, **self.fixed, **_context.get(),
        }
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = record.exc_info[0].__name__
        return json.dumps(line, default=str)


def keep_text_out_of_logs() -> None:
    """What a process whose log is JSON lines sets once: Python's warnings become records (whose text the
    formatter drops) instead of text on stderr, and a record that fails to format is dropped, never printed with its
    arguments."""
    logging.captureWarnings(True)
    logging.raiseExceptions = False


def json_handler(stream: TextIO, component: str, **fixed: str) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines(component, fixed))
    handler.addFilter(lambda record: bool(str(record.msg).strip()))  # Flower's blank lines are no events
    return handler
