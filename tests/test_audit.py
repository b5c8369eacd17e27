"""Tests of audit events: escaping, truncation and what reaches the log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest

from moko_guard.audit import AuditEvent, Auditor, escape_control
from moko_guard.store import AuditFilter, AuditRecord, Store
from moko_guard.store import schema as store_schema

pytestmark = pytest.mark.anyio

STRING_FIELDS = ["reason", "provider", "subject", "email", "client_ip", "user_agent",
                 "request_id", "detail"]
# Maximum stored length per field: the column length, or 1000 for the TEXT column "detail".
LIMITS = {"reason": 64, "provider": 40, "subject": 255, "email": 320, "client_ip": 64,
          "user_agent": 512, "request_id": 64, "detail": 1000}
LOGGED_FIELDS = ["reason", "provider", "client_ip", "request_id"]
CONTROL_CASES = [
    ("\n", "\\x0a"),
    ("\r", "\\x0d"),
    ("\x00", "\\x00"),
    ("\x1b", "\\x1b"),
    ("\t", "\\x09"),
    ("\x7f", "\\x7f"),
    ("\x85", "\\x85"),
    ("\u2028", "\\u2028"),
    ("\u2029", "\\u2029"),
]
RAW_CONTROLS = [raw for raw, _ in CONTROL_CASES]
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    backend = Store(f"sqlite:///{tmp_path / 'audit.db'}")
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="moko_guard.audit")
    return caplog


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "moko_guard.audit"]


async def only_row(store: Store) -> AuditRecord:
    rows = await store.list_audit(AuditFilter())
    assert len(rows) == 1
    return rows[0]


@pytest.mark.parametrize(
    ("raw", "escaped"), CONTROL_CASES, ids=[repr(raw) for raw, _ in CONTROL_CASES]
)
def test_escape_control_makes_character_visible(raw: str, escaped: str) -> None:
    assert escape_control(f"a{raw}b") == f"a{escaped}b"


def test_escape_control_keeps_printable_text() -> None:
    text = "Zoë <zoe@example.com> \"quoted\" ✓"

    assert escape_control(text) == text


def test_escape_control_doubles_backslash() -> None:
    typed = "\\x0a"

    assert escape_control(typed) == "\\\\x0a"
    assert escape_control(typed) != escape_control("\n")


@pytest.mark.parametrize(("raw", "escaped"), CONTROL_CASES[:4] + CONTROL_CASES[7:8],
                         ids=["LF", "CR", "NUL", "ESC", "LS"])
async def test_control_characters_escaped_in_row_and_log(
    store: Store, audit_log: pytest.LogCaptureFixture, raw: str, escaped: str
) -> None:
    values: dict[str, Any] = {
        name: f"{name}{raw}forged event=login.success" for name in STRING_FIELDS
    }
    event = AuditEvent(event="login.failure", outcome="failure", user_id=7, **values)

    await Auditor(store).record(event)

    row = await only_row(store)
    records = audit_records(audit_log)
    assert len(records) == 1
    message = records[0].getMessage()
    structured = records[0].__dict__["audit"]
    for name in STRING_FIELDS:
        expected = f"{name}{escaped}forged event=login.success"
        assert getattr(row, name) == expected, name
        assert structured[name] == expected, name
    for name in LOGGED_FIELDS:
        assert f"{name}{escaped}forged" in message, name
    assert raw not in message
    assert "\n" not in message


async def test_every_control_character_escaped_together(
    store: Store, audit_log: pytest.LogCaptureFixture
) -> None:
    mixed = "x" + "".join(RAW_CONTROLS) + "y"
    values: dict[str, Any] = {name: mixed for name in STRING_FIELDS}

    await Auditor(store).record(AuditEvent(event="access.denied", outcome="failure", **values))

    row = await only_row(store)
    structured = audit_records(audit_log)[0].__dict__["audit"]
    for name in STRING_FIELDS:
        stored = getattr(row, name)
        assert isinstance(stored, str)
        for raw in RAW_CONTROLS:
            assert raw not in stored, (name, raw)
            assert raw not in structured[name], (name, raw)


@pytest.mark.parametrize(("name", "limit"), list(LIMITS.items()), ids=list(LIMITS))
async def test_long_value_truncated_to_limit(store: Store, name: str, limit: int) -> None:
    column_length = getattr(store_schema.audit_log.c[name].type, "length", None)
    long_value: dict[str, Any] = {name: "v" * 5000}
    event = AuditEvent(event="login.failure", outcome="failure", **long_value)

    await Auditor(store).record(event)

    row = await only_row(store)
    assert getattr(row, name) == "v" * limit
    assert column_length in (None, limit)


async def test_escaping_counts_toward_limit(store: Store) -> None:
    event = AuditEvent(event="login.failure", outcome="failure", reason="\n" * 100)

    await Auditor(store).record(event)

    row = await only_row(store)
    assert row.reason == "\\x0a" * 16
    assert len(row.reason) == 64


async def test_log_message_leaves_out_detail_and_identity(
    store: Store, audit_log: pytest.LogCaptureFixture
) -> None:
    event = AuditEvent(
        event="login.failure", outcome="failure", reason="token_invalid", provider="idp",
        subject="alice-sub", email="alice@example.com", user_agent="Firefox/130",
        detail=f"id_token={TOKEN}",
    )

    await Auditor(store).record(event)

    records = audit_records(audit_log)
    assert len(records) == 1
    message = records[0].getMessage()
    assert TOKEN not in message
    assert "id_token" not in message
    assert "alice@example.com" not in message
    assert "Firefox" not in message
    assert "reason=token_invalid" in message
    row = await only_row(store)
    assert row.detail == f"id_token={TOKEN}"


@pytest.mark.parametrize(
    ("outcome", "level"),
    [("failure", logging.WARNING), ("success", logging.INFO), ("info", logging.INFO)],
    ids=["failure", "success", "info"],
)
async def test_log_level_follows_outcome(
    store: Store, audit_log: pytest.LogCaptureFixture,
    outcome: Literal["success", "failure", "info"], level: int,
) -> None:
    await Auditor(store).record(AuditEvent(event="sign_out", outcome=outcome))

    records = audit_records(audit_log)
    assert [r.levelno for r in records] == [level]
    assert f"outcome={outcome}" in records[0].getMessage()


async def test_store_failure_logged_not_raised(audit_log: pytest.LogCaptureFixture) -> None:
    closed_store = Store("sqlite:///never-opened.db")

    await Auditor(closed_store).record(
        AuditEvent(event="login.failure", outcome="failure", reason="state_mismatch")
    )

    records = audit_records(audit_log)
    assert len(records) == 2
    assert records[0].getMessage().startswith("audit event=login.failure")
    assert records[1].levelno == logging.ERROR
    assert records[1].getMessage().startswith("audit_write_failed event=login.failure")
