"""Guard configs, stores and session cookies for the benchmark servers."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from moko_guard import Guard, load_settings
from moko_guard.config import Settings

SECRET_VARIABLE = "MOKO_BENCH_SESSION_SECRET"
CLIENT_SECRET_VARIABLE = "MOKO_BENCH_CLIENT_SECRET"
CLIENT_ID = "moko-bench"
PROVIDER_ID = "demo"
EMAIL_DOMAIN = "example.com"


def bench_environment() -> dict[str, str]:
    """Return the secret variables that every guard config below refers to, created once per run."""
    for name in (SECRET_VARIABLE, CLIENT_SECRET_VARIABLE):
        os.environ.setdefault(name, secrets.token_urlsafe(48))
    return {name: os.environ[name] for name in (SECRET_VARIABLE, CLIENT_SECRET_VARIABLE)}


def write_config(path: Path, *, public_port: int, provider_port: int, store_url: str,
                 upstream: str | None = None, sign_in_rate_limit: bool = True) -> Path:
    """Write a guard config for loopback http: trusts 127.0.0.1 as a proxy, provisions example.com.

    ``sign_in_rate_limit=False`` turns off the per-client-IP sign-in limit, which
    a benchmark whose every sign-in comes from 127.0.0.1 would otherwise hit.
    """
    upstream_line = f'upstream = "{upstream}"\n' if upstream else ""
    rate_limit = "" if sign_in_rate_limit else "\n[rate_limit]\nsign_in_per_minute = 0\n"
    path.write_text(f"""\
[server]
public_url = "http://127.0.0.1:{public_port}"
enforce_https = false
insecure_allow_http = true
trusted_proxies = ["127.0.0.1/32"]
{upstream_line}
[session]
secrets = ["env:{SECRET_VARIABLE}"]
lifetime = "8h"

[store]
url = "{store_url}"

[access]
auto_provision = true
provision_email_domains = ["{EMAIL_DOMAIN}"]
default_roles = ["user"]
{rate_limit}
[[providers]]
id = "{PROVIDER_ID}"
type = "oidc"
name = "Demo provider"
issuer = "http://127.0.0.1:{provider_port}"
insecure_allow_http_issuer = true
client_id = "{CLIENT_ID}"
client_secret = "env:{CLIENT_SECRET_VARIABLE}"
id_token_algorithms = ["RS256"]
""")
    return path


async def _issue_sessions(settings: Settings, count: int) -> list[str]:
    guard = Guard(settings)
    await guard.startup()
    try:
        headers = []
        for number in range(count):
            email = f"user{number}@{EMAIL_DOMAIN}"
            existing = await guard.store.user_for_identity(PROVIDER_ID, f"bench-{number}")
            if existing is None:
                user, _created = await guard.store.create_user_with_identity(
                    username=email, email=email, display_name=f"User {number}", roles=["user"],
                    provider=PROVIDER_ID, subject=f"bench-{number}", identity_email=email,
                )
            else:
                user = existing
            value, _principal = await guard.sessions.issue(
                user, PROVIDER_ID, f"user{number}", client_ip="127.0.0.1", user_agent="moko-bench",
            )
            headers.append(f"{settings.session.cookie_name}={value}")
        return headers
    finally:
        await guard.shutdown()


def issue_sessions(config_path: Path, count: int) -> list[str]:
    """Create ``count`` users with a session each, and return their Cookie header values.

    Opening the store here also creates the schema before any server starts.
    """
    return asyncio.run(_issue_sessions(load_settings(str(config_path)), count))
