"""Tests of settings loading: TOML, environment overrides, secret references, validation."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import BaseModel

from moko_guard.config import (
    MIN_SESSION_SECRET_LENGTH,
    ProviderSettings,
    Settings,
    load_settings,
    parse_duration,
    settings_from_mapping,
)
from moko_guard.errors import ConfigError

SESSION_SECRET = "session-secret-0123456789abcdefghijklmnop"
CLIENT_SECRET = "client-secret-do-not-print-4f1c9a"

MINIMAL_TOML = f"""
[server]
public_url = "https://crm.example.com"

[session]
secrets = ["{SESSION_SECRET}"]

[[providers]]
id = "idp"
type = "oidc"
issuer = "https://idp.example.com"
client_id = "crm"
client_secret = "{CLIENT_SECRET}"
"""

# The example configuration of the design document, with values in place of its placeholders.
DESIGN_TOML = """
[server]
public_url = "https://crm.example.com"   # redirect URI = public_url + callback_path
mode = "sso_only"                         # or "optional": anonymous requests pass, SSO is offered
enforce_https = true                      # http -> https redirect, Secure cookies, HSTS, https-only redirects
trusted_proxies = ["127.0.0.1/32"]        # only these may set X-Forwarded-* / X-Original-URI
upstream = "http://127.0.0.1:8080"        # reverse-proxy mode only
prefix = "/oauth2"                        # where the guard's own endpoints live
callback_path = "/oauth2/callback"        # e.g. "/user/oauthcallback.php" keeps a redirect URI already registered
insecure_allow_http = false               # loopback testing only; logged as a warning

[session]
secrets = ["env:MOKO_GUARD_SECRET", "file:OLD_SECRET_PATH"]  # first one seals, all open
lifetime = "8h"
cookie_domain = ".example.com"            # one sign-in across subdomains

[store]
url = "sqlite:///STORE_PATH"   # or postgresql://user@host/db

[access]
allowed_email_domains = ["example.com"]   # exact domain match on a verified email
allowed_roles = []                         # or: only users holding one of these roles
auto_provision = true
provision_email_domains = ["example.com"]
default_roles = ["user"]
allowed_redirect_hosts = [".example.com"]
public_paths = ["/healthz", "/static/"]
native_login_paths = ["/login"]           # blocked in sso_only mode
[[access.rules]]
path = "/admin"
roles = ["admin"]

