"""Tests of session cookies and revocation in moko_guard/sessions.py, on a real SQLite store."""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from moko_guard import sessions as sessions_module
from moko_guard.errors import LoginError, StoreError
from moko_guard.flow import FLOW_PURPOSE
from moko_guard.sealing import Sealer
from moko_guard.sessions import (
    MAX_SESSION_COOKIE_VALUE,
    SESSION_PURPOSE,
    RevocationList,
    SessionManager,
)
from moko_guard.store import Store, UserRecord

pytestmark = pytest.mark.anyio

OLD_SECRET = "old-session-secret-" + "o" * 32
NEW_SECRET = "new-session-secret-" + "n" * 32
LIFETIME = 3600.0


class FakeClock:
    """A wall clock that moves only when a test advances it.

    It starts at the real time because the store compares session expiry with
    the real UTC time when it lists revocations.
    """

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'guard.db'}"


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(database_url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def user(store: Store) -> UserRecord:
    return await create_user(store, "alice")


@pytest.fixture
def sessions(store: Store, clock: FakeClock) -> SessionManager:
    return SessionManager([OLD_SECRET], store, lifetime=LIFETIME, clock=clock)


async def create_user(store: Store, name: str, roles: tuple[str, ...] = ("user",)) -> UserRecord:
    email = f"{name}@example.com"
    record, created = await store.create_user_with_identity(
        username=email, email=email, display_name=name.title(), roles=roles,
        provider="idp", subject=f"{name}-sub", identity_email=email,
    )
    assert created
    return record


async def issue(sessions: SessionManager, user: UserRecord) -> str:
    cookie, _ = await sessions.issue(user, "idp", user.username, client_ip="192.0.2.10",
                                     user_agent="pytest")
    return cookie


def flip_byte(sealed: str, index: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4)))
    raw[index] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).decode("ascii").rstrip("=")


# --- issue and check ---------------------------------------------------------------


async def test_issued_cookie_checks_as_principal(
    sessions: SessionManager, user: UserRecord, clock: FakeClock
) -> None:
    cookie, principal = await sessions.issue(user, "idp", "alice", client_ip=None, user_agent=None)

    check = sessions.check(cookie)

    assert check.reason is None
    assert check.principal is not None
    assert check.principal.session_id == principal.session_id
    assert check.principal.user_id == user.id
    assert check.principal.username == "alice@example.com"
    assert check.principal.email == "alice@example.com"
    assert check.principal.roles == ("user",)
    assert check.principal.provider == "idp"
    assert check.principal.preferred_username == "alice"
    assert check.principal.expires_at == pytest.approx(clock.now + LIFETIME, abs=1)


async def test_issue_records_active_session(
    sessions: SessionManager, store: Store, user: UserRecord
) -> None:
    _, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)

    active = await store.is_session_active(principal.session_id)

    assert active is True


@pytest.mark.parametrize("cookie", [None, ""], ids=["none", "empty"])
async def test_check_without_cookie_has_no_reason(
    sessions: SessionManager, cookie: str | None
) -> None:
    check = sessions.check(cookie)

    assert check.principal is None
    assert check.reason is None


async def test_expired_session_rejected(
    sessions: SessionManager, user: UserRecord, clock: FakeClock
) -> None:
    cookie = await issue(sessions, user)
    clock.advance(LIFETIME + 1)

    check = sessions.check(cookie)

    assert check.principal is None
    assert check.reason == "expired"


async def test_session_valid_until_lifetime_ends(
    sessions: SessionManager, user: UserRecord, clock: FakeClock
) -> None:
    cookie = await issue(sessions, user)
    clock.advance(LIFETIME - 2)

    check = sessions.check(cookie)

    assert check.principal is not None


async def test_revoked_session_rejected(
    sessions: SessionManager, store: Store, user: UserRecord
) -> None:
    cookie, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)

    await sessions.revoke(principal)

    check = sessions.check(cookie)
    assert check.principal is None
    assert check.reason == "revoked"
    assert await store.is_session_active(principal.session_id) is False


async def test_tampered_cookie_rejected_at_every_byte(
    sessions: SessionManager, user: UserRecord
) -> None:
    cookie = await issue(sessions, user)
    length = len(base64.urlsafe_b64decode(cookie + "=" * (-len(cookie) % 4)))

    reasons = {sessions.check(flip_byte(cookie, index)).reason for index in range(length)}

    assert reasons == {"tampered"}


@pytest.mark.parametrize(
    "cookie", ["garbage", "A" * 5000, "!!!!", "\u00e9" * 40],
    ids=["garbage", "oversized", "punctuation", "non_ascii"],
)
async def test_malformed_cookie_rejected(sessions: SessionManager, cookie: str) -> None:
    check = sessions.check(cookie)

    assert check.principal is None
    assert check.reason == "tampered"


async def test_flow_sealed_value_rejected_as_session(
    sessions: SessionManager, user: UserRecord
) -> None:
    cookie = await issue(sessions, user)
    payload = sessions.sealer.open(cookie, SESSION_PURPOSE)
    foreign = sessions.sealer.seal(payload, FLOW_PURPOSE)

    check = sessions.check(foreign)

    assert check.principal is None
    assert check.reason == "tampered"


