"""One normalised request path for every access decision.

Public paths, access rules and SSO-only blocks are matched on the path the
upstream will act on: percent-decoded once, with ``//`` collapsed and ``.`` and
``..`` segments resolved (RFC 3986 section 5.2.4), and without the query. A
path that can be read two ways is rejected instead of guessed. That covers an
invalid or double percent-encoding, a backslash, a control character, a ``;``
parameter on a dot segment, and an encoded ``?`` or ``#``, which an upstream
that decodes before it splits off the query reads as a different path. Deny
rules compare case-insensitively, so ``/ADMIN`` cannot slip past a rule for
``/admin`` on a case-insensitive upstream; public paths compare exactly, so
they never admit more than listed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PLAIN_PATH_RE = re.compile(r"/|(/[A-Za-z0-9_~-][A-Za-z0-9_~.-]*)+/?")
_VALID_ESCAPE_RE = re.compile(r"%[0-9A-Fa-f]{2}")
_ANY_PERCENT_RE = re.compile(r"%")
_FORBIDDEN_RE = re.compile(r"[\x00-\x20\x7f\\#?]")


class AmbiguousPath(ValueError):
    """The path cannot be normalised to one meaning."""


def _percent_decode(path: str) -> str:
    if len(_ANY_PERCENT_RE.findall(path)) != len(_VALID_ESCAPE_RE.findall(path)):
        raise AmbiguousPath("invalid percent-encoding")
    if not path.isascii():
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise AmbiguousPath("path contains a lone surrogate") from None
    raw = bytearray()
    index = 0
    while index < len(path):
        char = path[index]
        if char == "%":
            raw.append(int(path[index + 1:index + 3], 16))
            index += 3
        else:
            raw.extend(char.encode("utf-8"))
            index += 1
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath("percent-encoding is not UTF-8") from None
    if _VALID_ESCAPE_RE.search(decoded):
        raise AmbiguousPath("double percent-encoding")
    return decoded


def normalise_path(target: str) -> str:
    """Return the normalised path of a request target, or raise :class:`AmbiguousPath`."""
    path = target.split("?", 1)[0]
    if _PLAIN_PATH_RE.fullmatch(path):
        # Only unreserved characters, no empty or dot segments: already normal.
        return path
    if not path.startswith("/"):
        raise AmbiguousPath("path does not start with /")
    decoded = _percent_decode(path)
    if _FORBIDDEN_RE.search(decoded):
        raise AmbiguousPath("backslash, \"?\", \"#\", space or control character in path")

    raw_segments = decoded.split("/")[1:]
    if "" in raw_segments[:-1] and any(seg.split(";", 1)[0] == ".." for seg in raw_segments):
        # "/admin//../x": RFC 3986 removes the empty segment (giving "/admin/x"), servers
        # that merge slashes first remove "admin" (giving "/x"). Refuse rather than pick one.
        raise AmbiguousPath("empty segment before a dot segment")
    segments: list[str] = []
    for segment in raw_segments:
        bare = segment.split(";", 1)[0]
        if bare in (".", "..") and bare != segment:
            raise AmbiguousPath("parameter on a dot segment")
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = "/" if decoded.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing


def path_variants(path: str) -> tuple[str, ...]:
    """Return the readings of a normalised path that an upstream may route on.

    Java servers (Tomcat, Jetty) drop ``;param`` from every segment, so
    ``/admin;x/users`` reaches ``/admin/users`` there. Deny rules must match
    any reading, and a public path must be public in every reading.
    """
    if ";" not in path:
        return (path,)
    stripped = "/".join(segment.split(";", 1)[0] for segment in path.split("/"))
    return (path, stripped or "/")


def matches_prefix(path: str, prefix: str, *, ignore_case: bool = False) -> bool:
    """True when ``path`` is ``prefix`` or lies below it (a prefix ending in ``/`` is a folder)."""
    if ignore_case:
        path, prefix = path.lower(), prefix.lower()
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


def is_public(path: str, public_paths: Sequence[str]) -> bool:
    for entry in public_paths:
        if matches_prefix(path, entry):
            return True
    return False
