"""The examples/ directory: the middleware apps serve, and the compose files are consistent.

The Starlette and FastAPI examples are imported as uvicorn would import them,
with MOKO_GUARD_CONFIG naming a config file of the test, and called in-process
through httpx's ASGI transport. Docker cannot run here, so the compose example
is checked without it: its YAML parses, the files it mounts exist, its guard
config passes `moko-guard check-config`, and `nginx -t` accepts its nginx
config with the service names replaced by 127.0.0.1 (so nothing is looked up
in DNS).
"""

from __future__ import annotations

import importlib.util
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from support.nginx import check_config, write_config
from support.processes import python_environment

from moko_guard import GuardMiddleware

REPO_DIR = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_DIR / "examples"
COMPOSE_DIR = EXAMPLES_DIR / "compose"
PUBLIC_URL = "http://127.0.0.1:4180"


def write_example_config(path: Path) -> Path:
    path.write_text(
        "[server]\n"
        f'public_url = "{PUBLIC_URL}"\n'
        "enforce_https = false\n"
        "insecure_allow_http = true\n"
        "\n[session]\n"
        f'secrets = ["{secrets.token_urlsafe(36)}"]\n'
        "\n[store]\n"
        f'url = "sqlite:///{path.parent / "guard.db"}"\n'
        "\n[access]\n"
        'public_paths = ["/public/"]\n'
        "\n[[providers]]\n"
        'id = "corp"\n'
        'type = "oidc"\n'
        'name = "Corporate sign-in"\n'
        'issuer = "https://login.example.test"\n'
        'client_id = "crm"\n'
        'client_secret = "example-client-secret"\n',
        encoding="utf-8",
    )
    return path


def import_example(name: str, config_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import examples/<name>.py afresh, as `uvicorn examples.<name>:app` would."""
    monkeypatch.setenv("MOKO_GUARD_CONFIG", str(config_path))
    spec = importlib.util.spec_from_file_location(f"moko_example_{name}", EXAMPLES_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["starlette_app", "fastapi_app"])
async def example_app(request: pytest.FixtureRequest, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[GuardMiddleware]:
    module = import_example(request.param, write_example_config(tmp_path / "guard.toml"),
                            monkeypatch)
    app: GuardMiddleware = module.app
    yield app
    await app.guard.shutdown()


def example_client(app: GuardMiddleware) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    return httpx.AsyncClient(transport=transport, base_url=PUBLIC_URL)


@pytest.mark.anyio
async def test_example_sends_browser_to_sign_in(example_app: GuardMiddleware) -> None:
    async with example_client(example_app) as client:
        home = await client.get("/")
        me = await client.get("/api/me?tab=2")

    assert isinstance(example_app, GuardMiddleware)
    assert home.status_code == 302
    assert home.headers["location"] == "/oauth2/sign_in?rd=%2F"
    assert me.status_code == 302
    assert me.headers["location"] == "/oauth2/sign_in?rd=%2Fapi%2Fme%3Ftab%3D2"


@pytest.mark.anyio
async def test_example_api_client_gets_401(example_app: GuardMiddleware) -> None:
    async with example_client(example_app) as client:
        response = await client.get("/api/me", headers={"Accept": "application/json"})

    assert response.status_code == 401
    assert response.json()["error"] == "unauthenticated"


@pytest.mark.anyio
async def test_example_serves_the_sign_in_page(example_app: GuardMiddleware) -> None:
    async with example_client(example_app) as client:
        page = await client.get("/oauth2/sign_in", params={"rd": "/api/me"})

    assert page.status_code == 200
    assert 'data-provider="corp"' in page.text
    assert "/oauth2/start?provider=corp&amp;rd=%2Fapi%2Fme" in page.text


def test_example_without_config_fails_at_import(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from moko_guard import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        import_example("starlette_app", tmp_path / "missing.toml", monkeypatch)


# --- examples/compose -------------------------------------------------------------


def load_compose(name: str) -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    document: dict[str, Any] = yaml.safe_load((COMPOSE_DIR / name).read_text(encoding="utf-8"))
    return document


def host_path(volume: str) -> Path:
    return (COMPOSE_DIR / volume.split(":", 1)[0]).resolve()


def test_compose_services_and_mounted_files() -> None:
    compose = load_compose("docker-compose.yml")
    services = compose["services"]

    assert set(services) == {"nginx", "guard", "crm"}
    assert list(services["nginx"]["ports"]) == ["127.0.0.1:8080:80"]
    assert "ports" not in services["guard"]
    assert "ports" not in services["crm"]
    for name in ("guard", "crm"):
        build = services[name]["build"]
        assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == (
            REPO_DIR / "Dockerfile")
    bind_mounts = [volume for service in services.values()
                   for volume in service.get("volumes", []) if volume.startswith(".")]
    assert len(bind_mounts) == 3
    for volume in bind_mounts:
        assert host_path(volume).is_file(), volume
    assert host_path(services["crm"]["volumes"][0]) == EXAMPLES_DIR / "sample_crm.py"


def test_compose_nginx_address_is_the_trusted_proxy() -> None:
    compose = load_compose("docker-compose.yml")
    guard_config = (COMPOSE_DIR / "moko-guard.toml").read_text(encoding="utf-8")

    address = compose["services"]["nginx"]["networks"]["moko"]["ipv4_address"]

    assert f'trusted_proxies = ["{address}/32"]' in guard_config
    subnet = compose["networks"]["moko"]["ipam"]["config"][0]["subnet"]
    assert address.rsplit(".", 1)[0] == subnet.rsplit(".", 1)[0]


def test_compose_postgres_variant_sets_the_store() -> None:
    compose = load_compose("docker-compose.postgres.yml")
    services = compose["services"]

    assert set(services) == {"postgres", "guard"}
    assert services["guard"]["environment"]["MOKO_GUARD_STORE_URL"].startswith(
        "postgresql://moko_guard:")
    assert services["guard"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in services["postgres"]


def test_compose_guard_config_is_valid(tmp_path: Path) -> None:
    env = python_environment(
        MOKO_GUARD_CONFIG=str(COMPOSE_DIR / "moko-guard.toml"),
        MOKO_GUARD_SECRET=secrets.token_urlsafe(36),
        MOKO_GUARD_PROVIDER_CORP_ISSUER="https://login.example.test",
        MOKO_GUARD_PROVIDER_CORP_CLIENT_ID="crm",
        OIDC_CLIENT_SECRET="example-client-secret",
        # The image's /var/lib/moko-guard does not exist on the test machine.
        MOKO_GUARD_STORE_URL=f"sqlite:///{tmp_path / 'guard.db'}",
    )

    result = subprocess.run([sys.executable, "-m", "moko_guard.cli", "check-config"],
                            capture_output=True, text=True, timeout=30, check=False, env=env,
                            stdin=subprocess.DEVNULL)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "providers corp (oidc)" in result.stdout


def test_compose_nginx_config_passes_nginx_check(tmp_path: Path) -> None:
    text = (COMPOSE_DIR / "nginx.conf").read_text(encoding="utf-8")
    loopback, count = re.subn(r"server (guard|crm):(\d+);", r"server 127.0.0.1:\2;", text)
    listen, listens = re.subn(r"listen 80;", "listen 127.0.0.1:18080;", loopback)
    assert (count, listens) == (2, 1)

    output = check_config(tmp_path, write_config(tmp_path, listen))

    assert "syntax is ok" in output
