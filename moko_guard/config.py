"""Settings: a TOML file, then ``MOKO_GUARD_*`` environment variables on top.

Secret values (client secrets, session secrets) may be given inline or as a
reference: ``env:NAME`` reads an environment variable and ``file:PATH`` reads a
file (a trailing newline is dropped). Validation collects every problem and
raises one :class:`ConfigError`, so an operator fixes the file in one pass.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

ENV_PREFIX = "MOKO_GUARD_"
DEFAULT_CONFIG_PATH = "moko-guard.toml"
MIN_SESSION_SECRET_LENGTH = 32
# Ten years: longer durations would overflow expiry timestamps.
MAX_DURATION = 3650 * 86400.0
PROVIDER_TYPES = ("oidc", "google", "microsoft", "facebook", "github", "oauth2")

_DURATION_RE = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_PROVIDER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class Secret:
    """A secret string that never shows its value in ``repr`` or ``str``."""

    __slots__ = ("_value", "reference")

    def __init__(self, value: str, reference: str | None = None) -> None:
        self._value = value
        self.reference = reference

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        source = f" from {self.reference}" if self.reference else ""
        return f"Secret('**********'{source})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(value: object) -> float:
    """Parse ``"8h"``, ``"30m"``, ``"90s"``, ``"500ms"``, ``"7d"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like \"8h\" or \"30m\"")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
            seconds = float(int(match.group(1)) * _DURATION_UNITS[match.group(2)])
        else:
            raise ValueError("must be a duration like \"8h\" or \"30m\"")
    except OverflowError:
        seconds = math.inf
    # inf and nan would fail later, when a cookie max-age or an expiry time is computed.
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration like \"8h\" or \"30m\"")
    if seconds <= 0:
        raise ValueError("must be a duration greater than zero")
    if seconds > MAX_DURATION:
        raise ValueError("must be a duration of at most 3650 days")
    return seconds


def resolve_secret(value: object, environ: Mapping[str, str]) -> Secret:
    """Turn an inline value or an ``env:``/``file:`` reference into a :class:`Secret`."""
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string, an \"env:NAME\" or a \"file:PATH\" reference")
    if value.startswith("env:"):
        name = value[4:]
        if name not in environ:
            raise ValueError(f"refers to environment variable \"{name}\", which is not set: set it")
        resolved = environ[name]
    elif value.startswith("file:"):
        path = Path(value[5:])
        try:
            resolved = path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(
                f"refers to file \"{path}\", which cannot be read ({exc.strerror}): "
                "check the path and its permissions"
            ) from None
    else:
        return Secret(value)
    if not resolved:
        raise ValueError(f"reference \"{value}\" resolves to an empty value: put the secret there")
    return Secret(resolved, reference=value)


def _environ(info: ValidationInfo) -> Mapping[str, str]:
    context = info.context if isinstance(info.context, dict) else {}
    environ = context.get("environ")
    return environ if isinstance(environ, Mapping) else os.environ


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, populate_by_name=True
    )


