"""Run the nginx recipes of deploy/nginx/ on loopback, and reach their host names there.

A recipe runs as operators get it, with only the lines marked EDIT changed:
every TLS ``listen`` becomes a plain-http ``listen`` on 127.0.0.1, the
``ssl_*`` lines go, and each address, path or domain named in
``replacements`` is swapped, each the number of times the test expects.

:class:`LoopbackHosts` lets an ``httpx.Client`` use host names such as
``crm.example.test``: every request goes to 127.0.0.1 on the URL's port and
keeps its ``Host`` header, so nothing is looked up in DNS, and the client's
cookie jar applies ``Domain`` attributes as a browser does.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from .e2e import write_guard_config
from .nginx import REPO_DIR, check_config, nginx_binary, write_config
from .processes import RunningProcess, run_cli, run_process

RECIPES_DIR = REPO_DIR / "deploy" / "nginx"
LOOPBACK = "127.0.0.1"

_TLS_LISTEN_RE = re.compile(r"^(\s*)listen 443 ssl( default_server)?;([^\n]*)$", re.MULTILINE)
_IPV6_LISTEN_RE = re.compile(r"^\s*listen \[::\]:443 ssl[^\n]*\n", re.MULTILINE)
_SSL_LINE_RE = re.compile(r"^\s*ssl_[a-z_]+ [^\n]*\n", re.MULTILINE)


@dataclass(frozen=True)
class Replacement:
    """One exact text swap in a recipe, expected ``count`` times (None: at least once)."""

    old: str
    new: str
    count: int | None


def apply_replacements(text: str, replacements: Sequence[Replacement]) -> str:
    """``text`` with each replacement made; AssertionError when one is found too often or rarely."""
    for replacement in replacements:
        found = text.count(replacement.old)
        expected = replacement.count
        if (expected is None and found == 0) or (expected is not None and found != expected):
            raise AssertionError(f"expected {expected or 'some'} of {replacement.old!r} in the "
                                 f"recipe, found {found}")
        text = text.replace(replacement.old, replacement.new)
    return text


def render_recipe(template: str, *, listen_port: int,
                  replacements: Sequence[Replacement] = ()) -> str:
    """The recipe on plain http at 127.0.0.1:``listen_port``, with ``replacements`` applied.

    Raises AssertionError when a replacement is found a different number of
    times than expected, so a changed recipe fails loudly instead of running
    with an address it was never meant to have.
    """
    text = apply_replacements(template, replacements)
    text, listens = _TLS_LISTEN_RE.subn(
        lambda match: f"{match.group(1)}listen {LOOPBACK}:{listen_port}{match.group(2) or ''};",
        text,
    )
    if listens == 0:
        raise AssertionError("expected at least one 'listen 443 ssl' line in the recipe")
    text = _IPV6_LISTEN_RE.sub("", text)
    return _SSL_LINE_RE.sub("", text)


def read_recipe(name: str) -> str:
    return (RECIPES_DIR / name).read_text(encoding="utf-8")


@contextlib.contextmanager
def run_nginx_recipe(prefix: Path, server_config: str, *, listen_port: int,
                     extra_files: Iterable[Path] = ()) -> Iterator[RunningProcess]:
    """Run nginx in the foreground with ``server_config`` until the block ends.

    ``extra_files`` are copied into ``prefix`` first, for relative ``include`` lines.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    for path in extra_files:
        shutil.copy(path, prefix / path.name)
    conf = write_config(prefix, server_config)
    check_config(prefix, conf)
    # -e: the error log before the config is read (Debian's default is stderr).
    command = [nginx_binary(), "-p", str(prefix), "-c", str(conf),
               "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    with run_process("nginx", command, port=listen_port,
                     log_path=prefix / "nginx.out") as running:
        yield running


class LoopbackHosts(httpx.BaseTransport):
    """Send requests for a fixed set of host names to 127.0.0.1, keeping their Host header.

    A request for any other host than these names and 127.0.0.1 raises
    ``httpx.ConnectError`` and is not sent.
    """

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(name.lower() for name in names)
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host != LOOPBACK and host not in self.names:
            raise httpx.ConnectError(
                f"host {host!r} is not one of the test's loopback names {sorted(self.names)}",
                request=request,
            )
        forwarded = httpx.Request(
            request.method, request.url.copy_with(host=LOOPBACK), headers=request.headers,
            stream=request.stream, extensions=request.extensions,
        )
        return self._inner.handle_request(forwarded)

    def close(self) -> None:
        self._inner.close()


def write_guard_config_with(path: Path, *, public_url: str, issuer: str, store_path: Path,
                            session_lines: str = "", access_lines: str = "") -> Path:
    """:func:`support.e2e.write_guard_config` plus TOML lines for [session] and [access].

    The guard trusts 127.0.0.1 as its proxy. ``access_lines`` may end with
    ``[[access.rules]]`` tables. The file is checked with ``moko-guard
    check-config`` once it is complete.
    """
    write_guard_config(path, public_url=public_url, issuer=issuer, store_path=store_path,
                       trusted_proxies=[f"{LOOPBACK}/32"], access_rules=access_lines)
    if session_lines:
        text = path.read_text(encoding="utf-8")
        marker = "\n[session]\n"
        if text.count(marker) != 1:
            raise AssertionError(f"expected one [session] table in {path}")
        path.write_text(text.replace(marker, marker + session_lines), encoding="utf-8")
        run_cli("check-config", "--config", str(path))
    return path


def auth_check_count(guard_url: str, decision: str) -> int:
    """How many requests the guard has decided with ``decision``, from its /metrics."""
    response = httpx.get(f"{guard_url}/metrics", timeout=10.0)
    response.raise_for_status()
    pattern = rf'^moko_guard_auth_check_seconds_count\{{decision="{re.escape(decision)}"\}} (\S+)$'
    match = re.search(pattern, response.text, re.MULTILINE)
    return int(float(match.group(1))) if match else 0
