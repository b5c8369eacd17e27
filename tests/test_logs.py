"""Log formatting: JSON lines with the request id, and rate-limited repeats."""

from __future__ import annotations

import json
import logging

from moko_guard.logs import JsonFormatter, RepeatFilter, request_id_var


def _record(message: str, level: int = logging.ERROR, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("moko_guard.test", level, __file__, 1, message, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_line_carries_request_id() -> None:
    token = request_id_var.set("req-42")
    try:
        line = JsonFormatter().format(_record("store_busy op=%s"))
    finally:
        request_id_var.reset(token)

    entry = json.loads(line)

    assert entry["request_id"] == "req-42"
    assert entry["level"] == "ERROR"
    assert entry["message"] == "store_busy op=%s"
    assert "\n" not in line


def test_json_line_includes_audit_fields() -> None:
    line = JsonFormatter().format(_record("audit", logging.INFO, audit={"event": "sign_out"}))

    assert json.loads(line)["audit"] == {"event": "sign_out"}


def test_repeated_errors_are_rate_limited() -> None:
    repeat = RepeatFilter(limit=3, window=3600)

    passed = [repeat.filter(_record("provider_discovery_failed provider=%s")) for _ in range(10)]
    other = repeat.filter(_record("another message"))

    assert passed == [True, True, True] + [False] * 7
    assert other is True


def test_info_lines_never_dropped() -> None:
    repeat = RepeatFilter(limit=1, window=3600)

    passed = [repeat.filter(_record("login_success", logging.INFO)) for _ in range(5)]

    assert all(passed)