[[providers]]
id = "google"
type = "google"            # google | microsoft | facebook | github | oidc | oauth2
client_id = "1234567890-crm.apps.googleusercontent.com"
client_secret = "env:GOOGLE_CLIENT_SECRET"
"""


def minimal_config() -> dict[str, Any]:
    return {
        "server": {"public_url": "https://crm.example.com"},
        "session": {"secrets": [SESSION_SECRET]},
        "providers": [{
            "id": "idp", "type": "oidc", "issuer": "https://idp.example.com",
            "client_id": "crm", "client_secret": CLIENT_SECRET,
        }],
    }


def config_with(**sections: Any) -> dict[str, Any]:
    """Return the minimal config with whole sections replaced or merged in."""
    config = minimal_config()
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = copy.deepcopy(value)
    return config


def provider(**fields: Any) -> dict[str, Any]:
    base = {
        "id": "idp", "type": "oidc", "issuer": "https://idp.example.com",
        "client_id": "crm", "client_secret": CLIENT_SECRET,
    }
    return {**base, **fields}


def problems_of(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data, environ={} if environ is None else environ)
    return caught.value.problems


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "moko-guard.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- loading -------------------------------------------------------------------


def test_minimal_toml_loads(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)

    settings = load_settings(path, environ={})

    assert settings.server.public_url == "https://crm.example.com"
    assert settings.server.redirect_uri == "https://crm.example.com/oauth2/callback"
    assert [secret.get() for secret in settings.session.secrets] == [SESSION_SECRET]
    assert settings.session.lifetime == 8 * 3600
    assert settings.store.url == "sqlite:///moko-guard.db"
    provider_settings = settings.provider("idp")
    assert provider_settings is not None
    assert provider_settings.client_secret is not None
    assert provider_settings.client_secret.get() == CLIENT_SECRET


def test_design_example_toml_loads(tmp_path: Path) -> None:
    old_secret_path = tmp_path / "guard-old"
    old_secret_path.write_text("o" * 40 + "\n", encoding="utf-8")
    text = (
        DESIGN_TOML
        .replace("OLD_SECRET_PATH", str(old_secret_path))
        .replace("STORE_PATH", str(tmp_path / "guard.db"))
    )
    path = write_toml(tmp_path, text)
    environ = {"MOKO_GUARD_SECRET": "n" * 40, "GOOGLE_CLIENT_SECRET": "google-client-secret"}

    settings = load_settings(path, environ=environ)

    assert [secret.get() for secret in settings.session.secrets] == ["n" * 40, "o" * 40]
    assert settings.session.cookie_domain == ".example.com"
    assert settings.server.upstream == "http://127.0.0.1:8080"
    assert [str(network) for network in settings.server.trusted_proxies] == ["127.0.0.1/32"]
    assert settings.access.rules[0].path == "/admin"
    assert settings.access.rules[0].roles == ["admin"]
    google = settings.provider("google")
    assert google is not None
    assert google.type == "google"
    assert google.client_secret is not None
    assert google.client_secret.get() == "google-client-secret"


def test_missing_file_reports_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})

    assert len(caught.value.problems) == 1
    assert str(path) in caught.value.problems[0]
    assert "not found" in caught.value.problems[0]


def test_invalid_toml_reported(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server\npublic_url = ")

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})

    assert "not valid TOML" in caught.value.problems[0]


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)

    settings = load_settings(None, environ={"MOKO_GUARD_CONFIG": str(path)})

    assert settings.server.public_url == "https://crm.example.com"


# --- every problem at once --------------------------------------------------------


def test_all_problems_reported_together() -> None:
    data = {
        "server": {"public_url": "https://crm.example.com", "mode": "everyone"},
        "session": {"secrets": [SESSION_SECRET], "lifetime": "eight"},
        "store": {"url": "mysql://db.example.com/guard"},
        "access": {"colour": "red"},
        "providers": [provider(id_token_algorithms=["HS256"])],
    }

    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data, environ={})

    problems = caught.value.problems
    assert len(problems) == 5
    expected = [
        ("server.mode", "everyone", "sso_only"),
        ("session.lifetime", "eight", "8h"),
        ("store.url", "mysql://db.example.com/guard", "postgresql://"),
        ("access.colour", "colour", "remove it"),
        ("providers[0].id_token_algorithms", "HS256", "RS256"),
    ]
    for key, value, fix in expected:
        matching = [p for p in problems if f'"{key}"' in p]
        assert len(matching) == 1, (key, problems)
        assert value in matching[0], matching[0]
        assert fix in matching[0], matching[0]
    message = str(caught.value)
    assert message.startswith("the configuration has 5 problems:")
    for problem in problems:
        assert problem in message


def test_problems_in_every_section_reported_together() -> None:
    data = {
        "server": {"public_url": "http://crm.example.com"},
        "session": {"secrets": ["too-short"]},
        "access": {"auto_provision": True},
        "providers": [provider(issuer=None), provider(id="second", id_token_algorithms=["none"])],
    }

    problems = problems_of(data)

    assert len(problems) == 5
    assert any("server.enforce_https" in p for p in problems)
    assert any("session.secrets" in p and "shorter than 32" in p for p in problems)
    assert any("access.provision_email_domains" in p for p in problems)
    assert any('"idp"' in p and "needs issuer" in p for p in problems)
    assert any("providers[1].id_token_algorithms" in p and "none" in p for p in problems)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        (config_with(logs={"level": "debug"}), "logs"),
        (config_with(server={"public_url": "https://crm.example.com", "listen": "0"}),
         "server.listen"),
        (config_with(session={"secrets": [SESSION_SECRET], "lifetme": "8h"}), "session.lifetme"),
        (config_with(providers=[provider(client_secrett="x")]), "providers[0].client_secrett"),
        (config_with(access={"rules": [{"path": "/admin", "role": ["admin"]}]}),
         "access.rules[0].role"),
    ],
    ids=["section", "server-key", "session-key", "provider-key", "rule-key"],
)
def test_unknown_key_rejected(data: dict[str, Any], key: str) -> None:
    problems = problems_of(data)

    assert problems == [f'"{key}" is not a known setting: remove it or check its spelling']


# --- durations -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("8h", 28800.0), ("30m", 1800.0), ("90s", 90.0), ("500ms", 0.5), ("7d", 604800.0),
     (" 45 m ", 2700.0), (120, 120.0), (1.5, 1.5)],
    ids=["hours", "minutes", "seconds", "milliseconds", "days", "spaces", "int", "float"],
)
def test_duration_parsed(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value",
    ["eight", "8 hours", "8H", "-5m", "1.5h", "", True, None, [8]],
    ids=["word", "long-unit", "upper-unit", "negative-text", "fraction-text", "empty", "bool",
         "none", "list"],
)
def test_invalid_duration_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    "value", [0, "0s", -5, -0.5], ids=["zero", "zero-text", "negative", "negative-float"]
)
def test_non_positive_duration_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="greater than zero"):
        parse_duration(value)


@pytest.mark.parametrize(
    "value",
    [float("inf"), float("nan"), 10**400, "1" + "0" * 400 + "ms", "1" + "0" * 400 + "d"],
    ids=["inf", "nan", "huge-int", "huge-milliseconds", "huge-days"],
)
def test_non_finite_duration_rejected(value: object) -> None:
    problems = problems_of(config_with(session={"secrets": [SESSION_SECRET], "lifetime": value}))

    assert len(problems) == 1
    assert problems[0].startswith('"session.lifetime" must be a finite duration')


@pytest.mark.parametrize(
    ("lifetime", "found"),
    [("eight", '"eight"'), (0, "0"), (-60, "-60")],
    ids=["word", "zero", "negative"],
)
def test_invalid_session_lifetime_named_in_problem(lifetime: object, found: str) -> None:
    problems = problems_of(config_with(session={"secrets": [SESSION_SECRET], "lifetime": lifetime}))

    assert len(problems) == 1
    assert problems[0].startswith('"session.lifetime" must be a duration')
    assert problems[0].endswith(f"found {found}")


def test_durations_in_every_section_parsed() -> None:
    data = config_with(
        session={"secrets": [SESSION_SECRET], "lifetime": "30m",
                 "revocation_poll_interval": "90s"},
        store={"busy_timeout": "500ms"},
        providers=[provider(timeout="20s", connect_timeout="2s")],
    )

    settings = settings_from_mapping(data, environ={})

    assert settings.session.lifetime == 1800
    assert settings.session.revocation_poll_interval == 90
    assert settings.store.busy_timeout == 0.5
    assert settings.providers[0].timeout == 20
    assert settings.providers[0].connect_timeout == 2


# --- secret references -----------------------------------------------------------


def test_env_reference_resolved() -> None:
    data = config_with(
        session={"secrets": ["env:SESSION_KEY"]},
        providers=[provider(client_secret="env:IDP_SECRET")],
    )

    settings = settings_from_mapping(data, environ={"SESSION_KEY": SESSION_SECRET,
                                                    "IDP_SECRET": CLIENT_SECRET})

    assert settings.session.secrets[0].get() == SESSION_SECRET
    assert settings.session.secrets[0].reference == "env:SESSION_KEY"
    assert settings.providers[0].client_secret is not None
    assert settings.providers[0].client_secret.get() == CLIENT_SECRET


def test_missing_env_variable_named() -> None:
    data = config_with(providers=[provider(client_secret="env:IDP_SECRET")])

    problems = problems_of(data, environ={})

    assert len(problems) == 1
    assert problems[0].startswith('"providers[0].client_secret"')
    assert '"IDP_SECRET"' in problems[0]
    assert "not set" in problems[0]


def test_empty_env_variable_rejected() -> None:
    data = config_with(session={"secrets": ["env:SESSION_KEY"]})

    problems = problems_of(data, environ={"SESSION_KEY": ""})

    assert len(problems) == 1
    assert problems[0].startswith('"session.secrets"')
    assert "empty value" in problems[0]


def test_file_reference_strips_trailing_newline(tmp_path: Path) -> None:
    secret_path = tmp_path / "client-secret"
    secret_path.write_text(CLIENT_SECRET + "\r\n", encoding="utf-8")
    data = config_with(providers=[provider(client_secret=f"file:{secret_path}")])

    settings = settings_from_mapping(data, environ={})

    assert settings.providers[0].client_secret is not None
    assert settings.providers[0].client_secret.get() == CLIENT_SECRET


@pytest.mark.parametrize("kind", ["missing", "directory"], ids=["missing", "directory"])
def test_unreadable_secret_file_named(tmp_path: Path, kind: str) -> None:
    secret_path = tmp_path / "secret"
    if kind == "directory":
        secret_path.mkdir()
    data = config_with(providers=[provider(client_secret=f"file:{secret_path}")])

    problems = problems_of(data)

    assert len(problems) == 1
    assert str(secret_path) in problems[0]
    assert "cannot be read" in problems[0]
    assert "permissions" in problems[0]


def test_empty_secret_file_rejected(tmp_path: Path) -> None:
    secret_path = tmp_path / "secret"
    secret_path.write_text("\n", encoding="utf-8")
    data = config_with(session={"secrets": [f"file:{secret_path}"]})

    problems = problems_of(data)

    assert len(problems) == 1
    assert "empty value" in problems[0]


def test_session_secret_needs_32_characters() -> None:
    short = "k" * (MIN_SESSION_SECRET_LENGTH - 1)
    exact = "k" * MIN_SESSION_SECRET_LENGTH

    problems = problems_of(config_with(session={"secrets": [exact, short]}))
    accepted = settings_from_mapping(config_with(session={"secrets": [exact]}), environ={})

    assert len(problems) == 1
    assert "entry 1 is shorter than 32 characters" in problems[0]
    assert "moko-guard keys generate" in problems[0]
    assert accepted.session.secrets[0].get() == exact


def test_session_secrets_required() -> None:
    problems = problems_of(config_with(session={"secrets": []}))

    assert len(problems) == 1
    assert problems[0].startswith('"session.secrets" must list at least one secret')


def test_provider_without_client_secret_rejected() -> None:
    problems = problems_of(config_with(providers=[provider(client_secret=None)]))

    assert len(problems) == 1
    assert '"idp"' in problems[0]
    assert "client_secret is missing" in problems[0]


# --- secrets stay hidden -----------------------------------------------------------


def test_repr_hides_secrets() -> None:
    settings = settings_from_mapping(minimal_config(), environ={})

    text = repr(settings) + str(settings)

    assert SESSION_SECRET not in text
    assert CLIENT_SECRET not in text
    assert "**********" in text


@pytest.mark.parametrize(
    ("data", "secret"),
    [
        (config_with(session={"secrets": ["short-secret-XYZ"]}), "short-secret-XYZ"),
        (config_with(session={"secrets": "single-string-secret-0123456789abcdef"}),
         "single-string-secret-0123456789abcdef"),
        (config_with(session={"secrets": [SESSION_SECRET], "lifetime": "eight"},
                     providers=[provider(client_secret=["list-secret-QRS"])]),
         "list-secret-QRS"),
        (config_with(providers=[provider(client_secret=CLIENT_SECRET, issuer=None)]),
         CLIENT_SECRET),
        (config_with(providers=[provider(client_secret=CLIENT_SECRET,
                                         id_token_algorithms=["HS256"])]),
         CLIENT_SECRET),
        (config_with(session={"secrets": [SESSION_SECRET], "secret": "typo-secret-LMN"}),
         "typo-secret-LMN"),
    ],
    ids=["short-session", "string-not-list", "client-secret-list", "provider-error",
         "algorithm-error", "misspelt-key"],
)
def test_config_error_hides_secret(data: dict[str, Any], secret: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data, environ={})

    assert caught.value.problems
    assert secret not in str(caught.value)
    assert secret not in repr(caught.value)
    for problem in caught.value.problems:
        assert secret not in problem


def test_environment_secret_hidden_in_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)
    environ = {"MOKO_GUARD_SESSION_SECRETS": "env-short-secret"}

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ)

    problems = caught.value.problems
    assert len(problems) == 1
    assert "env-short-secret" not in str(caught.value)
    assert "env-short-secret" not in problems[0]
    assert "(value hidden)" in problems[0]


# --- environment overrides --------------------------------------------------------


def test_environment_overrides_store_url(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)
    url = f"sqlite:///{tmp_path / 'override.db'}"

    settings = load_settings(path, environ={"MOKO_GUARD_STORE_URL": url})

    assert settings.store.url == url


def test_environment_session_secrets_comma_list(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)
    first, second = "a" * 40, "b" * 40

    settings = load_settings(path, environ={"MOKO_GUARD_SESSION_SECRETS": f"{first}, {second},"})

    assert [secret.get() for secret in settings.session.secrets] == [first, second]


def test_environment_turns_off_https(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)
    environ = {
        "MOKO_GUARD_SERVER_PUBLIC_URL": "http://127.0.0.1:4180",
        "MOKO_GUARD_SERVER_ENFORCE_HTTPS": "false",
        "MOKO_GUARD_SERVER_INSECURE_ALLOW_HTTP": "true",
    }

    settings = load_settings(path, environ=environ)

    assert settings.server.enforce_https is False
    assert settings.server.insecure_allow_http is True
    assert settings.server.public_url == "http://127.0.0.1:4180"


def test_environment_https_off_needs_confirmation(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)
    environ = {"MOKO_GUARD_SERVER_ENFORCE_HTTPS": "false"}

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ=environ)

    assert len(caught.value.problems) == 1
    assert "insecure_allow_http" in caught.value.problems[0]


def test_environment_sets_provider_client_secret(tmp_path: Path) -> None:
    text = MINIMAL_TOML.replace('id = "idp"', 'id = "corp-idp"').replace(
        f'client_secret = "{CLIENT_SECRET}"\n', "")
    path = write_toml(tmp_path, text)
    environ = {"MOKO_GUARD_PROVIDER_CORP_IDP_CLIENT_SECRET": "from-environment"}

    settings = load_settings(path, environ=environ)

    corp = settings.provider("corp-idp")
    assert corp is not None
    assert corp.client_secret is not None
    assert corp.client_secret.get() == "from-environment"


def test_environment_override_wins_over_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)
    environ = {"MOKO_GUARD_PROVIDER_IDP_CLIENT_SECRET": "from-environment",
               "MOKO_GUARD_SESSION_LIFETIME": "30m"}

    settings = load_settings(path, environ=environ)

    assert settings.providers[0].client_secret is not None
    assert settings.providers[0].client_secret.get() == "from-environment"
    assert settings.session.lifetime == 1800


def test_environment_provider_longest_id_wins(tmp_path: Path) -> None:
    second = MINIMAL_TOML.split("[[providers]]")[1].replace('id = "idp"', 'id = "idp-eu"')
    path = write_toml(tmp_path, MINIMAL_TOML + "\n[[providers]]" + second)
    environ = {"MOKO_GUARD_PROVIDER_IDP_EU_CLIENT_SECRET": "eu-secret",
               "MOKO_GUARD_PROVIDER_IDP_CLIENT_SECRET": "main-secret"}

    settings = load_settings(path, environ=environ)

    main, eu = settings.provider("idp"), settings.provider("idp-eu")
    assert main is not None and main.client_secret is not None
    assert eu is not None and eu.client_secret is not None
    assert main.client_secret.get() == "main-secret"
    assert eu.client_secret.get() == "eu-secret"


def test_environment_keeps_invalid_provider_entry(tmp_path: Path) -> None:
    text = (
        'providers = ["idp", { id = "idp", type = "oidc", issuer = "https://idp.example.com", '
        'client_id = "crm" }]\n'
        + MINIMAL_TOML.split("[[providers]]")[0]
    )
    path = write_toml(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"MOKO_GUARD_PROVIDER_IDP_CLIENT_SECRET": CLIENT_SECRET})

    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith('"providers[0]"')


def test_environment_misspelt_key_rejected(tmp_path: Path) -> None:
    path = write_toml(tmp_path, MINIMAL_TOML)

    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={"MOKO_GUARD_STORE_ULR": "sqlite:///x.db"})

    assert caught.value.problems == [
        '"store.ulr" is not a known setting: remove it or check its spelling'
    ]


# --- server -------------------------------------------------------------------


def test_enforce_https_rejects_http_public_url() -> None:
    problems = problems_of(config_with(server={"public_url": "http://crm.example.com"}))

    assert len(problems) == 1
    assert '"http://crm.example.com"' in problems[0]
    assert "server.enforce_https" in problems[0]
    assert "use an https URL" in problems[0]


def test_https_off_without_insecure_flag_rejected() -> None:
    server = {"public_url": "http://127.0.0.1:4180", "enforce_https": False}

    problems = problems_of(config_with(server=server))

    assert len(problems) == 1
    assert "insecure_allow_http = true" in problems[0]


def test_https_off_with_insecure_flag_accepted() -> None:
    server = {"public_url": "http://127.0.0.1:4180", "enforce_https": False,
              "insecure_allow_http": True}

    settings = settings_from_mapping(config_with(server=server), environ={})

    assert settings.server.public_scheme == "http"


def test_trusted_proxies_parsed() -> None:
    server = {"public_url": "https://crm.example.com",
              "trusted_proxies": ["127.0.0.1/32", "::1/128", "10.0.0.0/8", "127.0.0.2"]}

    settings = settings_from_mapping(config_with(server=server), environ={})

    assert [str(n) for n in settings.server.trusted_proxies] == [
        "127.0.0.1/32", "::1/128", "10.0.0.0/8", "127.0.0.2/32"]


@pytest.mark.parametrize(
    ("entry", "shown"),
    [(True, "True"), (2130706433, "2130706433"), ("10.0.0.1/8", "'10.0.0.1/8'"),
     ("proxy.example.com", "'proxy.example.com'")],
    ids=["bool", "int", "host-bits-set", "host-name"],
)
def test_invalid_trusted_proxy_named_once(entry: object, shown: str) -> None:
    server = {"public_url": "https://crm.example.com", "trusted_proxies": ["127.0.0.1/32", entry]}

    problems = problems_of(config_with(server=server))

    assert len(problems) == 1
    assert problems[0].startswith(f'"server.trusted_proxies" entry {shown} is not a network')


# --- providers ----------------------------------------------------------------


def test_duplicate_provider_ids_rejected() -> None:
    data = config_with(providers=[provider(), provider(client_id="other")])

    problems = problems_of(data)

    assert problems == ['providers: id "idp" is used twice: make ids unique']


def test_no_provider_rejected() -> None:
    problems = problems_of(config_with(providers=[]))

    assert len(problems) == 1
    assert "add at least one provider" in problems[0]


def test_oidc_provider_needs_issuer() -> None:
    problems = problems_of(config_with(providers=[provider(issuer=None)]))

    assert len(problems) == 1
    assert 'providers "idp": type "oidc" needs issuer' in problems[0]


@pytest.mark.parametrize(
    "issuer",
    ["http://idp.example.com", "ftp://idp.example.com", "https://", "idp.example.com"],
    ids=["http", "ftp", "no-host", "no-scheme"],
)
def test_insecure_issuer_rejected(issuer: str) -> None:
    problems = problems_of(config_with(providers=[provider(issuer=issuer)]))

    assert len(problems) == 1
    assert f'issuer "{issuer}" must be an https URL' in problems[0]


def test_http_issuer_allowed_with_flag() -> None:
    data = config_with(providers=[provider(issuer="http://127.0.0.1:9000",
                                           insecure_allow_http_issuer=True)])

    settings = settings_from_mapping(data, environ={})

    assert settings.providers[0].issuer == "http://127.0.0.1:9000"


@pytest.mark.parametrize("algorithm", ["HS256", "HS512", "none"], ids=["HS256", "HS512", "none"])
def test_symmetric_or_none_algorithm_rejected(algorithm: str) -> None:
    data = config_with(providers=[provider(id_token_algorithms=["RS256", algorithm])])

    problems = problems_of(data)

    assert len(problems) == 1
    assert f'"{algorithm}" is not allowed' in problems[0]


@pytest.mark.parametrize(
    "provider_id",
    ["Upper", "-leading", "has space", "x" * 41, ""],
    ids=["upper-case", "leading-dash", "space", "too-long", "empty"],
)
def test_invalid_provider_id_rejected(provider_id: str) -> None:
    problems = problems_of(config_with(providers=[provider(id=provider_id)]))

    assert any(p.startswith('"providers[0].id" must be 1 to 40') for p in problems), problems


# --- access -------------------------------------------------------------------


def test_auto_provision_needs_domains() -> None:
    problems = problems_of(config_with(access={"auto_provision": True}))

    assert len(problems) == 1
    assert "access.provision_email_domains is empty" in problems[0]


def test_email_domains_lower_cased() -> None:
    access = {"auto_provision": True, "provision_email_domains": [" Example.COM "],
              "allowed_email_domains": ["EXAMPLE.com"]}

    settings = settings_from_mapping(config_with(access=access), environ={})

    assert settings.access.provision_email_domains == ["example.com"]
    assert settings.access.allowed_email_domains == ["example.com"]


@pytest.mark.parametrize(
    "domain",
    ["@example.com", "*.example.com", "example.com/", "exa mple.com", ""],
    ids=["at-sign", "wildcard", "slash", "space", "empty"],
)
def test_invalid_email_domain_rejected(domain: str) -> None:
    problems = problems_of(config_with(access={"allowed_email_domains": [domain]}))

    assert len(problems) == 1
    assert problems[0].startswith('"access.allowed_email_domains"')


# --- property: arbitrary input ------------------------------------------------------

_SECTION_MODELS: dict[str, type[BaseModel]] = {
    name: field.annotation
    for name, field in Settings.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


def _field_names(model: type[BaseModel]) -> list[str]:
    names = set(model.model_fields)
    names.update(f.alias for f in model.model_fields.values() if f.alias)
    return sorted(names)


_KNOWN_KEYS = sorted(
    {"providers", "rules", *_SECTION_MODELS}
    | {name for model in _SECTION_MODELS.values() for name in _field_names(model)}
    | set(_field_names(ProviderSettings))
)
# "file:" references are left out so the tests never read files of this machine.
_SAFE_TEXT = st.text(max_size=30).filter(lambda text: not text.startswith("file:"))
_SCALARS = st.one_of(
    _SAFE_TEXT,
    st.sampled_from(["8h", "0", "-1m", "500ms", "1" + "0" * 400 + "ms", "9" * 30 + "d", "oidc",
                     "https://idp.example.com", "http://127.0.0.1", "env:UNSET", "127.0.0.1/32",
                     "::1/128", "s" * 40, "example.com", ".example.com", "/oauth2", "HS256"]),
    st.integers(),
    st.integers(min_value=2**63),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=10)),
                        children, max_size=6),
    ),
    max_leaves=12,
)
_CONFIGS = st.dictionaries(
    st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=10)), _VALUES, max_size=7
)


def _section(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(_field_names(model)), _VALUES, max_size=6)


# Configs shaped like the real file, so that values reach every field validator.
_SHAPED_CONFIGS = st.fixed_dictionaries(
    {},
    optional={
        **{name: _section(model) for name, model in _SECTION_MODELS.items()},
        "providers": st.lists(_section(ProviderSettings), max_size=3),
    },
)


def assert_only_config_error(data: dict[str, Any]) -> None:
    try:
        result = settings_from_mapping(data, environ={})
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(problem, str) and problem for problem in exc.problems)
    else:
        assert isinstance(result, Settings)


@hypothesis_settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
@given(data=_CONFIGS)
def test_arbitrary_mapping_raises_only_config_error(data: dict[str, Any]) -> None:
    assert_only_config_error(data)


@hypothesis_settings(max_examples=200, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
@given(data=_SHAPED_CONFIGS)
def test_arbitrary_field_values_raise_only_config_error(data: dict[str, Any]) -> None:
    assert_only_config_error(data)
