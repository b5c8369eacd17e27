"""Session cookies and their revocation.

The cookie carries the signed-in user sealed with AES-256-GCM (see
``sealing.py``); provider tokens are never put in it. Checking a cookie needs no
database query: revoked session ids live in memory until their sessions would
have expired anyway. This process adds an id at once when it revokes a session,
and every ``revocation_poll_interval`` seconds it reads the revocations other
processes wrote to the store, which bounds how long a revoked cookie keeps
working on another replica.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .errors import LoginError
from .identity import Principal
from .sealing import MAX_SEALED_LENGTH, Sealer, SealError
from .store import SessionRow, Store, UserRecord

logger = logging.getLogger(__name__)

SESSION_PURPOSE = "session"
# RFC 6265 section 6.1 requires browsers to keep cookies of at least 4096 bytes of name,
# value and attributes, and Sealer.open rejects longer values. So a session cookie value
# leaves 512 bytes for the name and the attributes.
MAX_SESSION_COOKIE_VALUE = MAX_SEALED_LENGTH - 512
# Seconds each revocation poll looks back before the previous one, to absorb clock skew
# between processes that share the store.
POLL_LOOKBACK = 60.0

# Maximum number of opened cookies kept by SessionManager.check (a few hundred
# bytes each); the oldest entry is dropped first.
OPENED_COOKIE_CACHE_SIZE = 4096

# The Principal fields a sealed session cookie carries, in the order _open_fields returns them.

@dataclass(frozen=True)
class SessionCheck:
    principal: Principal | None
    reason: str | None  # why the cookie was not accepted: "tampered", "expired", "revoked"


# The refusals are the same for every request, so each is one shared object.
_NO_COOKIE = SessionCheck(None, None)
_TAMPERED = SessionCheck(None, "tampered")
_EXPIRED = SessionCheck(None, "expired")
_REVOKED = SessionCheck(None, "revoked")


@dataclass(frozen=True)
class SessionDraft:
    """A session before its user is known: the store row without the user, and its times."""

    row: SessionRow
    preferred_username: str | None
    issued_at: float  # seconds since the epoch
    expires_at: float


def _timestamp(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


class RevocationList:
    """Session ids revoked before their expiry, kept until that expiry."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._revoked: dict[str, float] = {}
        self._clock = clock

    def add(self, session_id: str, expires_at: float) -> None:
        self._revoked[session_id] = expires_at

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._revoked

    def __len__(self) -> int:
        return len(self._revoked)

    def prune(self) -> None:
        now = self._clock()
        for session_id in [sid for sid, exp in self._revoked.items() if exp < now]:
            del self._revoked[session_id]


