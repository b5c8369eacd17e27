"""Property tests of the parsers that read client input: cookies, identity headers, forwarding.

Hypothesis generates the input, and each property must hold for every value,
so a failure prints the smallest input that breaks it. Config parsing has its
own properties in tests/test_config.py, and redirect targets in
tests/test_redirects.py. fuzz/fuzz_parsers.py runs the cookie and redirect
properties at much higher example counts, outside the test suite.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moko_guard.config import HeaderSettings
from moko_guard.flow import FLOW_PURPOSE
from moko_guard.forwarding import Network, request_info
from moko_guard.headers import WELL_KNOWN_IDENTITY_HEADERS, IdentityHeaders, canonical
from moko_guard.sealing import Sealer, SealError
from moko_guard.sessions import SESSION_PURPOSE, SessionManager
from moko_guard.store import Store

SECRET = "property-test-secret-0123456789abcdefghij"
OLD_SECRET = "property-test-old-secret-0123456789abcdef"
SEALER = Sealer([SECRET, OLD_SECRET])
# SessionManager.check does no I/O, so the store is never opened.
SESSIONS = SessionManager([SECRET, OLD_SECRET], Store("sqlite:///:memory:"), lifetime=3600)
VALID_PAYLOAD = {"sid": "session-id-0123", "uid": 7, "usr": "alice@example.com",
                 "eml": "alice@example.com", "rol": ["user"], "prv": "idp", "pun": "alice",
                 "iat": 1_700_000_000, "exp": 4_000_000_000}
VALID_COOKIE = SEALER.seal(VALID_PAYLOAD, SESSION_PURPOSE)
BASE64URL = string.ascii_letters + string.digits + "-_"

IDENTITY_HEADERS = IdentityHeaders(HeaderSettings(user="X-Crm-User"))
BLOCKED_NAMES = sorted({*WELL_KNOWN_IDENTITY_HEADERS, *(n.lower() for n in HeaderSettings(
    user="X-Crm-User").names())})
# RFC 9110 token characters, the ones a header name may contain.
TOKEN_CHARACTERS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits

TRUSTED: list[Network] = [ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("10.0.0.0/8"),
                          ipaddress.ip_network("::1/128")]
FORWARDING_NAMES = [b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                    b"x-forwarded-uri", b"x-original-uri", b"x-real-ip", b"x-request-id", b"host",
                    b"forwarded"]


# --- cookies ---------------------------------------------------------------------------

cookie_text = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=BASE64URL, max_size=300),
    st.text(alphabet=BASE64URL, min_size=4000, max_size=4200),
    st.binary(max_size=200).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
)


@settings(max_examples=500, deadline=None, database=None)
@given(value=cookie_text)
def test_sealer_open_rejects_arbitrary_text(value: str) -> None:
    with pytest.raises(SealError):
        SEALER.open(value, SESSION_PURPOSE)


@settings(max_examples=500, deadline=None, database=None)
@given(value=cookie_text)
def test_session_check_never_accepts_arbitrary_text(value: str) -> None:
    check = SESSIONS.check(value)

    assert check.principal is None
    assert check.reason == ("tampered" if value else None)


def decoded(value: str) -> bytes | None:
    """Return the bytes a base64url value stands for, or None when it is not valid base64url."""
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None


@settings(max_examples=500, deadline=None, database=None)
@given(position=st.integers(min_value=0, max_value=len(VALID_COOKIE) - 1),
       replacement=st.sampled_from(BASE64URL))
def test_altered_cookie_opens_only_as_same_bytes(position: int, replacement: str) -> None:
    # The last base64url character carries unused low bits, so a few changes there decode to
    # the same bytes. Any change to the bytes themselves must fail authentication.
    altered = VALID_COOKIE[:position] + replacement + VALID_COOKIE[position + 1:]

    try:
        payload = SEALER.open(altered, SESSION_PURPOSE)
    except SealError:
        return
    assert decoded(altered) == decoded(VALID_COOKIE)
    assert payload == VALID_PAYLOAD


@settings(max_examples=300, deadline=None, database=None)
@given(cut=st.integers(min_value=0, max_value=len(VALID_COOKIE) - 1),
       extra=st.text(alphabet=BASE64URL, max_size=20))
def test_truncated_or_extended_cookie_rejected(cut: int, extra: str) -> None:
    shortened = VALID_COOKIE[:cut]
    extended = VALID_COOKIE + extra

    assert SESSIONS.check(shortened).principal is None
    if decoded(extended) != decoded(VALID_COOKIE):
        assert SESSIONS.check(extended).principal is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)
# Values at the edges of int(), float() and str(), which generated JSON seldom reaches.
edge_values: st.SearchStrategy[object] = st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400, -(10**400),
                               2**63, "", "1e999", "not a number", [], {}, None, True, False])
session_payloads = st.dictionaries(
    st.sampled_from(sorted(VALID_PAYLOAD)), st.one_of(edge_values, json_values),
    max_size=len(VALID_PAYLOAD),
).map(lambda fields: {**VALID_PAYLOAD, **fields})


@settings(max_examples=500, deadline=None, database=None)
@given(payload=session_payloads)
def test_session_check_never_raises_on_authentic_payload(payload: dict[str, Any]) -> None:
    # Only the guard can seal a cookie, so this payload stands for one written by an older or
    # newer version: a field of an unexpected type must give "tampered", never an exception.
    check = SESSIONS.check(SEALER.seal(payload, SESSION_PURPOSE))

    assert check.reason in (None, "tampered", "expired")
    assert (check.principal is None) == (check.reason is not None)


@settings(max_examples=200, deadline=None, database=None)
@given(payload=session_payloads)
def test_flow_sealed_payload_never_a_session(payload: dict[str, Any]) -> None:
    check = SESSIONS.check(SEALER.seal(payload, FLOW_PURPOSE))

    assert check.principal is None
    assert check.reason == "tampered"


# --- identity headers -----------------------------------------------------------------------


@st.composite
def identity_header_spelling(draw: st.DrawFn) -> str:
    """Draw a blocked header name with each letter in either case and "-" as "-", "_" or "."."""
    name = draw(st.sampled_from(BLOCKED_NAMES))
    characters = [
        draw(st.sampled_from("-_.")) if char == "-" else draw(st.sampled_from([char, char.upper()]))
        for char in name
    ]
    return "".join(characters)


other_header_names = st.text(alphabet=TOKEN_CHARACTERS, min_size=1, max_size=30).filter(
    lambda name: canonical(name) not in IDENTITY_HEADERS.blocked and name.lower() != "cookie")
header_values = st.binary(max_size=40)


def spells_identity_header(name: bytes) -> bool:
    """Return whether ``name`` is a blocked name up to letter case, "_" or "." for "-", and spaces.

    The test's own reading of the rule, so a change to canonical() cannot move both sides.
    """
    text = name.decode("latin-1").strip().lower()
    return re.sub(r"[_.]", "-", text) in BLOCKED_NAMES


@settings(max_examples=500, deadline=None, database=None)
@given(headers=st.lists(st.one_of(
    st.tuples(identity_header_spelling(), header_values, st.just(True)),
    st.tuples(other_header_names, header_values, st.just(False)),
), max_size=12))
def test_strip_request_removes_every_identity_spelling(
    headers: list[tuple[str, bytes, bool]],
) -> None:
    raw = [(name.encode("latin-1"), value) for name, value, _ in headers]

    kept = IDENTITY_HEADERS.strip_request(raw, "moko_session")

    assert kept == [(name.encode("latin-1"), value)
                    for name, value, is_identity in headers if not is_identity]


@settings(max_examples=500, deadline=None, database=None)
@given(names=st.lists(st.text(alphabet=st.characters(max_codepoint=255), max_size=30),
                      max_size=8))
def test_strip_request_decides_on_canonical_name(names: list[str]) -> None:
    raw = [(name.encode("latin-1"), b"value") for name in names if name.lower() != "cookie"]

    kept = IDENTITY_HEADERS.strip_request(raw, "moko_session")

    assert kept == [(name, value) for name, value in raw if not spells_identity_header(name)]
    assert all(canonical(name) not in IDENTITY_HEADERS.blocked for name, _ in kept)


GUARD_COOKIE_NAMES = ["moko_session", "moko_session_0", "moko_session_12", "moko_flow_abc",
                      "moko_flow_"]
APP_COOKIE_NAMES = ["crm_sid", "theme", "moko_sessionx", "moko_flow", "xmoko_session", ""]


@settings(max_examples=300, deadline=None, database=None)
@given(parts=st.lists(st.tuples(
    st.sampled_from([*GUARD_COOKIE_NAMES, *APP_COOKIE_NAMES]),
    st.text(alphabet=BASE64URL + "=", max_size=10)), max_size=6))
def test_strip_request_removes_guard_cookies_only(parts: list[tuple[str, str]]) -> None:
    cookie = "; ".join(f"{name}={value}" for name, value in parts)

    kept = IDENTITY_HEADERS.strip_request([(b"cookie", cookie.encode("latin-1"))], "moko_session")

    sent_to_app = kept[0][1].decode("latin-1") if kept else ""
    names = [part.split("=", 1)[0].strip() for part in sent_to_app.split(";") if part.strip()]
    assert names == [name for name, _ in parts if name not in GUARD_COOKIE_NAMES]


# --- forwarding headers ------------------------------------------------------------------------

peers = st.one_of(
    st.none(),
    st.sampled_from(["127.0.0.2", "10.1.2.3", "::1", "[::1]", "203.0.113.7", "127.0.0.1",
                     "2001:db8::1", "fe80::1%eth0", "unix-socket", ""]),
    st.text(max_size=40),
)
forwarding_headers = st.lists(st.tuples(
    st.one_of(st.sampled_from(FORWARDING_NAMES),
              st.binary(min_size=1, max_size=20)),
    st.one_of(st.binary(max_size=60),
              st.lists(st.sampled_from(["127.0.0.2", "198.51.100.20", "10.0.0.9", "::1", "bad",
                                        " ", "https", "http", "HTTPS", "crm.example.com"]),
                       max_size=4).map(lambda items: ", ".join(items).encode()))),
    max_size=10)


@settings(max_examples=800, deadline=None, database=None)
@given(peer=peers, scheme=st.sampled_from(["http", "https", "ws", "wss", "ftp", ""]),
       headers=forwarding_headers)
def test_request_info_never_raises(peer: str | None, scheme: str,
                                   headers: list[tuple[bytes, bytes]]) -> None:
    scope: dict[str, Any] = {"type": "http", "scheme": scheme, "headers": headers,
                             "client": None if peer is None else (peer, 1234)}

    info = request_info(scope, TRUSTED)

    assert info.scheme in ("http", "https")
    assert info.peer == peer
    host = next((v.decode("latin-1") for k, v in headers if k == b"host"), None)
    if not info.trusted_peer:
        assert info.client_ip == peer
        assert info.scheme == ("https" if scheme in ("https", "wss") else "http")
        assert info.host == host
    elif info.client_ip != peer:
        assert info.client_ip is not None
        ipaddress.ip_address(info.client_ip)
