"""Logging setup: plain text or JSON lines, with repeated errors rate-limited.

A JSON line carries the time, level, logger, message, the request id of the
request being handled (from a context variable the guard sets) and, for audit
events, the audit fields. Messages never contain secrets, tokens or cookie
values: the code that logs passes only ids, reason codes and escaped inputs.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "moko_guard_request_id", default=None
)

REPEAT_WINDOW = 60.0
REPEAT_LIMIT = 5


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            entry["audit"] = audit
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(entry, default=str, ensure_ascii=False)


class RepeatFilter(logging.Filter):
    """Let through at most ``limit`` identical warnings or errors per ``window`` seconds.

    "Identical" means the same logger, level and message template. When a
    window ends, the next record of that kind says how many were dropped.
    """

    def __init__(self, limit: int = REPEAT_LIMIT, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.limit = limit
        self.window = window
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or getattr(record, "audit", None) is not None:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        state = self._seen.get(key)
        if state is None or now - state[0] > self.window:
            dropped = int(state[2]) if state else 0
            self._seen[key] = [now, 1.0, 0.0]
            if dropped:
                record.msg = f"{record.msg} (and {dropped} more like it dropped)"
            return True
        state[1] += 1
        if state[1] > self.limit:
            state[2] += 1
            return False
        return True


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request URL at INFO; keep provider calls out of the operator log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
