"""Tests of identity header stripping and building in moko_guard/headers.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from moko_guard.config import HeaderSettings
import moko_guard.headers as headers_module
from moko_guard.headers import IdentityHeaders, header_value, strip_guard_cookies
from moko_guard.identity import Principal

SESSION_COOKIE = "moko_session"
FLOW_COOKIE = "moko_flow_abcdefghijkl"


@pytest.fixture
def identity_headers() -> IdentityHeaders:
    return IdentityHeaders(HeaderSettings(user="X-Crm-User"))


ALICE = Principal(
    session_id="sid-1", user_id=7, username="alice@example.com", email="alice@example.com",
    roles=("user", "sales"), provider="idp", preferred_username="alice",
    issued_at=1_700_000_000.0, expires_at=1_700_028_800.0,
)


def make_principal(**changes: Any) -> Principal:
    return dataclasses.replace(ALICE, **changes)


# --- strip_request -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"x-crm-user", b"X-CRM-USER", b"x_crm_user", b"remote-user", b"Remote_User",
     b"x-forwarded-email", b"X-Auth-Request-Roles", b" x-auth-request-user "],
)
def test_strip_request_removes_identity_header_spellings(
    identity_headers: IdentityHeaders, name: bytes
) -> None:
    headers = [(name, b"admin@example.com"), (b"accept", b"text/html")]

    cleaned = identity_headers.strip_request(headers, SESSION_COOKIE)

    assert cleaned == [(b"accept", b"text/html")]


def test_strip_request_keeps_other_headers_in_order(identity_headers: IdentityHeaders) -> None:
    headers = [(b"host", b"crm.example.com"), (b"x-crm-other", b"1"), (b"accept", b"*/*")]

    cleaned = identity_headers.strip_request(headers, SESSION_COOKIE)

    assert cleaned == headers


def test_strip_request_removes_guard_cookies_and_empty_parts(
    identity_headers: IdentityHeaders,
) -> None:
    cookie = f"{SESSION_COOKIE}=sealed; ; theme=dark;{FLOW_COOKIE}=flow;  ;lang=de;"
    headers = [(b"cookie", cookie.encode("latin-1"))]

    cleaned = identity_headers.strip_request(headers, SESSION_COOKIE)

    assert cleaned == [(b"cookie", b"theme=dark; lang=de")]


@pytest.mark.parametrize(
    "cookie",
    [f"{SESSION_COOKIE}=sealed", f"{SESSION_COOKIE}=sealed; {FLOW_COOKIE}=flow", "", " ; ;"],
    ids=["session-only", "session-and-flow", "empty", "separators-only"],
)
def test_strip_request_drops_cookie_header_left_empty(
    identity_headers: IdentityHeaders, cookie: str
) -> None:
    headers = [(b"Cookie", cookie.encode("latin-1")), (b"accept", b"*/*")]

    cleaned = identity_headers.strip_request(headers, SESSION_COOKIE)

    assert cleaned == [(b"accept", b"*/*")]


def test_guard_cookie_names_compared_exactly() -> None:
    cookie = "moko_sessionx=1; my_moko_session=2; moko_flow=3; moko_flowx_y=4"

    remaining = strip_guard_cookies(cookie, SESSION_COOKIE)

    assert remaining == cookie


# --- build -------------------------------------------------------------------------


def test_build_sets_configured_names(identity_headers: IdentityHeaders) -> None:
    built = identity_headers.build(make_principal())

    assert built == [
        ("X-Crm-User", "alice@example.com"),
        ("X-Auth-Request-Email", "alice@example.com"),
        ("X-Auth-Request-Roles", "user,sales"),
        ("X-Auth-Request-Provider", "idp"),
        ("X-Auth-Request-Preferred-Username", "alice"),
    ]


def test_build_omits_empty_values(identity_headers: IdentityHeaders) -> None:
    principal = make_principal(email=None, roles=(), preferred_username=None)

    built = dict(identity_headers.build(principal))

    assert "X-Auth-Request-Email" not in built
    assert "X-Auth-Request-Roles" not in built
    assert built["X-Auth-Request-Preferred-Username"] == "alice@example.com"


@pytest.mark.parametrize(
    ("preferred_username", "expected"),
    [
        pytest.param("alice\r\nX-Crm-User: admin", "aliceX-Crm-User: admin", id="crlf"),
        pytest.param("Zo\u00eb \u00dcnal", "Zo nal", id="non-ascii"),
        pytest.param("tab\there\x00\x7f", "tabhere", id="controls"),
    ],
)
def test_build_drops_characters_unsafe_in_header_value(
    identity_headers: IdentityHeaders, preferred_username: str, expected: str
) -> None:
    principal = make_principal(preferred_username=preferred_username)

    built = dict(identity_headers.build(principal))

    assert built["X-Auth-Request-Preferred-Username"] == expected


def test_build_raw_lower_cases_names(identity_headers: IdentityHeaders) -> None:
    raw = identity_headers.build_raw(make_principal())

    assert raw[0] == (b"x-crm-user", b"alice@example.com")
    assert all(name == name.lower() for name, _ in raw)


def test_build_raw_reuses_and_bounds_cache(
    identity_headers: IdentityHeaders, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(headers_module, "_RAW_CACHE_SIZE", 2)

    first = identity_headers.build_raw(make_principal(username="a@example.com"))
    again = identity_headers.build_raw(make_principal(username="a@example.com"))
    identity_headers.build_raw(make_principal(username="b@example.com"))
    identity_headers.build_raw(make_principal(username="c@example.com"))
    first.append((b"x-extra", b"1"))

    assert again == first[:-1]
    assert len(identity_headers._raw_cache) == 2
    assert identity_headers.build_raw(make_principal(username="a@example.com")) == again


# --- header_value ------------------------------------------------------------------


def test_header_value_returns_first_match() -> None:
    headers = [(b"host", b"a.example"), (b"host", b"b.example")]

    value = header_value(headers, b"host")

    assert value == "a.example"


def test_header_value_missing_gives_none() -> None:
    value = header_value([(b"accept", b"*/*")], b"host")

    assert value is None


# --- is_identity_header --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("X-Crm-User", True, id="configured"),
        pytest.param(b"x_crm_user", True, id="configured-underscore-bytes"),
        pytest.param("X-Auth-Request-User", True, id="well-known"),
        pytest.param("REMOTE_USER", True, id="well-known-upper-underscore"),
        pytest.param("X-Crm-Username", False, id="longer-name"),
        pytest.param("Content-Type", False, id="ordinary"),
    ],
)
def test_is_identity_header_matches_canonical_name(
    identity_headers: IdentityHeaders, name: str | bytes, expected: bool
) -> None:
    matched = identity_headers.is_identity_header(name)

    assert matched is expected
