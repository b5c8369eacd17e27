"""Post-login and post-logout redirect targets (``rd``), deny by default.

A target is accepted only when it is one of:

* a local path: one leading ``/``, not followed by ``/`` or ``\\``, with no
  backslash, control character, whitespace or dot segment, checked on the raw
  value and again after percent-decoding (where only a plain space may appear) (up to three rounds, so a double
  encoding cannot hide a forbidden character);
* an absolute URL with scheme ``https`` (``http`` too when HTTPS is not
  enforced), no user info, an ASCII host that is the public host or matches
  an allowed host exactly, or by suffix for entries with a leading dot, and
  the port of that entry (or the scheme's default port).

Everything else falls back to ``/``. The caller logs the rejected value with
the reason the check gives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

FALLBACK = "/"
MAX_TARGET_LENGTH = 2048
_DECODE_ROUNDS = 3
# \s adds the Unicode spaces (U+2000-U+200A, U+3000 and others) that only a
# percent-decoded form can contain, because the raw value must be ASCII.
_FORBIDDEN_CHAR_RE = re.compile(r"[\s\x00-\x20\x7f-\x9f\\\u2028\u2029\u00a0\ufeff]")
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_DOT_SEGMENT_RE = re.compile(r"(^|/)\.{1,2}(/|$|;|\?|#)")


@dataclass(frozen=True)
class RedirectPolicy:
    """Where a redirect may lead: the guard's own host plus the allow-list."""

    public_host: str
    public_port: int | None = None
    allowed_hosts: Sequence[str] = ()
    allow_http: bool = False


@dataclass(frozen=True)
class RedirectCheck:
    """The outcome of a check: the target to use, whether the input was rejected, and why."""

    target: str
    rejected: bool
    # Why the input was rejected, for the operator log: "too_long", "bad_encoding",
    # "forbidden_character", "non_ascii", "not_local_path", "scheme", "empty_host",
    # "userinfo", "host" or "port". None when the input was accepted or missing.
    reason: str | None = None


def _decodings(value: str) -> list[str]:
    forms = [value]
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(forms[-1], errors="strict") if "%" in forms[-1] else forms[-1]
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _has_forbidden_characters(forms: Sequence[str]) -> bool:
    if _FORBIDDEN_CHAR_RE.search(forms[0]):
        return True
    # A decoded plain space (from "%20") cannot change where a target leads, so
    # "/deals?q=a%20b" stays valid; every other whitespace stays forbidden.
    return any(_FORBIDDEN_CHAR_RE.search(form.replace(" ", "")) for form in forms[1:])


def _is_local_path(forms: Sequence[str]) -> bool:
    for form in forms:
        if not form.startswith("/") or form.startswith(("//", "/ ")):
            return False
        path = form.split("?", 1)[0].split("#", 1)[0]
        if _DOT_SEGMENT_RE.search(path):
            return False
    return True


def _host_problem(host: str, port: int | None, scheme: str, policy: RedirectPolicy) -> str | None:
    """Return None when host and port are allowed, "port" when only the port differs, else "host"."""
    default_port = 443 if scheme == "https" else 80
    effective_port = port if port is not None else default_port
    public_port = policy.public_port if policy.public_port is not None else default_port
    host_listed = False
    if host == policy.public_host:
        if effective_port == public_port:
            return None
        host_listed = True
    for entry in policy.allowed_hosts:
        entry_host, _, entry_port = entry.partition(":")
        if entry_host.startswith("."):
            matches = host == entry_host[1:] or host.endswith(entry_host)
        else:
            matches = host == entry_host
        if not matches:
            continue
        wanted_port = int(entry_port) if entry_port else default_port
        if effective_port == wanted_port:
            return None
        host_listed = True
    return "port" if host_listed else "host"


def _url_problem(value: str, policy: RedirectPolicy) -> str | None:
    """Return None for an allowed absolute URL, else the reason it is not one."""
    schemes = ("https", "http") if policy.allow_http else ("https",)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", value)
    if not match:
        return "not_local_path"
    if match.group(1).lower() not in schemes:
        return "scheme"
    # "https:evil.example" and "https:/evil.example" have a scheme but no authority;
    # browsers still resolve them to a host, so they are never relative paths.
    if not value[match.end():].startswith("//"):
        return "empty_host"
    try:
        parts = urlsplit(value)
    except ValueError:
        return "host"
    try:
        port = parts.port
    except ValueError:
        return "port"
    netloc = parts.netloc
    if not netloc or parts.hostname is None:
        return "empty_host"
    if "@" in netloc:
        return "userinfo"
    host = parts.hostname
    if "%" in netloc or not _HOST_RE.match(host) or host != netloc.split(":", 1)[0].lower():
        return "host"
    return _host_problem(host, port, parts.scheme.lower(), policy)


def _rejected(reason: str) -> RedirectCheck:
    return RedirectCheck(FALLBACK, rejected=True, reason=reason)


def check_redirect(value: str | None, policy: RedirectPolicy) -> RedirectCheck:
    """Return ``value`` when it is a safe redirect target, else the fallback ``/`` and a reason."""
    if value is None or value == "":
        return RedirectCheck(FALLBACK, rejected=False)
    if len(value) > MAX_TARGET_LENGTH:
        return _rejected("too_long")
    try:
        forms = _decodings(value)
    except UnicodeDecodeError:
        return _rejected("bad_encoding")
    if _has_forbidden_characters(forms):
        return _rejected("forbidden_character")
    if not value.isascii():
        return _rejected("non_ascii")
    if value.startswith("/"):
        problem = None if _is_local_path(forms) else "not_local_path"
    else:
        problem = _url_problem(value, policy)
    if problem is not None:
        return _rejected(problem)
    return RedirectCheck(value, rejected=False)
