"""Run the loopback OpenID Connect provider in tests/oidc and log in through it.

The provider is oidc-provider 9.13.3 (Node.js) started by ``tests/oidc/server.mjs``.
Its development interactions accept any login name and password, and the login
name becomes the subject. See that script for the claims derived from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TextIO
from urllib.parse import urljoin, urlsplit

import httpx

TESTS_DIR = Path(__file__).resolve().parent.parent
PROVIDER_DIR = TESTS_DIR / "oidc"
PROVIDER_SCRIPT = PROVIDER_DIR / "server.mjs"

STARTUP_TIMEOUT_SECONDS = 60.0
SHUTDOWN_TIMEOUT_SECONDS = 5.0
# A first login takes 7 requests: authorize, login page, login submit, resume,
# consent page, consent submit, resume. 12 leaves room without looping forever.
MAX_LOGIN_REQUESTS = 12
# The password field of the development login form accepts any value.
DEV_LOGIN_PASSWORD = "any-password"


@dataclass(frozen=True)
class OidcProvider:
    """A running provider: its issuer identifier and its port on 127.0.0.1."""

    issuer: str
    port: int

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function ran."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _provider_command() -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError(
            "node not found on PATH: the OIDC test provider needs Node.js 20 or later"
        )
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(
            f"oidc-provider is not installed in {PROVIDER_DIR / 'node_modules'}: "
            "run `npm ci --prefix tests/oidc` from the repository root"
        )
    return [node, str(PROVIDER_SCRIPT)]


def _provider_environment(
    clients: list[dict[str, object]], port: int, conform_id_token_claims: bool
) -> dict[str, str]:
    # Drop inherited OP_* variables so that a developer's shell cannot change
    # the issuer or host that the tests expect.
    env = {name: value for name, value in os.environ.items() if not name.startswith("OP_")}
    env["OP_PORT"] = str(port)
    env["OP_CLIENTS"] = json.dumps(clients)
    env["OP_CONFORM_ID_TOKEN_CLAIMS"] = "1" if conform_id_token_claims else "0"
    return env


def _read_stderr(stderr_file: TextIO) -> str:
    stderr_file.flush()
    stderr_file.seek(0)
    return stderr_file.read().strip() or "(stderr is empty)"


def _wait_for_ready_line(process: subprocess.Popen[bytes], stderr_file: TextIO) -> str:
    """Read the provider's stdout until its ``ready <issuer>`` line and return the issuer."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    output = b""

    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    "OIDC test provider did not print its ready line within "
                    f"{STARTUP_TIMEOUT_SECONDS:.0f} s; "
                    f"stdout so far: {output.decode(errors='replace')!r}; "
                    f"stderr:\n{_read_stderr(stderr_file)}"
                )
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                exit_code = process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
                raise RuntimeError(
                    f"OIDC test provider exited with code {exit_code} before it was ready; "
                    f"stderr:\n{_read_stderr(stderr_file)}"
                )
            output += chunk

    line = output.split(b"\n", 1)[0].decode()
    prefix = "ready "
    if not line.startswith(prefix):
        raise RuntimeError(
            f"OIDC test provider printed {line!r} instead of 'ready <issuer>'; "
            f"stderr:\n{_read_stderr(stderr_file)}"
        )
    return line[len(prefix) :]


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
    if process.stdout is not None:
        process.stdout.close()


@contextlib.contextmanager
def run_oidc_provider(
    clients: list[dict[str, object]],
    port: int | None = None,
    *,
    conform_id_token_claims: bool = False,
) -> Iterator[OidcProvider]:
    """Start the provider on 127.0.0.1 with ``clients`` registered, and stop it on exit.

    Each client is an OAuth 2.0 client metadata object (client_id, client_secret,
    redirect_uris, token_endpoint_auth_method, ...). Its redirect_uris,
    post_logout_redirect_uris and backchannel_logout_uri must be on loopback, or
    the provider exits at start. With ``conform_id_token_claims``
    the ID token from the code flow carries no email or profile claims, so a
    relying party must call the userinfo endpoint for them.

    Raises RuntimeError, with the provider's stderr, if it exits or is not ready
    within 20 s.
    """
    command = _provider_command()
    listen_port = free_port() if port is None else port
    env = _provider_environment(clients, listen_port, conform_id_token_claims)

    with tempfile.TemporaryFile(
        mode="w+", encoding="utf-8", prefix="oidc-provider-stderr-"
    ) as stderr_file:
        process = subprocess.Popen(
            command,
            cwd=PROVIDER_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr_file,
        )
        try:
            issuer = _wait_for_ready_line(process, stderr_file)
            yield OidcProvider(issuer=issuer, port=listen_port)
        finally:
            _stop_process(process)


@dataclass
class HtmlForm:
    """An HTML form: its action as written, its lowercase method and its named input values."""

    action: str
    method: str
    fields: dict[str, str]


