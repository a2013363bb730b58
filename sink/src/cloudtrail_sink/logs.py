"""Structured logging: one JSON object per line (or ``key=value`` text) on stderr.

Fields passed with ``extra={...}`` become top-level keys. Nothing here ever formats an event's
payload; callers pass ids, codes, counts and segment names only.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        out.update(_extras(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{self.formatTime(record)} {record.levelname.lower():7} {record.getMessage()}"
        if extras:
            line += " " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info", fmt: str = "json", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("cloudtrail_sink")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # botocore logs request bodies at debug: keep it at warning whatever our level is.
    logging.getLogger("botocore").setLevel(logging.WARNING)
