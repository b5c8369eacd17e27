"""Sign-in flow state: ``state``, ``nonce`` and PKCE (RFC 7636, S256).

Each attempt has its own encrypted cookie ``<prefix>_<attempt id>``, scoped to
the callback path and valid for ten minutes, so parallel tabs do not clash. The
``state`` sent to the provider is ``<attempt id>.<random>``; the callback finds
the cookie by the attempt id, then compares the whole state in constant time.
The callback clears the cookie, and this process remembers consumed attempt
ids until they expire, so a replayed callback fails even with a copied cookie.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import LoginError
from .sealing import Sealer, SealError

FLOW_PURPOSE = "flow"
FLOW_LIFETIME = 600
FLOW_COOKIE_PREFIX = "moko_flow"
_ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_-]{12}$")
_STATE_RE = re.compile(r"^[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{32}$")


def code_challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def cookie_name(attempt_id: str) -> str:
    return f"{FLOW_COOKIE_PREFIX}_{attempt_id}"


@dataclass(frozen=True)
class FlowState:
    attempt_id: str
    state: str
    nonce: str
    code_verifier: str
    provider: str
    redirect_to: str
    expires_at: float
    link_user_id: int | None = None

    @property
    def cookie_name(self) -> str:
        return cookie_name(self.attempt_id)


class FlowManager:
    def __init__(self, sealer: Sealer, clock: Callable[[], float] = time.time) -> None:
        self.sealer = sealer
        self.clock = clock
        self._consumed: dict[str, float] = {}
        # The same entries as a heap by expiry, so pruning looks only at expired ones.
        self._expiries: list[tuple[float, str]] = []

    def begin(self, provider: str, redirect_to: str, link_user_id: int | None = None) -> FlowState:
        attempt_id = secrets.token_urlsafe(9)
        return FlowState(
            attempt_id=attempt_id,
            state=f"{attempt_id}.{secrets.token_urlsafe(24)}",
            nonce=secrets.token_urlsafe(24),
            code_verifier=secrets.token_urlsafe(48),
            provider=provider,
            redirect_to=redirect_to,
            expires_at=self.clock() + FLOW_LIFETIME,
            link_user_id=link_user_id,
        )

    def seal(self, flow: FlowState) -> str:
        payload = {
            "a": flow.attempt_id, "s": flow.state, "n": flow.nonce, "v": flow.code_verifier,
            "p": flow.provider, "r": flow.redirect_to, "e": int(flow.expires_at),
            "l": flow.link_user_id,
        }
        return self.sealer.seal(payload, FLOW_PURPOSE)

    @staticmethod
    def attempt_id_of(state: str | None) -> str | None:
        """Return the attempt id inside a well-formed ``state``, else None."""
        # fullmatch, because "$" in match() also accepts a trailing newline.
        if not state or not _STATE_RE.fullmatch(state):
            return None
        attempt_id = state.split(".", 1)[0]
        return attempt_id if _ATTEMPT_RE.fullmatch(attempt_id) else None

    def _prune(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] < now:
            _, attempt_id = heapq.heappop(expiries)
            del self._consumed[attempt_id]

    def resume(self, state: str | None, sealed: str | None) -> FlowState:
        """Open and consume the flow for a callback, or raise ``LoginError``."""
        attempt_id = self.attempt_id_of(state)
        if attempt_id is None or state is None:
            raise LoginError("state_mismatch", "state is missing or malformed", status=400)
        if not sealed:
            raise LoginError("state_mismatch", "no flow cookie for this state", status=400)
        try:
            data = self.sealer.open(sealed, FLOW_PURPOSE)
            flow = FlowState(
                attempt_id=str(data["a"]), state=str(data["s"]), nonce=str(data["n"]),
                code_verifier=str(data["v"]), provider=str(data["p"]),
                redirect_to=str(data["r"]), expires_at=float(data["e"]),
                link_user_id=int(data["l"]) if data.get("l") is not None else None,
            )
        except (SealError, KeyError, TypeError, ValueError):
            raise LoginError("state_mismatch", "flow cookie is invalid", status=400) from None

        now = self.clock()
        self._prune(now)
        if not hmac.compare_digest(flow.state.encode(), state.encode()):
            raise LoginError("state_mismatch", "state differs from the flow cookie", status=400)
        if now > flow.expires_at:
            raise LoginError("flow_expired", "the sign-in took longer than 10 minutes", status=400)
        if attempt_id in self._consumed:
            raise LoginError("flow_replayed", "this callback was already used", status=400)
        self._consumed[attempt_id] = flow.expires_at
        heapq.heappush(self._expiries, (flow.expires_at, attempt_id))
        return flow
