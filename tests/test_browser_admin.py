"""The admin page in a real Chromium: users, an action with its CSRF form, the chart, both themes.

The sample CRM behind GuardMiddleware and the demo provider run under uvicorn
in a background thread on free loopback ports; every new user gets the
``admin`` role here, so the person who signs in may open the admin page.
Screenshots go to ``test-artifacts/admin-light.png`` and ``admin-dark.png``.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import expect, sync_playwright

from moko_guard import GuardMiddleware, settings_from_mapping
from moko_guard.demo import load_sample_crm
from moko_guard.demo.provider import DemoProvider
from test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, PAGE_TIMEOUT_MS, free_port

pytestmark = pytest.mark.e2e

STARTUP_TIMEOUT_SECONDS = 20.0


class ServerThread:
    """The provider and the guarded CRM, served from one event loop in a thread."""

    def __init__(self, tmp_path: Path) -> None:
        self.port, self.provider_port = free_port(), free_port()
        secret = secrets.token_urlsafe(32)
        self.settings = settings_from_mapping({
            "server": {"public_url": f"http://127.0.0.1:{self.port}", "enforce_https": False,
                       "insecure_allow_http": True},
            "session": {"secrets": [secrets.token_urlsafe(48)]},
            "store": {"url": f"sqlite:///{tmp_path / 'admin.db'}"},
            "access": {"auto_provision": True, "provision_email_domains": ["example.com"],
                       "default_roles": ["user", "admin"]},
            "providers": [{"id": "demo", "type": "oidc", "name": "Demo provider",
                           "issuer": f"http://127.0.0.1:{self.provider_port}",
                           "insecure_allow_http_issuer": True, "client_id": "moko-demo",
                           "client_secret": secret, "id_token_algorithms": ["RS256"]}],
        })
        provider = DemoProvider(issuer=f"http://127.0.0.1:{self.provider_port}",
                                client_id="moko-demo", client_secret=secret,
                                redirect_uri=self.settings.server.redirect_uri)
        self.app = GuardMiddleware(load_sample_crm(), self.settings)
        self.servers = [
            uvicorn.Server(uvicorn.Config(provider.app(), host="127.0.0.1",
                                          port=self.provider_port, log_level="warning",
                                          lifespan="off")),
            uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                          log_level="warning", lifespan="on")),
        ]
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve_all() -> None:
            await asyncio.gather(*(server.serve() for server in self.servers))

        asyncio.run(serve_all())

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not all(server.started for server in self.servers):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the admin test servers did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerThread]:
    running = ServerThread(tmp_path)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_admin_page_in_chromium(servers: ServerThread) -> None:
    assert CHROMIUM.exists(), f"Chromium not found at {CHROMIUM}: install Debian's package"
    ARTIFACTS.mkdir(exist_ok=True)
    base = f"http://127.0.0.1:{servers.port}"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            page = context.new_page()
            for email in ("bob@example.com", "dana@example.com"):
                page.goto(f"{base}/deals")
                page.get_by_text("Sign in with Demo provider").click()
                page.fill("#email", email)
                page.get_by_role("button", name="Sign in to the demo").click()
                expect(page.locator("#signed-in-user")).to_contain_text(email)
                if email == "bob@example.com":
                    page.goto(f"{base}/oauth2/sign_out")

            page.goto(f"{base}/oauth2/admin")
            expect(page.locator("h1")).to_have_text("Admin")
            expect(page.locator("#users")).to_contain_text("bob@example.com")
            expect(page.locator("svg.chart rect.ok").last).to_be_visible()
            page.emulate_media(color_scheme="light")
            page.screenshot(path=str(ARTIFACTS / "admin-light.png"), full_page=True)
            page.emulate_media(color_scheme="dark")
            page.screenshot(path=str(ARTIFACTS / "admin-dark.png"), full_page=True)

            bob_row = page.locator("#users tr", has_text="bob@example.com")
            bob_row.get_by_role("button", name="Disable").click()

            expect(page.locator("#users tr", has_text="bob@example.com")).to_contain_text(
                "disabled")
            expect(page.locator("#audit")).to_contain_text("user.disabled")
        finally:
            browser.close()