@pytest.mark.parametrize(
    "changes",
    [{"sid": None}, {"uid": None}, {"uid": "seven"}, {"rol": None}, {"rol": 5},
     {"exp": None}, {"exp": "later"}, {"prv": None}],
    ids=["missing_sid", "missing_uid", "uid_text", "missing_roles", "roles_number",
         "missing_exp", "exp_text", "missing_provider"],
)
async def test_authentic_malformed_payload_rejected(
    sessions: SessionManager, user: UserRecord, changes: dict[str, Any]
) -> None:
    cookie = await issue(sessions, user)
    payload = sessions.sealer.open(cookie, SESSION_PURPOSE)
    payload.update(changes)
    forged = sessions.sealer.seal(
        {key: value for key, value in payload.items() if value is not None}, SESSION_PURPOSE
    )

    check = sessions.check(forged)

    assert check.principal is None
    assert check.reason == "tampered"


# --- key rotation ------------------------------------------------------------------


async def test_cookie_opens_after_new_secret_put_first(
    sessions: SessionManager, store: Store, user: UserRecord, clock: FakeClock
) -> None:
    cookie = await issue(sessions, user)
    rotated = SessionManager([NEW_SECRET, OLD_SECRET], store, lifetime=LIFETIME, clock=clock)

    check = rotated.check(cookie)

    assert check.principal is not None
    assert check.principal.user_id == user.id


async def test_rotate_keeps_old_cookies_open(sessions: SessionManager, user: UserRecord) -> None:
    cookie = await issue(sessions, user)

    sessions.rotate([NEW_SECRET, OLD_SECRET])

    assert sessions.check(cookie).principal is not None
    new_cookie = await issue(sessions, user)
    assert Sealer([NEW_SECRET]).open(new_cookie, SESSION_PURPOSE)["uid"] == user.id


async def test_rotate_without_old_secret_rejects_old_cookies(
    sessions: SessionManager, user: UserRecord
) -> None:
    cookie = await issue(sessions, user)

    sessions.rotate([NEW_SECRET])

    assert sessions.check(cookie).reason == "tampered"


# --- revocation list ---------------------------------------------------------------


def test_revocation_list_prunes_only_expired_entries(clock: FakeClock) -> None:
    revoked = RevocationList(clock)
    revoked.add("ended", clock.now + 10)
    revoked.add("boundary", clock.now + 50)
    revoked.add("live", clock.now + 100)
    clock.advance(50)

    revoked.prune()

    assert "ended" not in revoked
    assert "boundary" in revoked
    assert "live" in revoked
    assert len(revoked) == 2


async def test_revoke_user_ends_all_their_sessions(
    sessions: SessionManager, store: Store, user: UserRecord
) -> None:
    first = await issue(sessions, user)
    second = await issue(sessions, user)
    bob = await create_user(store, "bob")
    other = await issue(sessions, bob)

    ended = await sessions.revoke_user(user.id)

    assert len(ended) == 2
    assert sessions.check(first).reason == "revoked"
    assert sessions.check(second).reason == "revoked"
    assert sessions.check(other).principal is not None


async def test_poll_picks_up_revocation_from_other_replica(
    sessions: SessionManager, database_url: str, user: UserRecord
) -> None:
    await sessions.poll_revocations()
    cookie, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)
    replica = Store(database_url)
    await replica.open()
    try:
        assert await replica.revoke_session(principal.session_id) is True
    finally:
        await replica.close()
    assert sessions.check(cookie).principal is not None

    await sessions.poll_revocations()

    check = sessions.check(cookie)
    assert check.principal is None
    assert check.reason == "revoked"


async def test_first_poll_loads_earlier_revocations(
    store: Store, database_url: str, user: UserRecord, clock: FakeClock
) -> None:
    writer = SessionManager([OLD_SECRET], store, lifetime=LIFETIME, clock=clock)
    cookie, principal = await writer.issue(user, "idp", None, client_ip=None, user_agent=None)
    await store.revoke_session(principal.session_id)
    replica_store = Store(database_url)
    await replica_store.open()
    replica = SessionManager([OLD_SECRET], replica_store, lifetime=LIFETIME, clock=clock)

    try:
        await replica.poll_revocations()
        check = replica.check(cookie)
    finally:
        await replica_store.close()

    assert check.reason == "revoked"


async def test_poll_prunes_expired_revocations(
    sessions: SessionManager, clock: FakeClock
) -> None:
    sessions.revoked.add("long-gone", clock.now - 10)
    sessions.revoked.add("still-live", clock.now + 10)

    await sessions.poll_revocations()

    assert "long-gone" not in sessions.revoked
    assert "still-live" in sessions.revoked


