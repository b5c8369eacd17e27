"""Tests of client address, scheme and host resolution in moko_guard/forwarding.py."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from moko_guard.forwarding import Network, is_trusted, request_info

PROXY = "127.0.0.2"
TRUSTED: list[Network] = [ipaddress.ip_network("127.0.0.2/32"), ipaddress.ip_network("::1/128")]
CLIENT = "198.51.100.7"


def make_scope(peer: str | None = PROXY, headers: dict[str, str] | None = None,
               scheme: str = "http") -> dict[str, Any]:
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
           for name, value in (headers or {}).items()]
    return {
        "type": "http",
        "scheme": scheme,
        "client": (peer, 50000) if peer is not None else None,
        "headers": raw,
    }


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "moko_guard.forwarding" and record.levelno == logging.WARNING]


# --- is_trusted ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        pytest.param(PROXY, True, id="listed-ipv4"),
        pytest.param("::1", True, id="listed-ipv6"),
        pytest.param("[::1]", True, id="bracketed-ipv6"),
        pytest.param("127.0.0.3", False, id="unlisted"),
        pytest.param("testclient", False, id="not-an-address"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="missing"),
    ],
)
def test_is_trusted_only_for_listed_address(peer: str | None, expected: bool) -> None:
    trusted = is_trusted(peer, TRUSTED)

    assert trusted is expected


def test_empty_trust_list_trusts_nobody() -> None:
    trusted = is_trusted(PROXY, [])

    assert trusted is False


# --- trusted proxy -----------------------------------------------------------------


def test_trusted_proxy_sets_scheme_host_and_client() -> None:
    scope = make_scope(headers={
        "Host": "guard.internal", "X-Forwarded-Proto": "HTTPS, http",
        "X-Forwarded-Host": "crm.example.com, other.example", "X-Forwarded-For": CLIENT,
    })

    info = request_info(scope, TRUSTED)

    assert info.trusted_peer is True
    assert info.scheme == "https"
    assert info.host == "crm.example.com"
    assert info.client_ip == CLIENT
    assert info.peer == PROXY


def test_unknown_forwarded_proto_keeps_connection_scheme() -> None:
    scope = make_scope(headers={"X-Forwarded-Proto": "gopher"}, scheme="https")

    info = request_info(scope, TRUSTED)

    assert info.scheme == "https"


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        pytest.param(f"{CLIENT}, 127.0.0.2", CLIENT, id="trusted-hop-skipped"),
        pytest.param(f"203.0.113.9, {CLIENT}", CLIENT, id="right-most-untrusted"),
        pytest.param(f" {CLIENT} ,::1 ", CLIENT, id="spaces-and-ipv6-hop"),
    ],
)
def test_client_is_right_most_untrusted_forwarded_address(chain: str, expected: str) -> None:
    scope = make_scope(headers={"X-Forwarded-For": chain})

    info = request_info(scope, TRUSTED)

    assert info.client_ip == expected


@pytest.mark.parametrize(
    "chain",
    [f"{CLIENT}, not-an-address", "unknown", f"{CLIENT}, , 127.0.0.2"],
    ids=["invalid-hop", "obfuscated-name", "empty-hop"],
)
def test_invalid_forwarded_for_falls_back_to_peer(chain: str) -> None:
    scope = make_scope(headers={"X-Forwarded-For": chain, "X-Real-IP": "203.0.113.9"})

    info = request_info(scope, TRUSTED)

    assert info.client_ip == PROXY


def test_trusted_only_chain_uses_real_ip() -> None:
    scope = make_scope(headers={"X-Forwarded-For": "127.0.0.2, ::1", "X-Real-IP": CLIENT})

    info = request_info(scope, TRUSTED)

    assert info.client_ip == CLIENT


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Forwarded-For": "127.0.0.2"}, {"X-Real-IP": "not-an-address"}],
    ids=["no-headers", "only-trusted-hops", "invalid-real-ip"],
)
def test_trusted_proxy_without_client_address_gives_peer(headers: dict[str, str]) -> None:
    scope = make_scope(headers=headers)

    info = request_info(scope, TRUSTED)

    assert info.client_ip == PROXY


# --- untrusted peer ----------------------------------------------------------------


def test_untrusted_peer_forwarded_headers_ignored() -> None:
    scope = make_scope(peer=CLIENT, headers={
        "Host": "crm.example.com", "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "evil.example", "X-Forwarded-For": "203.0.113.9",
        "X-Real-IP": "203.0.113.9",
    })

    info = request_info(scope, TRUSTED)

    assert info.trusted_peer is False
    assert info.scheme == "http"
    assert info.host == "crm.example.com"
    assert info.client_ip == CLIENT


def test_scope_without_client_has_no_address() -> None:
    scope = make_scope(peer=None, headers={"X-Forwarded-For": CLIENT})

    info = request_info(scope, TRUSTED)

    assert info.peer is None
    assert info.client_ip is None
    assert info.trusted_peer is False


def test_untrusted_forwarding_headers_warned_once_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="moko_guard.forwarding")
    scope = make_scope(peer=CLIENT, headers={
        "X-Forwarded-Proto": "https", "X-Original-URI": "/admin?token=secret-value",
    })

    request_info(scope, TRUSTED)
    request_info(scope, TRUSTED)

    messages = warnings_of(caplog)
    assert messages == [
        f"untrusted_forwarded_header name=X-Forwarded-Proto peer={CLIENT}",
        f"untrusted_forwarded_header name=X-Original-URI peer={CLIENT}",
    ]
    assert not any("secret-value" in message for message in messages)


def test_untrusted_client_address_headers_not_warned(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="moko_guard.forwarding")
    scope = make_scope(peer=CLIENT, headers={"X-Forwarded-For": "203.0.113.9",
                                             "X-Real-IP": "203.0.113.9"})

    request_info(scope, TRUSTED)

    assert warnings_of(caplog) == []
    assert "state" not in scope
