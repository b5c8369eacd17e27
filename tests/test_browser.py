"""The README's first command, ``moko-guard demo``, driven in a real Chromium.

The demo runs as a subprocess on two free loopback ports; Playwright drives the
Chromium that Debian packages (``apt install chromium``). No browser is
downloaded: the test fails, it does not skip, when that Chromium is missing,
because CI installs it.

Screenshots go to ``test-artifacts/`` at the repository root, for a person to
look at: the sign-in page in light and dark theme and the signed-in CRM page.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # The machine has no internet: without these Chromium keeps calling home.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
RUNNING_LINE = "moko_guard demo is running"
STARTUP_TIMEOUT_SECONDS = 20.0
SHUTDOWN_TIMEOUT_SECONDS = 10.0
START_ATTEMPTS = 3
PAGE_TIMEOUT_MS = 15_000
EMAIL = "carol@example.com"


@dataclass(frozen=True)
class Demo:
    base_url: str
    provider_url: str


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function ran."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def demo_command() -> list[str]:
    """The ``moko-guard`` script of this interpreter's installation, else ``-m``."""
    script = Path(sysconfig.get_path("scripts")) / "moko-guard"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-m", "moko_guard.cli"]


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl+C by PID (the demo then removes its data folder), SIGKILL if that hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=SHUTDOWN_TIMEOUT_SECONDS)