async def test_background_poller_picks_up_revocation(
    store: Store, database_url: str, user: UserRecord, clock: FakeClock
) -> None:
    sessions = SessionManager([OLD_SECRET], store, lifetime=LIFETIME, poll_interval=0.05,
                              clock=clock)
    cookie, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)
    await sessions.start()
    replica = Store(database_url)
    await replica.open()

    try:
        await replica.revoke_session(principal.session_id)
        with anyio.fail_after(5):
            while sessions.check(cookie).principal is not None:
                await anyio.sleep(0.05)
    finally:
        await sessions.stop()
        await replica.close()

    assert sessions.check(cookie).reason == "revoked"


async def test_poller_survives_failed_poll(
    store: Store, database_url: str, user: UserRecord, clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="moko_guard.sessions")
    sessions = SessionManager([OLD_SECRET], store, lifetime=LIFETIME, poll_interval=0.02,
                              clock=clock)
    cookie, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)
    await sessions.start()
    read_revocations = store.revoked_sessions_since
    failures = 0

    async def failing_then_working(since: datetime | None) -> list[tuple[str, datetime, datetime]]:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise StoreError("revoked_sessions_since", "database is locked")
        return await read_revocations(since)

    monkeypatch.setattr(store, "revoked_sessions_since", failing_then_working)
    replica = Store(database_url)
    await replica.open()

    try:
        await replica.revoke_session(principal.session_id)
        with anyio.fail_after(5):
            while sessions.check(cookie).principal is not None:
                await anyio.sleep(0.02)
    finally:
        await sessions.stop()
        await replica.close()

    assert failures == 2
    logged = [record.getMessage() for record in caplog.records
              if record.name == "moko_guard.sessions"]
    assert logged == ["revocation_poll_failed", "revocation_poll_failed"]
    assert sessions.check(cookie).reason == "revoked"


async def test_stop_without_start_does_nothing(sessions: SessionManager) -> None:
    await sessions.stop()
    await sessions.stop()

    assert sessions._poller is None


async def test_start_twice_keeps_one_poller(sessions: SessionManager) -> None:
    await sessions.start()
    first = sessions._poller

    try:
        await sessions.start()
        second = sessions._poller
    finally:
        await sessions.stop()

    assert first is not None
    assert second is first
    assert first.cancelled()


# --- opened cookie cache -----------------------------------------------------------


async def test_opened_cookie_cache_drops_oldest_entry_when_full(
    sessions: SessionManager, user: UserRecord, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions_module, "OPENED_COOKIE_CACHE_SIZE", 2)
    cookies = [await issue(sessions, user) for _ in range(3)]

    checks = [sessions.check(cookie) for cookie in cookies]

    assert all(check.principal is not None for check in checks)
    assert list(sessions._opened) == cookies[1:]
    assert sessions.check(cookies[0]).principal is not None
    assert list(sessions._opened) == [cookies[2], cookies[0]]


async def test_revocation_applies_to_cached_cookie(
    sessions: SessionManager, user: UserRecord
) -> None:
    cookie, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)
    assert sessions.check(cookie).principal is not None

    await sessions.revoke(principal)

    assert sessions.check(cookie).reason == "revoked"


# --- cookie size -------------------------------------------------------------------


async def test_oversized_session_rejected_before_store_write(
    sessions: SessionManager, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="moko_guard.sessions")
    roles = tuple(f"crm-role-{index:04d}" for index in range(300))
    crowded = await create_user(store, "carol", roles=roles)

    with pytest.raises(LoginError) as caught:
        await sessions.issue(crowded, "idp", None, client_ip=None, user_agent=None)

    assert caught.value.reason == "session_too_large"
    assert await store.count_active_sessions() == 0
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("session_too_large ")
    assert f"limit={MAX_SESSION_COOKIE_VALUE} " in messages[0]


async def test_session_just_under_cookie_limit_issued(
    sessions: SessionManager, store: Store
) -> None:
    roles = tuple(f"crm-role-{index:04d}" for index in range(100))
    busy = await create_user(store, "dave", roles=roles)

    cookie, _ = await sessions.issue(busy, "idp", None, client_ip=None, user_agent=None)

    assert len(cookie) <= MAX_SESSION_COOKIE_VALUE
    assert sessions.check(cookie).principal is not None


# --- revocation from elsewhere -----------------------------------------------------


async def test_mark_revoked_rejects_cookie_at_once(
    sessions: SessionManager, user: UserRecord, clock: FakeClock
) -> None:
    cookie, principal = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)
    kept_cookie, _ = await sessions.issue(user, "idp", None, client_ip=None, user_agent=None)

    sessions.mark_revoked([principal.session_id])

    assert sessions.check(cookie).reason == "revoked"
    assert sessions.check(kept_cookie).principal is not None
    clock.advance(LIFETIME - 1)
    sessions.revoked.prune()
    assert sessions.check(cookie).reason == "revoked"


async def test_poll_runs_every_hook(sessions: SessionManager) -> None:
    calls: list[str] = []

    async def first_hook() -> None:
        calls.append("first")

    async def second_hook() -> None:
        calls.append("second")

    sessions.on_poll.extend([first_hook, second_hook])

    await sessions.poll_revocations()
    await sessions.poll_revocations()

    assert calls == ["first", "second", "first", "second"]
