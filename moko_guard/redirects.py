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

Everything else falls back to ``/``. The caller logs the rejected value.
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
    """The outcome of a check: the target to use and whether the input was rejected."""

    target: str
    rejected: bool


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


def _host_allowed(host: str, port: int | None, scheme: str, policy: RedirectPolicy) -> bool:
    default_port = 443 if scheme == "https" else 80
    effective_port = port if port is not None else default_port
    public_port = policy.public_port if policy.public_port is not None else default_port
    if host == policy.public_host and effective_port == public_port:
        return True
    for entry in policy.allowed_hosts:
        entry_host, _, entry_port = entry.partition(":")
        wanted_port = int(entry_port) if entry_port else default_port
        if effective_port != wanted_port:
            continue
        if entry_host.startswith("."):
            if host == entry_host[1:] or host.endswith(entry_host):
                return True
        elif host == entry_host:
            return True
    return False


def _is_allowed_url(value: str, policy: RedirectPolicy) -> bool:
    schemes = ("https", "http") if policy.allow_http else ("https",)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if not match or match.group(1).lower() not in schemes:
        return False
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        return False
    netloc = parts.netloc
    if "@" in netloc or not netloc or parts.hostname is None:
        return False
    host = parts.hostname
    if not _HOST_RE.match(host) or host != netloc.split(":", 1)[0].lower():
        return False
    if "%" in netloc:
        return False
    return _host_allowed(host, port, parts.scheme.lower(), policy)


def check_redirect(value: str | None, policy: RedirectPolicy) -> RedirectCheck:
    """Return ``value`` when it is a safe redirect target, else the fallback ``/``."""
    if value is None or value == "":
        return RedirectCheck(FALLBACK, rejected=False)
    if len(value) > MAX_TARGET_LENGTH:
        return RedirectCheck(FALLBACK, rejected=True)
    try:
        forms = _decodings(value)
    except UnicodeDecodeError:
        return RedirectCheck(FALLBACK, rejected=True)
    if _has_forbidden_characters(forms) or not value.isascii():
        return RedirectCheck(FALLBACK, rejected=True)
    if value.startswith("/"):
        accepted = _is_local_path(forms)
    else:
        accepted = _is_allowed_url(value, policy)
    return RedirectCheck(value if accepted else FALLBACK, rejected=not accepted)