class ServerSettings(_Section):
    public_url: str = "http://127.0.0.1:4180"
    mode: Literal["sso_only", "optional"] = "sso_only"
    enforce_https: bool = True
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = Field(default_factory=list)
    upstream: str | None = None
    prefix: str = "/oauth2"
    callback_path: str = ""
    insecure_allow_http: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=4180, ge=1, le=65535)
    hsts_max_age: int = Field(default=31536000, ge=0)
    # Reverse-proxy mode: send the client's Host to the upstream (false: the upstream's own host).
    preserve_host: bool = True
    upstream_timeout: float = 60.0
    upstream_connect_timeout: float = 5.0

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL like \"https://crm.example.com\"")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("must not carry a query, fragment or user name")
        return value.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError("must be a path like \"/oauth2\" (leading slash, no trailing slash)")
        return value

    @field_validator("callback_path")
    @classmethod
    def _check_callback_path(cls, value: str) -> str:
        if value and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError("must be a path like \"/oauth2/callback\"")
        return value

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL like \"http://127.0.0.1:8080\"")
        return value.rstrip("/")

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _check_proxy_entries(cls, value: object) -> object:
        # Parsed here so an error names the entry once. Only strings are accepted, because
        # ipaddress would read true as the network 0.0.0.1/32 and an integer as an address.
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:
                if not isinstance(item, str):
                    raise ValueError
                networks.append(ipaddress.ip_network(item.strip()))
            except ValueError:
                raise ValueError(
                    f"entry {item!r:.60} is not a network: write an address or network in "
                    "quotes, with the host bits zero, like \"127.0.0.1/32\" or \"10.0.0.0/8\""
                ) from None
        return networks

    @field_validator("upstream_timeout", "upstream_connect_timeout", mode="before")
    @classmethod
    def _check_duration(cls, value: object) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _check_https(self) -> ServerSettings:
        if self.enforce_https and urlsplit(self.public_url).scheme != "https":
            raise ValueError(
                f"server.public_url is \"{self.public_url}\" but server.enforce_https is on: "
                "use an https URL, or set enforce_https = false with insecure_allow_http = true "
                "for loopback testing"
            )
        if not self.enforce_https and not self.insecure_allow_http:
            raise ValueError(
                "server.enforce_https is off: set insecure_allow_http = true to confirm "
                "that plain http is wanted (loopback testing only)"
            )
        return self

    @property
    def effective_callback_path(self) -> str:
        return self.callback_path or f"{self.prefix}/callback"

    @property
    def redirect_uri(self) -> str:
        return self.public_url + self.effective_callback_path

    @property
    def public_scheme(self) -> str:
        return urlsplit(self.public_url).scheme

    @property
    def public_host(self) -> str:
        return (urlsplit(self.public_url).hostname or "").lower()


class SessionSettings(_Section):
    secrets: list[Secret] = Field(default_factory=list)
    lifetime: float = 8 * 3600
    cookie_name: str = "moko_session"
    cookie_domain: str | None = None
    revocation_poll_interval: float = 5.0

    @field_validator("secrets", mode="before")
    @classmethod
    def _check_secrets(cls, value: object, info: ValidationInfo) -> list[Secret]:
        if not isinstance(value, list) or not value:
            raise ValueError(
                "must list at least one secret: generate one with \"moko-guard keys generate\""
            )
        secrets = [resolve_secret(item, _environ(info)) for item in value]
        for index, secret in enumerate(secrets):
            if len(secret.get()) < MIN_SESSION_SECRET_LENGTH:
                raise ValueError(
                    f"entry {index} is shorter than {MIN_SESSION_SECRET_LENGTH} characters: "
                    "generate one with \"moko-guard keys generate\""
                )
        return secrets

    @field_validator("lifetime", "revocation_poll_interval", mode="before")
    @classmethod
    def _check_duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("cookie_name")
    @classmethod
    def _check_cookie_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise ValueError("must be 1 to 64 letters, digits, \"_\" or \"-\"")
        return value

    @field_validator("cookie_domain")
    @classmethod
    def _check_cookie_domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"\.?([a-z0-9-]+\.)+[a-z0-9-]+", value.lower()):
            raise ValueError("must be a domain like \".example.com\"")
        return value.lower()


class StoreSettings(_Section):
    url: str = "sqlite:///moko-guard.db"
    busy_timeout: float = 5.0
    # PostgreSQL only: the schema holding moko_guard's tables (default: the search path).
    schema_name: str | None = Field(default=None, alias="schema")

    @field_validator("schema_name")
    @classmethod
    def _check_schema(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
            raise ValueError("must be a lower-case SQL identifier like \"moko_guard\"")
        return value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        scheme = value.split(":", 1)[0].lower()
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(
                "must start with \"sqlite:///\" (a file) or \"postgresql://\" (a server)"
            )
        return value

    @field_validator("busy_timeout", mode="before")
    @classmethod
    def _check_duration(cls, value: object) -> float:
        return parse_duration(value)


class AccessRule(_Section):
    path: str
    roles: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be a path prefix starting with \"/\"")
        return value


def _normalise_domain(value: str) -> str:
    domain = value.strip().lower()
    if not re.fullmatch(r"([a-z0-9-]+\.)*[a-z0-9-]+", domain):
        raise ValueError(f"\"{value}\" is not a domain like \"example.com\"")
    return domain