def start_demo(log_path: Path) -> tuple[subprocess.Popen[bytes], Demo] | None:
    """Start the demo on two free ports and wait for its "is running" line.

    Returns None when a port was taken between ``free_port()`` and the demo's bind
    (another process on the machine got it first), so the caller can try again.
    """
    port, provider_port = free_port(), free_port()
    while provider_port == port:
        provider_port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*demo_command(), "demo", "--port", str(port), "--provider-port", str(provider_port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=REPO_ROOT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while RUNNING_LINE not in (output := log_path.read_text(errors="replace")):
            if process.poll() is not None:
                if "address already in use" in output:
                    return None
                pytest.fail(f"moko-guard demo exited with {process.returncode} before it was "
                            f"running:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail(f"moko-guard demo did not print {RUNNING_LINE!r} within "
                            f"{STARTUP_TIMEOUT_SECONDS:.0f}s:\n{output}")
            time.sleep(0.1)
    except BaseException:
        stop(process)
        raise
    return process, Demo(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{provider_port}")


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    for attempt in range(1, START_ATTEMPTS + 1):
        started = start_demo(tmp_path / f"demo-{attempt}.log")
        if started is not None:
            break
    else:
        pytest.fail(f"moko-guard demo found its ports taken {START_ATTEMPTS} times in a row")
    process, running = started
    try:
        yield running
    finally:
        stop(process)


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, through Playwright; closed on exit."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        )
        try:
            yield browser
        finally:
            browser.close()


def background(page: Page) -> str:
    """The computed background colour of the page body, e.g. ``rgb(245, 246, 248)``."""
    value: str = page.evaluate("getComputedStyle(document.body).backgroundColor")
    return value


def check_theme_toggle(page: Page, scheme_background: str, flipped_background: str) -> None:
    """Clicking "Switch theme" flips the colours in place; clicking again restores them."""
    page.evaluate("window.__mokoNoReload = true")
    toggle = page.get_by_text("Switch theme", exact=True)
    toggle.click()
    expect(page.locator("#theme-toggle")).to_be_checked()
    assert background(page) == flipped_background
    toggle.click()
    expect(page.locator("#theme-toggle")).not_to_be_checked()
    assert background(page) == scheme_background
    assert page.evaluate("window.__mokoNoReload === true"), "the theme switch reloaded the page"


def test_demo_sign_in_and_out_in_chromium(demo: Demo) -> None:
    # A failure, not a skip, and in the test itself so pytest reports FAILED: CI installs it.
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package "
                    "(apt-get install chromium). This test never downloads a browser.",
                    pytrace=False)
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as browser:
        sign_in_and_out(browser, demo)


def sign_in_and_out(browser: Browser, demo: Demo) -> None:
    context = browser.new_context(viewport={"width": 1024, "height": 720})
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        page = context.new_page()

        # A guarded page sends a browser without a session to the sign-in page.
        page.goto(f"{demo.base_url}/deals")
        expect(page).to_have_url(f"{demo.base_url}/oauth2/sign_in?rd=%2Fdeals")
        expect(page).to_have_title("Sign in")
        expect(page.get_by_role("heading", level=1)).to_have_text("Sign in")
        button = page.get_by_role("link", name="Sign in with Demo provider", exact=True)
        expect(button).to_be_visible()

        # Light and dark theme follow the browser's preference.
        page.emulate_media(color_scheme="light")
        light = background(page)
        page.screenshot(path=ARTIFACTS / "sign-in-light.png", full_page=True)
        page.emulate_media(color_scheme="dark")
        dark = background(page)
        page.screenshot(path=ARTIFACTS / "sign-in-dark.png", full_page=True)
        assert light != dark, f"light and dark theme share the background {light}"

        # "Switch theme" flips either theme to the other one, without a reload.
        check_theme_toggle(page, scheme_background=dark, flipped_background=light)
        page.emulate_media(color_scheme="light")
        check_theme_toggle(page, scheme_background=light, flipped_background=dark)

        # Sign in on the demo provider.
        button.click()
        expect(page).to_have_url(re.compile(re.escape(f"{demo.provider_url}/authorize?")))
        page.get_by_label("Email at example.com").fill(EMAIL)
        page.get_by_role("button", name="Sign in to the demo").click()

        # Back on the page first asked for, in the sample CRM, signed in.
        expect(page).to_have_url(f"{demo.base_url}/deals")
        expect(page).to_have_title("Sample CRM")
        expect(page.locator("#signed-in-user")).to_contain_text(f"Signed in as {EMAIL}")
        page.screenshot(path=ARTIFACTS / "crm-signed-in.png", full_page=True)
        session = [c["value"] for c in context.cookies(demo.base_url)
                   if c["name"] == "moko_session"]
        assert session, "no moko_session cookie after signing in"

        # Sign out: the guard says so and the CRM asks for a sign-in again.
        page.get_by_role("link", name="Sign out").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Signed out")
        page.goto(f"{demo.base_url}/deals")
        expect(page).to_have_url(f"{demo.base_url}/oauth2/sign_in?rd=%2Fdeals")
        expect(page.get_by_text("Signed in as")).to_have_count(0)

        # The old session cookie is revoked on the server, not only cleared in the browser.
        context.add_cookies([{"name": "moko_session", "value": session[0], "url": demo.base_url}])
        replay = context.request.get(f"{demo.base_url}/deals", max_redirects=0)
        assert replay.status == 302, replay.status
        assert replay.headers["location"].startswith("/oauth2/sign_in"), replay.headers
    finally:
        context.close()


def sign_in_over_http(client: httpx.Client, demo: Demo, email: str, rd: str) -> httpx.Response:
    """Sign in through the demo provider's form without a browser; return the callback's response."""
    start = client.get(f"{demo.base_url}/oauth2/start", params={"provider": "demo", "rd": rd})
    assert start.status_code == 302
    authorize = httpx.URL(start.headers["location"])
    form = client.post(f"{demo.provider_url}/authorize",
                       data={**dict(authorize.params), "email": email})
    assert form.status_code == 302
    return client.get(form.headers["location"])


def test_demo_admin_account_opens_admin_page(demo: Demo) -> None:
    """The README's demo: admin@example.com has the admin role, any other address does not."""
    with httpx.Client(timeout=10.0) as admin, httpx.Client(timeout=10.0) as user:
        admin_callback = sign_in_over_http(admin, demo, "admin@example.com", "/oauth2/admin")
        user_callback = sign_in_over_http(user, demo, EMAIL, "/oauth2/admin")

        admin_page = admin.get(f"{demo.base_url}/oauth2/admin")
        user_page = user.get(f"{demo.base_url}/oauth2/admin")

    assert admin_callback.status_code == 302
    assert admin_callback.headers["location"] == "/oauth2/admin"
    assert admin_page.status_code == 200
    assert "admin@example.com" in admin_page.text
    assert user_callback.status_code == 302
    assert user_page.status_code == 403
