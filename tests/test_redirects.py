"""Tests of check_redirect against open-redirect payloads and valid targets.

The payload corpus is tests/data/open_redirects.txt. Each line is the value of
the rd query parameter after the web framework has URL-decoded it once.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moko_guard.redirects import MAX_TARGET_LENGTH, RedirectPolicy, check_redirect

CORPUS_PATH = Path(__file__).parent / "data" / "open_redirects.txt"
MIN_CORPUS_SIZE = 300
PUBLIC_HOST = "crm.example.com"
POLICY = RedirectPolicy(
    public_host=PUBLIC_HOST,
    public_port=443,
    allowed_hosts=(".example.com", "reports.example.org"),
    allow_http=False,
)


def load_corpus(path: Path) -> list[tuple[int, str]]:
    """Read the payload corpus as (line number, payload) pairs.

    Lines are split on LF only, so a raw U+2028, U+0085 or vertical tab stays
    inside its payload. Empty lines and lines starting with "#" are skipped.
    Nothing is stripped, because leading whitespace is part of some payloads.
    """
    with path.open(encoding="utf-8", newline="\n") as corpus_file:
        text = corpus_file.read()

    payloads: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line == "" or line.startswith("#"):
            continue
        payloads.append((number, line))
    return payloads


CORPUS = load_corpus(CORPUS_PATH)


@pytest.mark.parametrize(
    "payload",
    [pytest.param(payload, id=f"line-{number}") for number, payload in CORPUS],
)
def test_corpus_payload_rejected(payload: str) -> None:
    result = check_redirect(payload, POLICY)

    assert result.target == "/"
    assert result.rejected is True


def test_corpus_has_enough_payloads() -> None:
    payload_count = len(CORPUS)

    assert payload_count >= MIN_CORPUS_SIZE


def test_corpus_has_no_duplicate_payloads() -> None:
    payloads = [payload for _, payload in CORPUS]

    duplicates = sorted({payload for payload in payloads if payloads.count(payload) > 1})

    assert duplicates == []


# Payloads with raw CR, LF, NUL or trailing whitespace, which a line-based
# corpus file cannot hold reliably.
RAW_CONTROL_PAYLOADS = {
    "lf-before-slashes": "\n//evil.example",
    "crlf-before-slashes": "\r\n//evil.example",
    "cr-between-slashes": "/\r/evil.example",
    "lf-between-slashes": "/\n/evil.example",
    "nul-between-slashes": "/\x00/evil.example",
    "nul-before-slashes": "\x00//evil.example",
    "crlf-header-injection": "/deals\r\nLocation: https://evil.example",
    "crlf-set-cookie": "/deals\r\nSet-Cookie: sid=attacker",
    "lf-in-scheme": "java\nscript:alert(1)",
    "cr-in-scheme": "java\rscript:alert(1)",
    "lf-in-host": "https://evil.example\n.example.com",
    "nul-in-host": "https://crm.example.com\x00.evil.example",
    "nul-at-end": "/deals\x00",
    "trailing-crlf": "https://crm.example.com/\r\n",
    "trailing-tab": "/deals\t",
    "trailing-space": "/deals ",
    "trailing-nbsp": "/deals\u00a0",
    "vertical-tab": "/\x0b/evil.example",
    "form-feed": "/\x0c/evil.example",
    "escape": "/\x1b/evil.example",
    "delete": "/\x7f/evil.example",
    "next-line-c1": "/\x85/evil.example",
    "information-separator": "/\x1f/evil.example",
}


@pytest.mark.parametrize(
    "payload",
    [pytest.param(payload, id=name) for name, payload in RAW_CONTROL_PAYLOADS.items()],
)
def test_raw_control_character_rejected(payload: str) -> None:
    result = check_redirect(payload, POLICY)

    assert result.target == "/"
    assert result.rejected is True


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("//evil.example/" + "a" * 2100, id="protocol-relative"),
        pytest.param("/" + "%2F" * 700 + "evil.example", id="encoded-slashes"),
        pytest.param("https://evil.example/?" + "x=1&" * 600, id="long-query"),
        pytest.param("https://crm.example.com@evil.example/" + "a" * 2100, id="userinfo"),
    ],
)
def test_long_payload_rejected(payload: str) -> None:
    result = check_redirect(payload, POLICY)

    assert len(payload) > MAX_TARGET_LENGTH
    assert result.target == "/"
    assert result.rejected is True


def test_local_path_over_max_length_rejected() -> None:
    value = "/" + "a" * MAX_TARGET_LENGTH

    result = check_redirect(value, POLICY)

    assert len(value) == MAX_TARGET_LENGTH + 1
    assert result.target == "/"
    assert result.rejected is True


def test_local_path_at_max_length_accepted() -> None:
    value = "/" + "a" * (MAX_TARGET_LENGTH - 1)

    result = check_redirect(value, POLICY)

    assert result.target == value
    assert result.rejected is False


ALLOWED_TARGETS = {
    "root": "/",
    "path": "/deals",
    "nested-path": "/deals/42/notes",
    "trailing-slash": "/deals/",
    "query": "/deals?id=5&tab=notes",
    "fragment": "/deals#notes",
    "query-with-slashes": "/search?next=//evil.example",
    "plus-in-query": "/search?q=a+b",
    "encoded-slash-in-query": "/search?path=a%2Fb",
    "encoded-non-ascii": "/contacts/m%C3%BCller",
    "well-known-path": "/.well-known/openid-configuration",
    "three-dots": "/files/...",
    "matrix-parameter": "/deals;view=list",
    "public-host": "https://crm.example.com/x",
    "public-host-without-path": "https://crm.example.com",
    "public-host-default-port": "https://crm.example.com:443/deals",
    "public-host-upper-case": "https://CRM.EXAMPLE.COM/",
    "scheme-upper-case": "HTTPS://crm.example.com/",
    "public-host-query-fragment": "https://crm.example.com/deals?id=5#notes",
    "suffix-entry-subdomain": "https://ops.example.com/",
    "suffix-entry-nested-subdomain": "https://a.b.example.com/",
    "suffix-entry-bare-domain": "https://example.com/",
    "exact-entry": "https://reports.example.org/q?a=1",
    "exact-entry-default-port": "https://reports.example.org:443/q",
}


@pytest.mark.parametrize(
    "value",
    [pytest.param(value, id=name) for name, value in ALLOWED_TARGETS.items()],
)
def test_allowed_target_accepted_unchanged(value: str) -> None:
    result = check_redirect(value, POLICY)

    assert result.target == value
    assert result.rejected is False


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("/a%20b", id="encoded-space-in-path"),
        pytest.param("/deals?q=a%20b", id="encoded-space-in-query"),
    ],
)
def test_encoded_space_in_local_path_accepted(value: str) -> None:
    result = check_redirect(value, POLICY)

    assert result.target == value
    assert result.rejected is False


@pytest.mark.parametrize("value", [None, ""], ids=["none", "empty"])
def test_missing_value_gives_unrejected_fallback(value: str | None) -> None:
    result = check_redirect(value, POLICY)

    assert result.target == "/"
    assert result.rejected is False


@pytest.mark.parametrize(
    "value",
    ["http://crm.example.com/", "http://ops.example.com/deals", "http://reports.example.org/q"],
)
def test_http_rejected_by_default(value: str) -> None:
    result = check_redirect(value, POLICY)

    assert result.target == "/"
    assert result.rejected is True


@pytest.mark.parametrize(
    "value",
    [
        "http://crm.example.com/",
        "http://ops.example.com/deals",
        "http://reports.example.org/q",
        "https://crm.example.com/",
    ],
)
def test_http_accepted_when_allowed(value: str) -> None:
    policy = RedirectPolicy(
        public_host=PUBLIC_HOST,
        allowed_hosts=(".example.com", "reports.example.org"),
        allow_http=True,
    )

    result = check_redirect(value, policy)

    assert result.target == value
    assert result.rejected is False


@pytest.mark.parametrize(
    "value",
    [
        "http://evil.example/",
        "http://crm.example.com.evil.example/",
        "http://crm.example.com:8080/",
    ],
)
def test_http_other_host_or_port_rejected_when_allowed(value: str) -> None:
    policy = RedirectPolicy(
        public_host=PUBLIC_HOST,
        allowed_hosts=(".example.com", "reports.example.org"),
        allow_http=True,
    )

    result = check_redirect(value, policy)

    assert result.target == "/"
    assert result.rejected is True


PORT_POLICY = RedirectPolicy(
    public_host=PUBLIC_HOST,
    public_port=443,
    allowed_hosts=("crm.example.com:8443", "reports.example.org:8443"),
)


@pytest.mark.parametrize(
    "value",
    [
        "https://crm.example.com:8443/",
        "https://reports.example.org:8443/q",
        "https://crm.example.com/",
        "https://crm.example.com:443/",
    ],
)
def test_port_entry_admits_its_port(value: str) -> None:
    result = check_redirect(value, PORT_POLICY)

    assert result.target == value
    assert result.rejected is False


@pytest.mark.parametrize(
    "value",
    [
        "https://crm.example.com:9443/",
        "https://crm.example.com:80/",
        "https://reports.example.org/q",
        "https://reports.example.org:443/q",
        "https://reports.example.org:9443/q",
    ],
)
def test_port_entry_rejects_other_ports(value: str) -> None:
    result = check_redirect(value, PORT_POLICY)

    assert result.target == "/"
    assert result.rejected is True


# Pieces that the property tests join into local paths and absolute URLs, so
# that generated values reach both branches of check_redirect more often
# than plain text does.
PATH_PIECES = [
    "a",
    "deals",
    "/",
    "//",
    "\\",
    ".",
    "..",
    "?",
    "#",
    ";",
    ":",
    "@",
    "%",
    "%2F",
    "%2f",
    "%5C",
    "%2e",
    "%25",
    "%252F",
    "%09",
    "%0a",
    "%0d%0a",
    "%00",
    "%20",
    "%E3%80%80",
    "%C2%A0",
    "\t",
    " ",
    "\u2028",
    "\u3002",
]
SCHEME_PREFIXES = [
    "https://",
    "HTTPS://",
    "http://",
    "https:",
    "https:/",
    "https:///",
    "https:\\\\",
    "//",
    "ftp://",
    "javascript:",
    " https://",
]
USERINFO_PARTS = ["", "user@", "crm.example.com@", "crm.example.com:443@", "evil.example\\@"]
HOSTS = [
    "crm.example.com",
    "CRM.EXAMPLE.COM",
    "ops.example.com",
    "example.com",
    "reports.example.org",
    "evil.example",
    "evilexample.com",
    "xexample.com",
    "xreports.example.org",
    "crm.example.com.evil.example",
    "reports.example.org.evil.example",
    "crm.example.com.",
    "crm%2Eexample.com",
    "crm.example\u3002com",
    "127.0.0.1",
    "2130706433",
    "[::1]",
    "",
]
PORT_PARTS = ["", ":443", ":0443", ":", ":8443", ":80", ":+443", ":99999"]

path_text = st.lists(st.sampled_from(PATH_PIECES), max_size=8).map("".join)
local_paths = path_text.map(lambda body: "/" + body)
# The first entry of each list is drawn half of the time, so that many URLs
# differ from an accepted one in a single part.
absolute_urls = st.builds(
    lambda scheme, userinfo, host, port, path: f"{scheme}{userinfo}{host}{port}{path}",
    st.one_of(st.just(SCHEME_PREFIXES[0]), st.sampled_from(SCHEME_PREFIXES)),
    st.one_of(st.just(USERINFO_PARTS[0]), st.sampled_from(USERINFO_PARTS)),
    st.sampled_from(HOSTS),
    st.one_of(st.just(PORT_PARTS[0]), st.sampled_from(PORT_PARTS)),
    st.one_of(st.just(""), local_paths, path_text),
)
redirect_values = st.one_of(st.text(), local_paths, absolute_urls)


def is_allowed_host(hostname: str) -> bool:
    """Return whether ``hostname`` is the public host or on the test allow-list."""
    return (
        hostname == PUBLIC_HOST
        or hostname == "example.com"
        or hostname.endswith(".example.com")
        or hostname == "reports.example.org"
    )


def percent_decodings(value: str) -> list[str]:
    """Return ``value`` and the results of up to three rounds of percent-decoding."""
    forms = [value]
    for _ in range(3):
        forms.append(unquote(forms[-1]))
    return forms


def has_control_character(text: str) -> bool:
    return any(unicodedata.category(char) == "Cc" for char in text)


@settings(max_examples=400, database=None)
@given(value=redirect_values)
def test_any_text_gives_input_or_fallback(value: str) -> None:
    result = check_redirect(value, POLICY)

    assert result.target in (value, "/")
    if result.rejected or value == "":
        assert result.target == "/"
    else:
        assert result.target == value


@settings(max_examples=1000, database=None)
@given(value=redirect_values)
def test_accepted_value_stays_on_allowed_host(value: str) -> None:
    result = check_redirect(value, POLICY)

    if result.rejected or value == "":
        return
    if value.startswith("/"):
        assert value == "/" or value[1] not in "/\\"
    else:
        parts = urlsplit(value)
        assert parts.scheme.lower() == "https"
        assert parts.username is None
        assert parts.hostname is not None
        assert is_allowed_host(parts.hostname)
        assert parts.port in (None, 443)


@settings(max_examples=1000, database=None)
@given(value=redirect_values)
def test_accepted_value_has_no_backslash_or_control_character(value: str) -> None:
    result = check_redirect(value, POLICY)

    if result.rejected:
        return
    for form in percent_decodings(value):
        assert "\\" not in form
        assert not has_control_character(form)


@settings(max_examples=300, database=None)
@given(
    host=st.sampled_from(
        ["crm.example.com", "ops.example.com", "example.com", "reports.example.org"]
    ),
    port=st.integers(min_value=0, max_value=65535),
)
def test_allowed_host_accepted_only_on_https_port(host: str, port: int) -> None:
    value = f"https://{host}:{port}/deals"

    result = check_redirect(value, POLICY)

    assert result.rejected is (port != 443)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        pytest.param("https://[::1/deals", "host", id="unclosed-ipv6-bracket"),
        pytest.param("https://crm.example.com]/", "host", id="stray-closing-bracket"),
        pytest.param("https://crm.example.com:44x3/", "port", id="port-not-a-number"),
        pytest.param("https://crm.example.com:8443/", "port", id="public-host-other-port"),
        pytest.param("https://evil.example/", "host", id="unlisted-host"),
        pytest.param("https:evil.example", "empty_host", id="no-authority"),
        pytest.param("https:///deals", "empty_host", id="empty-authority"),
        pytest.param("https://user@crm.example.com/", "userinfo", id="userinfo"),
        pytest.param("javascript:alert(1)", "scheme", id="other-scheme"),
        pytest.param("deals", "not_local_path", id="relative-path"),
        pytest.param("//evil.example", "not_local_path", id="protocol-relative"),
        pytest.param("/deals%ff", "bad_encoding", id="invalid-utf8-escape"),
        pytest.param("/deals%0a", "forbidden_character", id="encoded-newline"),
        pytest.param("/d\u00e9als", "non_ascii", id="raw-non-ascii"),
    ],
)
def test_rejection_reason_names_failed_rule(value: str, reason: str) -> None:
    result = check_redirect(value, POLICY)

    assert result.target == "/"
    assert result.rejected is True
    assert result.reason == reason
