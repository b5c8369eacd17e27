"""Tests of request path normalisation and prefix matching in moko_guard/paths.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moko_guard.paths import (
    AmbiguousPath,
    is_public,
    matches_prefix,
    normalise_path,
    path_variants,
)

PUBLIC_PATHS = ["/public/", "/healthz"]

NORMALISED_CASES = [
    ("/public/../admin", "/admin"),
    ("/public/..%2fadmin", "/admin"),
    ("/public/..%2Fadmin", "/admin"),
    ("/public/%2e%2e/admin", "/admin"),
    ("/public/%2E%2E%2Fadmin", "/admin"),
    ("/public/.%2e/admin", "/admin"),
    ("/public%2f..%2fadmin", "/admin"),
    ("//admin", "/admin"),
    ("///admin//x", "/admin/x"),
    ("/%61dmin", "/admin"),
    ("/admin%2f", "/admin/"),
    ("/%2Fadmin", "/admin"),
    ("/a/./b", "/a/b"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/a/%2e", "/a/"),
    ("/..", "/"),
    ("/../../admin", "/admin"),
    ("/", "/"),
    ("/admin?next=/../public/", "/admin"),
    ("/public/x?%zz", "/public/x"),
    ("/ADMIN", "/ADMIN"),
    ("/%C3%A9t%C3%A9", "/\u00e9t\u00e9"),
    ("/a;jsessionid=1/b", "/a;jsessionid=1/b"),
    ("/public;x/../admin", "/admin"),
]

AMBIGUOUS_CASES = [
    "/public/..;/admin",
    "/public/.;/admin",
    "/public/%2e%2e;x/admin",
    "/public/..%3b/admin",
    "/admin%23",
    "/public/x%23/../../admin",
    "/admin%3F",
    "/public/x%3F/../../admin",
    "/admin%00",
    "/admin\x00",
    "/public\\..\\admin",
    "/public/..%5cadmin",
    "/%zz",
    "/%",
    "/%2",
    "/public/%2e%2",
    "/%252e%252e/admin",
    "/public/%252e%252e%252fadmin",
    "/%C3",
    "/%c0%ae%c0%ae/admin",
    "/%ff",
    "/a b",
    "/a%20b",
    "/a\tb",
    "/a%7fb",
    "/a#b",
    "",
    "admin",
    "%2fadmin",
    "/\ud800",
]


@pytest.mark.parametrize(
    ("target", "expected"), NORMALISED_CASES, ids=[target for target, _ in NORMALISED_CASES]
)
def test_normalise_path_resolves_target(target: str, expected: str) -> None:
    path = normalise_path(target)

    assert path == expected


@pytest.mark.parametrize("target", AMBIGUOUS_CASES, ids=[repr(t) for t in AMBIGUOUS_CASES])
def test_normalise_path_rejects_ambiguous_target(target: str) -> None:
    with pytest.raises(AmbiguousPath):
        normalise_path(target)


def test_path_parameter_cannot_escape_rule() -> None:
    """Tomcat and Jetty drop ";param" from each segment, so "/admin;x/users" is "/admin/users"."""
    variants = path_variants(normalise_path("/admin;x/users"))

    assert any(matches_prefix(v, "/admin", ignore_case=True) for v in variants)


def test_path_parameter_keeps_public_path_narrow() -> None:
    variants = path_variants(normalise_path("/public;x/logo.png"))

    assert not all(is_public(v, ["/public/"]) for v in variants)



@pytest.mark.parametrize(
    "target",
    ["/admin//../x", "/public//..%2fadmin", "//public/../admin", "/a//b/..;x/c"],
)
def test_empty_segment_before_dot_segment_rejected(target: str) -> None:
    """Servers that merge "//" before resolving ".." read these as another path than RFC 3986."""
    with pytest.raises(AmbiguousPath, match="empty segment before a dot segment"):
        normalise_path(target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [("/admin/x//", "/admin/x/"), ("/admin/../x/", "/x/"), ("/admin//x/.", "/admin/x/")],
)
def test_empty_segment_without_dot_dot_still_resolves(target: str, expected: str) -> None:
    path = normalise_path(target)

    assert path == expected


def test_path_without_parameters_has_one_variant() -> None:
    variants = path_variants("/admin/users")

    assert variants == ("/admin/users",)


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/admin;x/users;y", "/admin/users"), ("/;x", "/"), ("/a;b=c/", "/a/")],
)
def test_path_parameters_give_stripped_variant(path: str, expected: str) -> None:
    variants = path_variants(path)

    assert variants == (path, expected)

PREFIX_CASES = [
    ("/admin", "/admin", False, True),
    ("/admin/x", "/admin", False, True),
    ("/administrator", "/admin", False, False),
    ("/adminx/y", "/admin", False, False),
    ("/ADMIN/x", "/admin", False, False),
    ("/ADMIN/x", "/admin", True, True),
    ("/Admin", "/admin", True, True),
    ("/AdminX", "/admin", True, False),
    ("/admin", "/admin/", False, True),
    ("/admin/", "/admin/", False, True),
    ("/admin/x", "/admin/", False, True),
    ("/adminx", "/admin/", False, False),
    ("/ADMIN/", "/admin/", True, True),
    ("/anything", "/", False, True),
    ("/", "/", False, True),
    ("/a", "/a/b", False, False),
]


@pytest.mark.parametrize(
    ("path", "prefix", "ignore_case", "expected"),
    PREFIX_CASES,
    ids=[f"{path}-under-{prefix}-{'nocase' if ignore else 'case'}"
         for path, prefix, ignore, _ in PREFIX_CASES],
)
def test_matches_prefix(path: str, prefix: str, ignore_case: bool, expected: bool) -> None:
    matched = matches_prefix(path, prefix, ignore_case=ignore_case)

    assert matched is expected


PUBLIC_CASES = [
    ("/public/logo.png", True),
    ("/public/", True),
    ("/public", True),
    ("/healthz", True),
    ("/healthz/deep", True),
    ("/PUBLIC/logo.png", False),
    ("/Public/logo.png", False),
    ("/HEALTHZ", False),
    ("/publicity", False),
    ("/healthzx", False),
    ("/admin", False),
]


@pytest.mark.parametrize(("path", "expected"), PUBLIC_CASES, ids=[p for p, _ in PUBLIC_CASES])
def test_is_public_is_case_sensitive(path: str, expected: bool) -> None:
    public = is_public(path, PUBLIC_PATHS)

    assert public is expected


def test_is_public_with_no_entries() -> None:
    public = is_public("/public/logo.png", [])

    assert public is False


def test_public_path_traversal_not_public() -> None:
    path = normalise_path("/public/%2e%2e/admin")

    assert is_public(path, PUBLIC_PATHS) is False


# --- properties --------------------------------------------------------------------

PATH_PIECES = [
    "/", ".", "..", "%", ";", "?", "#", "\\", "a", "B", "2", "e", "E", "f", "F", "%2e", "%2E",
    "%2f", "%2F", "%3b", "%3f", "%23", "%25", "%5c", "%00", "%41", "%c3%a9", "%zz", " ",
    "\x00", "\u00e9", "admin", "public",
]
path_strings = st.lists(st.sampled_from(PATH_PIECES), max_size=24).map(lambda p: "/" + "".join(p))
any_strings = st.one_of(st.text(max_size=64), path_strings)


def normalised_or_none(target: str) -> str | None:
    try:
        return normalise_path(target)
    except AmbiguousPath:
        return None


@settings(max_examples=400, deadline=None)
@given(any_strings)
def test_normalise_path_raises_only_ambiguous_path(target: str) -> None:
    normalised_or_none(target)


@settings(max_examples=400, deadline=None)
@given(path_strings)
def test_normalised_path_has_no_empty_or_dot_segments(target: str) -> None:
    path = normalised_or_none(target)

    if path is not None:
        assert path.startswith("/")
        assert "//" not in path
        assert "." not in path.split("/")
        assert ".." not in path.split("/")


@settings(max_examples=400, deadline=None)
@given(path_strings)
def test_normalise_path_is_idempotent(target: str) -> None:
    path = normalised_or_none(target)

    if path is not None and "%" not in path:
        assert normalise_path(path) == path
