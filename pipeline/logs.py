"""Log lines: plain text or one JSON object per line, each carrying its HTTP request's id.

Every HTTP request has an id (:mod:`pipeline.context`), attached here to every log line
written while the request is served.

With ``SIGNALBOX_LOG_FORMAT=json`` every line (Signalbox's own, uvicorn's, the access log) is
``{"time", "level", "logger", "message", "request_id", …fields}``. Secrets stay out either way:
the webhook-token filter runs on every handler, before any formatter.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from pipeline.app import RedactTokens
from pipeline.context import REQUEST_ID

TEXT_FORMAT = "%(levelname)-9s %(name)s: %(message)s"
LOGGERS = ("signalbox", "uvicorn", "uvicorn.error", "uvicorn.access")

# The attributes every LogRecord has; anything else on a record came as `extra=` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "color_message", "taskName"}
# uvicorn's access log passes these as its arguments.
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or None) on every record as ``request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", REQUEST_ID.get()),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) \
                and len(record.args) == len(_ACCESS_FIELDS):
            line.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Signalbox's own messages beside uvicorn's; every line of the chosen format.

    Call after ``uvicorn.Config`` has set up uvicorn's handlers: their formatters are
    replaced for JSON, and every handler gets the request-id filter."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    ours = logging.getLogger("signalbox")
    ours.handlers[:] = [handler]
    ours.setLevel(level.upper())
    ours.propagate = False
    for name in LOGGERS:
        for each in logging.getLogger(name).handlers:
            each.addFilter(RedactTokens())
            each.addFilter(RequestIdFilter())
            if log_format == "json":
                each.setFormatter(JsonFormatter())