class AccessSettings(_Section):
    allowed_email_domains: list[str] = Field(default_factory=list)
    allowed_roles: list[str] = Field(default_factory=list)
    auto_provision: bool = False
    provision_email_domains: list[str] = Field(default_factory=list)
    link_by_verified_email: bool = True
    # Admit people whose provider shares no email (Facebook users who decline the
    # permission). Such a user is created with the username "<provider>:<subject>".
    allow_missing_email: bool = False
    default_roles: list[str] = Field(default_factory=lambda: ["user"])
    allowed_redirect_hosts: list[str] = Field(default_factory=list)
    public_paths: list[str] = Field(default_factory=list)
    native_login_paths: list[str] = Field(default_factory=list)
    rules: list[AccessRule] = Field(default_factory=list)
    # The CRM's own login page, where the guard adds one sign-in link per provider (off when unset).
    login_page_path: str | None = None
    login_page_marker: str = "</form>"

    @field_validator("allowed_email_domains", "provision_email_domains")
    @classmethod
    def _check_domains(cls, value: list[str]) -> list[str]:
        return [_normalise_domain(item) for item in value]

    @field_validator("allowed_redirect_hosts")
    @classmethod
    def _check_redirect_hosts(cls, value: list[str]) -> list[str]:
        hosts = []
        for item in value:
            host = item.strip().lower()
            if not re.fullmatch(r"\.?([a-z0-9-]+\.)*[a-z0-9-]+(:\d{1,5})?", host):
                raise ValueError(
                    f"\"{item}\" is not a host like \"crm.example.com\" or \".example.com\""
                )
            hosts.append(host)
        return hosts

    @field_validator("public_paths")
    @classmethod
    def _check_paths(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.startswith("/"):
                raise ValueError(f"\"{item}\" must start with \"/\"")
        return value

    @field_validator("login_page_path")
    @classmethod
    def _check_login_page_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be a path starting with \"/\", like \"/login\"")
        return value

    @field_validator("login_page_marker")
    @classmethod
    def _check_login_page_marker(cls, value: str) -> str:
        if not value or len(value) > 200:
            raise ValueError("must be 1 to 200 characters of the page's HTML, like \"</form>\"")
        return value

    @model_validator(mode="after")
    def _check_provisioning(self) -> AccessSettings:
        if self.auto_provision and not self.provision_email_domains:
            raise ValueError(
                "access.auto_provision is on but access.provision_email_domains is empty: "
                "list the email domains whose users may be created"
            )
        return self


class RateLimitSettings(_Section):
    # Sign-in starts and callbacks per client IP; 0 turns the limit off.
    sign_in_per_minute: int = Field(default=30, ge=0)
    burst: int = Field(default=20, ge=1)


class UiSettings(_Section):
    # A folder of extra or overriding message catalogues named <language>.json.
    locales_dir: str | None = None