class HtmlPageParser(HTMLParser):
    """Collects the forms, the title and the visible text of an HTML page.

    Only ``<input>`` elements with a name become form fields, so a named
    ``<button>`` (such as ``logout=yes`` on the provider's logout page) must be
    added by the caller.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[HtmlForm] = []
        self.title = ""
        self._text_parts: list[str] = []
        self._open_form: HtmlForm | None = None
        self._skipped_element: str | None = None
        self._in_title = False

    @property
    def text(self) -> str:
        return " ".join(" ".join(self._text_parts).split())

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag in ("style", "script"):
            self._skipped_element = tag
        elif tag == "title":
            self._in_title = True
        elif tag == "form":
            self._open_form = HtmlForm(
                action=attributes.get("action", ""),
                method=attributes.get("method", "get").lower(),
                fields={},
            )
            self.forms.append(self._open_form)
        elif tag == "input" and self._open_form is not None and attributes.get("name"):
            self._open_form.fields[attributes["name"]] = attributes.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == self._skipped_element:
            self._skipped_element = None
        elif tag == "title":
            self._in_title = False
        elif tag == "form":
            self._open_form = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data.strip()
        elif self._skipped_element is None:
            self._text_parts.append(data)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _page_summary(response: httpx.Response, parser: HtmlPageParser | None = None) -> str:
    if parser is None:
        parser = HtmlPageParser()
        parser.feed(response.text)
        parser.close()
    return (
        f"HTTP {response.status_code} from {response.url}, "
        f"title {parser.title!r}, text {parser.text[:400]!r}"
    )


def _find_interaction_form(parser: HtmlPageParser, response: httpx.Response) -> HtmlForm:
    """Return the page's single form that posts a ``prompt`` field, as the dev interactions do."""
    forms = [form for form in parser.forms if "prompt" in form.fields]
    if len(forms) != 1:
        raise AssertionError(
            f"expected one development interaction form with a 'prompt' field, found {len(forms)}: "
            f"{_page_summary(response, parser)}"
        )
    form = forms[0]
    if form.method != "post":
        raise AssertionError(
            f"expected the interaction form to use POST, got {form.method!r}: "
            f"{_page_summary(response, parser)}"
        )
    return form


def complete_provider_login(client: httpx.Client, authorize_url: str, login: str) -> str:
    """Log in as ``login`` at the provider and return the redirect back to the relying party.

    Follows the provider's redirects from ``authorize_url`` and submits its
    development login and consent forms. ``client`` keeps the provider's cookies,
    so a second call with the same client reuses the provider session and may
    skip both forms. Returns the first redirect Location that is not on the
    provider's origin, without requesting it. That includes error responses
    such as ``?error=invalid_request``, which the caller must check.

    The provider's cookies (``_session``, ``_interaction``,
    ``_interaction_resume`` and their ``.sig`` companions) are not
    port-specific, so a client that also talks to a relying party on 127.0.0.1
    sends them there too.

    Raises AssertionError when a page is not a redirect or one of the expected
    forms, for example the provider's error page for an invalid authorization
    request.
    """
    provider_origin = _origin(authorize_url)
    url = authorize_url
    form_data: dict[str, str] | None = None
    prompts_seen: list[str] = []

    for _ in range(MAX_LOGIN_REQUESTS):
        if form_data is None:
            response = client.get(url, follow_redirects=False)
        else:
            response = client.post(url, data=form_data, follow_redirects=False)
        form_data = None

        if response.is_redirect:
            location = urljoin(str(response.url), response.headers["location"])
            if _origin(location) != provider_origin:
                return location
            url = location
            continue

        if response.status_code != 200 or "html" not in response.headers.get("content-type", ""):
            raise AssertionError(
                f"expected a redirect or an HTML interaction page: {_page_summary(response)}"
            )

        parser = HtmlPageParser()
        parser.feed(response.text)
        parser.close()
        form = _find_interaction_form(parser, response)
        prompt = form.fields["prompt"]
        if prompt in prompts_seen:
            raise AssertionError(
                f"the provider showed the {prompt!r} form again after it was submitted: "
                f"{_page_summary(response, parser)}"
            )
        prompts_seen.append(prompt)

        form_data = dict(form.fields)
        if prompt == "login":
            if "login" not in form.fields or "password" not in form.fields:
                raise AssertionError(
                    "expected 'login' and 'password' fields in the login form: "
                    f"{_page_summary(response, parser)}"
                )
            form_data["login"] = login
            form_data["password"] = DEV_LOGIN_PASSWORD
        elif prompt != "consent":
            raise AssertionError(
                f"expected a 'login' or 'consent' prompt, got {prompt!r}: "
                f"{_page_summary(response, parser)}"
            )

        url = urljoin(str(response.url), form.action)
        if _origin(url) != provider_origin:
            raise AssertionError(
                f"the {prompt!r} form posts to {url}, which is not on the provider's origin"
            )

    raise AssertionError(
        f"no redirect to the relying party after {MAX_LOGIN_REQUESTS} requests to the provider; "
        f"last URL {url}"
    )
