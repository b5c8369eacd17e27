"""Exceptions raised by moko_guard.

GuardError
 +-- ConfigError        the configuration has one or more problems (all listed at once)
 +-- LoginError         a sign-in attempt failed; carries a machine-readable reason code
 +-- StoreError         the store could not complete an operation
"""

from __future__ import annotations


class GuardError(Exception):
    """Base class of every error moko_guard raises on purpose."""


class ConfigError(GuardError):
    """The configuration is invalid; ``problems`` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        count = len(problems)
        heading = f"the configuration has {count} problem{'s' if count != 1 else ''}:"
        super().__init__("\n".join([heading, *(f"  - {p}" for p in problems)]))


class LoginError(GuardError):
    """A sign-in attempt failed.

    ``reason`` is the code written to the audit log and shown (as plain words) on
    the sign-in page. ``detail`` goes to the operator log and the audit record
    only, never to the browser. It must never contain a token, code or secret.
    """

    def __init__(self, reason: str, detail: str = "", *, status: int = 403,
                 subject: str | None = None, email: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.status = status
        # The provider account the attempt was for, when known, for the audit record.
        self.subject = subject
        self.email = email
        super().__init__(f"{reason}: {detail}" if detail else reason)


class StoreError(GuardError):
    """The store failed or stayed busy past its retries."""

    def __init__(self, operation: str, detail: str = "") -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"store operation {operation!r} failed: {detail}")
