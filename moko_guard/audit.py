"""Audit events: one record shape for the store and the structured log.

Every string field has its control characters escaped (``\\n`` becomes
``\\x0a``) and is cut to its column's length, so a value sent by a client or a
provider can neither forge a log line nor break the table.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from .errors import StoreError
from .store import Store, utcnow

logger = logging.getLogger("moko_guard.audit")

EventName = Literal[
    "login.success", "login.failure", "user.provisioned", "identity.linked",
    "identity.unlinked", "session.revoked", "sign_out", "access.denied", "secret.changed",
    "user.disabled", "user.enabled",
]
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_LIMITS = {"reason": 64, "provider": 40, "subject": 255, "email": 320, "client_ip": 64,
           "user_agent": 512, "request_id": 64, "detail": 1000}


def escape_control(value: str) -> str:
    """Replace each control character with a visible ``\\xNN`` (or ``\\uNNNN``) escape."""

    def _escape(match: re.Match[str]) -> str:
        code = ord(match.group(0))
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    # Backslashes are doubled first, so a typed "\x0a" stays apart from an escaped newline.
    return _CONTROL_RE.sub(_escape, value.replace("\\", "\\\\"))


@dataclass(frozen=True)
class AuditEvent:
    event: EventName
    outcome: Literal["success", "failure", "info"]
    reason: str | None = None
    provider: str | None = None
    subject: str | None = None
    user_id: int | None = None
    email: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    detail: str | None = None

    def cleaned(self) -> dict[str, Any]:
        values: dict[str, Any] = asdict(self)
        for name, limit in _LIMITS.items():
            value = values.get(name)
            if isinstance(value, str):
                values[name] = escape_control(value)[:limit]
        return values


class Auditor:
    """Writes audit events to the store and to the ``moko_guard.audit`` logger."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def record(self, event: AuditEvent, at: datetime | None = None) -> None:
        values = self.row(event, at)
        self.log(values)
        try:
            await self.store.add_audit(values)
        except StoreError as exc:
            # The log line above already carries the event; the request goes on.
            logger.error("audit_write_failed event=%s error=%s", values["event"], exc.detail)

    def row(self, event: AuditEvent, at: datetime | None = None) -> dict[str, Any]:
        """Return the store row of ``event``: cleaned fields and the time (default now, UTC)."""
        values = event.cleaned()
        values["at"] = at or utcnow()
        return values

    def log(self, values: dict[str, Any]) -> None:
        """Write one audit row to the ``moko_guard.audit`` logger."""
        level = logging.INFO if values["outcome"] != "failure" else logging.WARNING
        logger.log(
            level,
            "audit event=%s outcome=%s reason=%s provider=%s user_id=%s ip=%s request_id=%s",
            values["event"], values["outcome"], values["reason"], values["provider"],
            values["user_id"], values["client_ip"], values["request_id"],
            extra={"audit": {k: v for k, v in values.items() if k != "at"}},
        )