class SessionManager:
    def __init__(
        self,
        secrets_: Sequence[str],
        store: Store,
        *,
        lifetime: float,
        poll_interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sealer = Sealer(secrets_)
        self.store = store
        self.lifetime = lifetime
        self.poll_interval = poll_interval
        self.clock = clock
        self.revoked = RevocationList(clock)
        self._last_poll: datetime | None = None
        self._poller: asyncio.Task[None] | None = None
        self.on_poll: list[Callable[[], Awaitable[None]]] = []
        # Cookie value -> its opened fields. Valid only for the sealer that opened them, so a
        # key rotation (a new self.sealer) empties it; expiry and revocation are checked per call.
        self._opened: dict[str, SessionCheck] = {}
        self._opened_by: Sealer | None = None

    def rotate(self, secrets_: Sequence[str]) -> None:
        """Replace the keys; cookies sealed with any of the new secrets still open."""
        self.sealer = Sealer(secrets_)

    async def issue(
        self,
        user: UserRecord,
        provider: str,
        preferred_username: str | None,
        *,
        client_ip: str | None,
        user_agent: str | None,
        provider_session: str | None = None,
    ) -> tuple[str, Principal]:
        """Create a session in the store and return its cookie value and principal.

        Raises ``LoginError("session_too_large")`` before writing anything when the
        sealed cookie would be too long for a browser to keep.
        """
        draft = self.draft(provider, preferred_username, client_ip=client_ip,
                           user_agent=user_agent, provider_session=provider_session)
        sealed, principal = self.seal(draft, user)
        row = draft.row
        await self.store.create_session(
            session_id=row.id, user_id=user.id, provider=row.provider,
            created_at=row.created_at, expires_at=row.expires_at,
            client_ip=row.client_ip, user_agent=row.user_agent, provider_sid=row.provider_sid,
        )
        return sealed, principal

    def draft(
        self,
        provider: str,
        preferred_username: str | None,
        *,
        client_ip: str | None,
        user_agent: str | None,
        provider_session: str | None = None,
    ) -> SessionDraft:
        """Start a session for a user not yet known: a new id, its lifetime and its store row."""
        now = self.clock()
        row = SessionRow(
            id=secrets.token_urlsafe(24), provider=provider, created_at=_timestamp(now),
            expires_at=_timestamp(now + self.lifetime), client_ip=client_ip,
            user_agent=(user_agent or "")[:512] or None, provider_sid=provider_session,
        )
        return SessionDraft(row, preferred_username, now, now + self.lifetime)

    def seal(self, draft: SessionDraft, user: UserRecord) -> tuple[str, Principal]:
        """Return the cookie value and principal of ``draft`` for ``user``, without I/O.

        Raises ``LoginError("session_too_large")`` when the sealed cookie would be
        too long for a browser to keep.
        """
        principal = Principal(
            session_id=draft.row.id,
            user_id=user.id,
            username=user.username,
            email=user.email,
            roles=user.roles,
            provider=draft.row.provider,
            preferred_username=draft.preferred_username,
            issued_at=draft.issued_at,
            expires_at=draft.expires_at,
        )
        payload = {
            "sid": principal.session_id, "uid": user.id, "usr": user.username,
            "eml": user.email, "rol": list(user.roles), "prv": principal.provider,
            "pun": principal.preferred_username, "iat": int(draft.issued_at),
            "exp": int(principal.expires_at),
        }
        sealed = self.sealer.seal(payload, SESSION_PURPOSE)
        if len(sealed) > MAX_SESSION_COOKIE_VALUE:
            # A browser would drop the cookie and send the person back to sign in, in a loop.
            logger.error("session_too_large bytes=%d limit=%d user_id=%d roles=%d", len(sealed),
                         MAX_SESSION_COOKIE_VALUE, user.id, len(user.roles))
            raise LoginError("session_too_large",
                             f"session cookie of {len(sealed)} bytes for {len(user.roles)} roles")
        return sealed, principal

    def _open(self, cookie_value: str) -> SessionCheck:
        """Return the accepted check of a cookie, from the cache when this sealer opened it.

        The check carries the Principal sealed in the cookie; expiry and revocation
        are not part of it. Raises SealError, KeyError, TypeError, ValueError or
        OverflowError for a cookie that does not open or contains a field of the
        wrong type. Only cookies that opened are cached, so a bad cookie costs a
        full open every time.
        """
        if self._opened_by is not self.sealer:
            self._opened.clear()
            self._opened_by = self.sealer
        opened = self._opened.get(cookie_value)
        if opened is not None:
            return opened
        data = self.sealer.open(cookie_value, SESSION_PURPOSE)
        # Principal is frozen and its fields immutable, so requests of one session share it.
        principal = Principal(
            session_id=str(data["sid"]), user_id=int(data["uid"]), username=str(data["usr"]),
            email=data["eml"] if isinstance(data.get("eml"), str) else None,
            roles=tuple(str(r) for r in data["rol"]), provider=str(data["prv"]),
            preferred_username=data["pun"] if isinstance(data.get("pun"), str) else None,
            issued_at=float(data["iat"]), expires_at=float(data["exp"]),
        )
        opened = SessionCheck(principal, None)
        if len(self._opened) >= OPENED_COOKIE_CACHE_SIZE:
            del self._opened[next(iter(self._opened))]
        self._opened[cookie_value] = opened
        return opened

    def check(self, cookie_value: str | None) -> SessionCheck:
        """Open a session cookie; the hot path: no I/O."""
        if not cookie_value:
            return _NO_COOKIE
        try:
            opened = self._open(cookie_value)
        except (SealError, KeyError, TypeError, ValueError, OverflowError):
            return _TAMPERED
        principal = opened.principal
        assert principal is not None
        if self.clock() >= principal.expires_at:
            return _EXPIRED
        if principal.session_id in self.revoked:
            return _REVOKED
        return opened

    async def revoke(self, principal: Principal) -> None:
        self.revoked.add(principal.session_id, principal.expires_at)
        await self.store.revoke_session(principal.session_id)

    async def revoke_user(self, user_id: int) -> list[str]:
        """Revoke every session of a user, here at once and on other replicas by polling."""
        ids = await self.store.revoke_user_sessions(user_id)
        horizon = self.clock() + self.lifetime
        for session_id in ids:
            self.revoked.add(session_id, horizon)
        return ids

    def mark_revoked(self, session_ids: list[str]) -> None:
        """Refuse these sessions here at once (they are already revoked in the store)."""
        horizon = self.clock() + self.lifetime
        for session_id in session_ids:
            self.revoked.add(session_id, horizon)

    async def poll_revocations(self) -> None:
        """Load revocations written since the last poll (by any process)."""
        # Another process's clock may lag ours: look back further than one poll, so its
        # revocations are not missed. Re-adding an id already known is harmless.
        started = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=POLL_LOOKBACK)
        rows = await self.store.revoked_sessions_since(self._last_poll)
        for session_id, expires_at, _revoked_at in rows:
            self.revoked.add(session_id, expires_at.replace(tzinfo=UTC).timestamp())
        self._last_poll = started
        self.revoked.prune()
        for hook in self.on_poll:
            await hook()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll_revocations()
            except Exception:  # noqa: BLE001 - the poller must outlive a store outage
                logger.exception("revocation_poll_failed")

    async def start(self) -> None:
        await self.poll_revocations()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(), name="moko-revocation-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
            self._poller = None
