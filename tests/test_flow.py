"""Tests of the sign-in flow state in moko_guard/flow.py: state, nonce, PKCE and resume."""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import pytest

from moko_guard.errors import LoginError
from moko_guard.flow import (
    FLOW_COOKIE_PREFIX,
    FLOW_LIFETIME,
    FLOW_PURPOSE,
    FlowManager,
    FlowState,
    code_challenge,
)
from moko_guard.sealing import Sealer
from moko_guard.sessions import SESSION_PURPOSE

SECRET = "flow-test-secret-" + "x" * 32
OTHER_SECRET = "other-test-secret-" + "y" * 32
START = 1_700_000_000.0
STATE_RE = re.compile(r"^[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{32}$")
# RFC 7636 section 4.1: code_verifier = 43*128unreserved
VERIFIER_RE = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")


class FakeClock:
    def __init__(self, start: float = START) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sealer() -> Sealer:
    return Sealer([SECRET])


@pytest.fixture
def flows(sealer: Sealer, clock: FakeClock) -> FlowManager:
    return FlowManager(sealer, clock)


def assert_login_error(error: LoginError, reason: str) -> None:
    assert error.reason == reason
    assert error.status == 400


def sealed_payload(flow: FlowState, **changes: Any) -> dict[str, Any]:
    """Return the payload ``FlowManager.seal`` writes, with ``changes`` applied.

    A change to ``None`` removes the key, except for ``l`` (the linked user id).
    """
    payload: dict[str, Any] = {
        "a": flow.attempt_id, "s": flow.state, "n": flow.nonce, "v": flow.code_verifier,
        "p": flow.provider, "r": flow.redirect_to, "e": int(flow.expires_at),
        "l": flow.link_user_id,
    }
    payload.update(changes)
    return {key: value for key, value in payload.items() if value is not None or key == "l"}


# --- begin -------------------------------------------------------------------------


def test_begin_state_has_attempt_id_prefix(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/deals")

    assert STATE_RE.match(flow.state)
    assert flow.state.split(".", 1)[0] == flow.attempt_id
    assert FlowManager.attempt_id_of(flow.state) == flow.attempt_id
    assert flow.cookie_name == f"{FLOW_COOKIE_PREFIX}_{flow.attempt_id}"


def test_begin_values_are_fresh_and_long(flows: FlowManager, clock: FakeClock) -> None:
    first = flows.begin("idp", "/deals")
    second = flows.begin("idp", "/deals")

    assert first.attempt_id != second.attempt_id
    assert first.state != second.state
    assert first.nonce != second.nonce
    assert first.code_verifier != second.code_verifier
    assert len(first.nonce) >= 32
    assert VERIFIER_RE.match(first.code_verifier)
    assert first.expires_at == clock.now + FLOW_LIFETIME
    assert first.provider == "idp"
    assert first.redirect_to == "/deals"


def test_code_challenge_matches_rfc7636_example() -> None:
    # RFC 7636 appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"

    challenge = code_challenge(verifier)

    assert challenge == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_code_challenge_of_flow_is_unpadded_s256(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/")

    challenge = code_challenge(flow.code_verifier)

    digest = hashlib.sha256(flow.code_verifier.encode("ascii")).digest()
    assert challenge == base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
    assert "=" not in challenge
    assert len(challenge) == 43


# --- resume: success ---------------------------------------------------------------


def test_resume_returns_sealed_flow(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/deals?id=5", link_user_id=7)
    sealed = flows.seal(flow)

    resumed = flows.resume(flow.state, sealed)

    assert resumed.attempt_id == flow.attempt_id
    assert resumed.state == flow.state
    assert resumed.nonce == flow.nonce
    assert resumed.code_verifier == flow.code_verifier
    assert resumed.provider == "idp"
    assert resumed.redirect_to == "/deals?id=5"
    assert resumed.link_user_id == 7


def test_sealed_flow_hides_verifier_and_nonce(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/deals")

    sealed = flows.seal(flow)

    raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
    assert flow.code_verifier.encode() not in raw
    assert flow.nonce.encode() not in raw
    assert b"/deals" not in raw


def test_resume_just_before_expiry_succeeds(flows: FlowManager, clock: FakeClock) -> None:
    flow = flows.begin("idp", "/")
    sealed = flows.seal(flow)
    clock.advance(FLOW_LIFETIME - 1)

    resumed = flows.resume(flow.state, sealed)

    assert resumed.attempt_id == flow.attempt_id


def test_parallel_flows_resume_independently(flows: FlowManager) -> None:
    first = flows.begin("idp", "/one")
    second = flows.begin("idp", "/two")
    first_sealed, second_sealed = flows.seal(first), flows.seal(second)

    resumed_second = flows.resume(second.state, second_sealed)
    resumed_first = flows.resume(first.state, first_sealed)

    assert resumed_second.redirect_to == "/two"
    assert resumed_first.redirect_to == "/one"


# --- resume: state -----------------------------------------------------------------


def test_resume_rejects_wrong_state(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/")
    forged = f"{flow.attempt_id}.{'A' * 32}"

    with pytest.raises(LoginError) as caught:
        flows.resume(forged, flows.seal(flow))

    assert_login_error(caught.value, "state_mismatch")


def test_resume_rejects_state_of_other_flow(flows: FlowManager) -> None:
    mine = flows.begin("idp", "/")
    other = flows.begin("idp", "/")

    with pytest.raises(LoginError) as caught:
        flows.resume(other.state, flows.seal(mine))

    assert_login_error(caught.value, "state_mismatch")


@pytest.mark.parametrize(
    "state",
    [None, "", "garbage", "a.b", "x" * 500, "A" * 12 + "." + "B" * 31, "A" * 12 + "." + "B" * 33,
     "A" * 11 + "." + "B" * 32, "A" * 12 + "." + "B" * 31 + "=", "A" * 12 + "." + "B" * 31 + "\n",
     "A" * 12 + "/" + "B" * 32, "A" * 12 + ".." + "B" * 31, "\u00e9" * 12 + "." + "B" * 32],
    ids=["none", "empty", "garbage", "two_short_parts", "long", "random_too_short",
         "random_too_long", "attempt_too_short", "padding_char", "trailing_newline",
         "slash_separator", "double_dot", "non_ascii_attempt"],
)
def test_resume_rejects_missing_or_malformed_state(
    flows: FlowManager, state: str | None
) -> None:
    flow = flows.begin("idp", "/")

    with pytest.raises(LoginError) as caught:
        flows.resume(state, flows.seal(flow))

    assert_login_error(caught.value, "state_mismatch")


def test_state_with_trailing_newline_has_no_attempt_id() -> None:
    state = "A" * 12 + "." + "B" * 32 + "\n"

    attempt_id = FlowManager.attempt_id_of(state)

    assert attempt_id is None


# --- resume: cookie ----------------------------------------------------------------


@pytest.mark.parametrize("sealed", [None, ""], ids=["none", "empty"])
def test_resume_rejects_missing_cookie(flows: FlowManager, sealed: str | None) -> None:
    flow = flows.begin("idp", "/")

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, sealed)

    assert_login_error(caught.value, "state_mismatch")


def test_resume_rejects_tampered_cookie(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/")
    sealed = flows.seal(flow)
    raw = bytearray(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4)))
    raw[len(raw) // 2] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode("ascii").rstrip("=")

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, tampered)

    assert_login_error(caught.value, "state_mismatch")


def test_resume_rejects_session_sealed_cookie(flows: FlowManager, sealer: Sealer) -> None:
    flow = flows.begin("idp", "/")
    foreign = sealer.seal(sealed_payload(flow), SESSION_PURPOSE)

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, foreign)

    assert_login_error(caught.value, "state_mismatch")


def test_resume_rejects_cookie_sealed_with_other_secret(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/")
    foreign = Sealer([OTHER_SECRET]).seal(sealed_payload(flow), FLOW_PURPOSE)

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, foreign)

    assert_login_error(caught.value, "state_mismatch")


@pytest.mark.parametrize(
    "changes",
    [{"s": None}, {"n": None}, {"e": None}, {"e": "soon"}, {"e": [1]}, {"l": "seven"},
     {"l": [7]}],
    ids=["missing_state", "missing_nonce", "missing_expiry", "expiry_text", "expiry_list",
         "link_user_text", "link_user_list"],
)
def test_resume_rejects_malformed_sealed_payload(
    flows: FlowManager, sealer: Sealer, changes: dict[str, Any]
) -> None:
    flow = flows.begin("idp", "/")
    sealed = sealer.seal(sealed_payload(flow, **changes), FLOW_PURPOSE)

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, sealed)

    assert_login_error(caught.value, "state_mismatch")


# --- resume: expiry and replay -----------------------------------------------------


def test_resume_rejects_expired_flow(flows: FlowManager, clock: FakeClock) -> None:
    flow = flows.begin("idp", "/")
    sealed = flows.seal(flow)
    clock.advance(FLOW_LIFETIME + 1)

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, sealed)

    assert_login_error(caught.value, "flow_expired")