class LoggingSettings(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class HeaderSettings(_Section):
    user: str = "X-Auth-Request-User"
    email: str = "X-Auth-Request-Email"
    roles: str = "X-Auth-Request-Roles"
    provider: str = "X-Auth-Request-Provider"
    preferred_username: str = "X-Auth-Request-Preferred-Username"

    @field_validator("*")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _HEADER_NAME_RE.fullmatch(value):
            raise ValueError("must be a header name of letters, digits and \"-\"")
        return value

    def names(self) -> list[str]:
        return [self.user, self.email, self.roles, self.provider, self.preferred_username]


class ProviderSettings(_Section):
    id: str
    type: Literal["oidc", "google", "microsoft", "facebook", "github", "oauth2"]
    client_id: str = Field(min_length=1)
    client_secret: Secret | None = None
    name: str = ""
    issuer: str | None = None
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post"] = (
        "client_secret_basic"
    )
    id_token_algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                 "ES256", "ES384", "ES512", "EdDSA"]
    )
    connect_timeout: float = 5.0
    timeout: float = 10.0
    insecure_allow_http_issuer: bool = False
    # Sign-out also ends the session at the provider (OpenID Connect RP-Initiated Logout),
    # when its metadata has an end_session_endpoint. Register <public_url>/oauth2/sign_in
    # (or the rd targets used) as a post-logout redirect URI there.
    sign_out_at_provider: bool = False
    # Endpoint overrides (sovereign clouds, GitHub Enterprise Server, plain OAuth 2.0).
    authorize_url: str | None = None
    token_url: str | None = None
    userinfo_url: str | None = None
    api_base_url: str | None = None
    # google: the Workspace domain the ID token's "hd" claim must equal.
    hosted_domain: str | None = None
    # microsoft: "common", "organizations", "consumers" or a tenant id.
    tenant: str = "common"
    allowed_tenants: list[str] = Field(default_factory=list)
    insecure_email_from_username: bool = False
    # microsoft: group ids or app roles from the token mapped to moko_guard roles.
    role_mapping: dict[str, list[str]] = Field(default_factory=dict)
    # facebook: Graph API version used in every endpoint.
    graph_version: str = "v21.0"
    # github: membership checks through the API (need the read:org scope).
    allowed_organizations: list[str] = Field(default_factory=list)
    allowed_teams: list[str] = Field(default_factory=list)
    # oauth2: dotted paths into the userinfo JSON for each identity field.
    claims: dict[str, str] = Field(default_factory=dict)
    # Bearer tokens for API clients: accepted "aud" values besides client_id.
    api_audiences: list[str] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _PROVIDER_ID_RE.fullmatch(value):
            raise ValueError("must be 1 to 40 lower-case letters, digits, \"_\" or \"-\"")
        return value

    @field_validator("client_secret", mode="before")
    @classmethod
    def _resolve_secret(cls, value: object, info: ValidationInfo) -> Secret | None:
        if value is None:
            return None
        return resolve_secret(value, _environ(info))

    @field_validator("connect_timeout", "timeout", mode="before")
    @classmethod
    def _check_duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("id_token_algorithms")
    @classmethod
    def _check_algorithms(cls, value: list[str]) -> list[str]:
        allowed = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                   "ES256", "ES384", "ES512", "EdDSA"}
        for alg in value:
            if alg not in allowed:
                raise ValueError(
                    f"\"{alg}\" is not allowed: only asymmetric algorithms "
                    f"({', '.join(sorted(allowed))}) are accepted"
                )
        return value

    @field_validator("authorize_url", "token_url", "userinfo_url", "api_base_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("must be an absolute https URL")
        return value

    @model_validator(mode="after")
    def _check_type_settings(self) -> ProviderSettings:
        if self.type == "oidc":
            if not self.issuer:
                raise ValueError(
                    f"providers \"{self.id}\": type \"oidc\" needs issuer, "
                    "the URL whose /.well-known/openid-configuration describes the provider"
                )
            parts = urlsplit(self.issuer)
            secure = parts.scheme == "https" or (
                parts.scheme == "http" and self.insecure_allow_http_issuer
            )
            if not secure or not parts.hostname:
                raise ValueError(
                    f"providers \"{self.id}\": issuer \"{self.issuer}\" must be an https URL "
                    "(http only with insecure_allow_http_issuer = true, for loopback testing)"
                )
        if self.client_secret is None:
            raise ValueError(
                f"providers \"{self.id}\": client_secret is missing: "
                "add it, for example client_secret = \"env:MY_CLIENT_SECRET\""
            )
        return self

    @property
    def display_name(self) -> str:
        return self.name or self.id.replace("-", " ").replace("_", " ").title()


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    session: SessionSettings
    store: StoreSettings = Field(default_factory=StoreSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    headers: HeaderSettings = Field(default_factory=HeaderSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    providers: list[ProviderSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_providers(self) -> Settings:
        if not self.providers:
            raise ValueError("no [[providers]] configured: add at least one provider")
        seen: set[str] = set()
        for provider in self.providers:
            if provider.id in seen:
                raise ValueError(f"providers: id \"{provider.id}\" is used twice: make ids unique")
            seen.add(provider.id)
        return self

    def provider(self, provider_id: str) -> ProviderSettings | None:
        for provider in self.providers:
            if provider.id == provider_id:
                return provider
        return None


# --- loading ---------------------------------------------------------------

_SECTIONS = ("server", "session", "store", "access", "headers", "rate_limit", "logging", "ui")
_LIST_KEYS = {
    "trusted_proxies", "secrets", "allowed_email_domains", "allowed_roles",
    "provision_email_domains", "default_roles", "allowed_redirect_hosts", "public_paths",
    "native_login_paths", "scopes", "id_token_algorithms", "api_audiences",
    "allowed_organizations", "allowed_teams", "allowed_tenants",
}
_SECRET_KEYS = {"secrets", "client_secret"}


def _env_value(key: str, raw: str) -> object:
    if key in _LIST_KEYS:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _apply_provider_variable(providers: list[Any], name: str, raw: str) -> None:
    """Set ``<key>`` on the provider whose id is the longest prefix of ``name`` (``<id>_<key>``).

    The longest id wins, so ``..._PROVIDER_CORP_EU_CLIENT_SECRET`` sets provider
    "corp-eu" and not an unknown key "eu_client_secret" on provider "corp".
    """
    target: dict[str, Any] | None = None
    target_prefix = ""
    for provider in providers:
        if not isinstance(provider, dict):
            continue
        prefix = str(provider.get("id", "")).lower().replace("-", "_") + "_"
        if name.startswith(prefix) and len(prefix) > len(target_prefix):
            target, target_prefix = provider, prefix
    if target is not None:
        key = name[len(target_prefix):]
        target[key] = _env_value(key, raw)


def apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``MOKO_GUARD_<SECTION>_<KEY>`` and ``MOKO_GUARD_PROVIDER_<ID>_<KEY>`` values."""
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    # Entries that are not tables stay in place, so validation still reports them.
    raw_providers = merged.get("providers")
    providers = (
        [dict(p) if isinstance(p, dict) else p for p in raw_providers]
        if isinstance(raw_providers, list) else []
    )
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest.startswith("provider_"):
            _apply_provider_variable(providers, rest[len("provider_"):], raw)
            continue
        for section in _SECTIONS:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                merged.setdefault(section, {})[key] = _env_value(key, raw)
                break
    if providers:
        merged["providers"] = providers
    return merged


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        else:
            text += f".{item}" if text else str(item)
    return text or "(top level)"


def _describe_value(loc: tuple[int | str, ...], value: object) -> str:
    if any(str(item) in _SECRET_KEYS for item in loc):
        return "(value hidden)"
    text = repr(value) if not isinstance(value, str) else f"\"{value}\""
    return text if len(text) <= 80 else text[:77] + "..."


def format_problems(error: ValidationError) -> list[str]:
    """Turn pydantic's errors into one plain line each: key, value found, fix."""
    problems: list[str] = []
    for item in error.errors(include_url=False):
        loc = tuple(part for part in item["loc"] if not str(part).startswith("function-"))
        key = _location(loc)
        message = str(item["msg"]).removeprefix("Value error, ")
        kind = item["type"]
        if kind == "missing":
            problems.append(f"\"{key}\" is missing: add it")
        elif kind == "extra_forbidden":
            problems.append(f"\"{key}\" is not a known setting: remove it or check its spelling")
        elif loc == () or kind == "value_error" and not loc:
            problems.append(message)
        elif kind == "value_error" and message.startswith(("server.", "access.", "providers", "no [[")):
            problems.append(message)
        else:
            found = _describe_value(loc, item.get("input"))
            problems.append(f"\"{key}\" {message}, found {found}")
    return problems


def settings_from_mapping(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Validate a mapping shaped like the TOML file and return :class:`Settings`."""
    context = {"environ": os.environ if environ is None else environ}
    try:
        return Settings.model_validate(dict(data), context=context)
    except ValidationError as exc:
        raise ConfigError(format_problems(exc)) from None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read the TOML file at ``path`` (or ``MOKO_GUARD_CONFIG``) and the environment."""
    env = os.environ if environ is None else environ
    config_path = Path(path or env.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        with config_path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            [f"config file \"{config_path}\" not found: pass --config FILE or set MOKO_GUARD_CONFIG"]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file \"{config_path}\" is not valid TOML: {exc}"]) from None
    except OSError as exc:
        raise ConfigError([f"config file \"{config_path}\" cannot be read: {exc.strerror}"]) from None
    return settings_from_mapping(apply_environment(data, env), env)