def test_resume_rejects_replayed_attempt(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/")
    sealed = flows.seal(flow)
    flows.resume(flow.state, sealed)

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, sealed)

    assert_login_error(caught.value, "flow_replayed")


def test_replay_after_expiry_still_rejected(flows: FlowManager, clock: FakeClock) -> None:
    flow = flows.begin("idp", "/")
    sealed = flows.seal(flow)
    flows.resume(flow.state, sealed)
    clock.advance(FLOW_LIFETIME + 1)

    with pytest.raises(LoginError) as caught:
        flows.resume(flow.state, sealed)

    assert_login_error(caught.value, "flow_expired")


def test_failed_resume_does_not_consume_attempt(flows: FlowManager) -> None:
    flow = flows.begin("idp", "/")
    sealed = flows.seal(flow)
    with pytest.raises(LoginError):
        flows.resume(f"{flow.attempt_id}.{'A' * 32}", sealed)

    resumed = flows.resume(flow.state, sealed)

    assert resumed.attempt_id == flow.attempt_id


def test_expired_attempts_pruned_in_expiry_order(flows: FlowManager, clock: FakeClock) -> None:
    """Consumed attempts are forgotten once expired, whatever order they were consumed in."""
    late = flows.begin("idp", "/")
    clock.advance(60)
    early_deadline = flows.begin("idp", "/")
    early_deadline = FlowState(**{**early_deadline.__dict__, "expires_at": late.expires_at - 30})
    flows.resume(early_deadline.state, flows.seal(early_deadline))
    flows.resume(late.state, flows.seal(late))
    assert len(flows._consumed) == 2

    clock.now = late.expires_at - 1
    fresh = flows.begin("idp", "/")
    flows.resume(fresh.state, flows.seal(fresh))

    # Only the attempt whose deadline passed is gone; a replay of the other is still refused.
    assert early_deadline.attempt_id not in flows._consumed
    assert late.attempt_id in flows._consumed
    with pytest.raises(LoginError) as caught:
        flows.resume(late.state, flows.seal(late))
    assert_login_error(caught.value, "flow_replayed")
