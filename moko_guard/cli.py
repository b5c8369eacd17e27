"""The ``moko-guard`` command.

Exit codes: 0 success, 1 a failed operation (including an invalid config),
2 bad usage (argparse's own code).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG_PATH, ENV_PREFIX, Settings, load_settings
from .errors import ConfigError, GuardError
from .logs import configure_logging
from .audit import AuditEvent, Auditor
from .store import AuditFilter, AuditRecord, IdentityTaken, Store, UserRecord

logger = logging.getLogger(__name__)


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", default=None,
        help=f"TOML config file (default: ${ENV_PREFIX}CONFIG or {DEFAULT_CONFIG_PATH})",
    )


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"\"{value}\" is not a date or time like 2026-12-01 or 2026-12-01T08:00"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moko-guard", description="Single sign-on guard for a CRM.")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the forward-auth server or reverse proxy")
    _config_option(serve)
    serve.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="listen port (default 4180)")
    serve.add_argument("--workers", type=int, default=1, help="number of worker processes")
    serve.add_argument("--upstream", default=None, metavar="URL",
                       help="proxy allowed requests to this URL (reverse-proxy mode)")

    demo = commands.add_parser("demo", help="run a demo: sample CRM, demo provider and guard")
    demo.add_argument("--port", type=int, default=4180, help="port of the guarded CRM")
    demo.add_argument("--provider-port", type=int, default=4190, help="port of the demo provider")

    check = commands.add_parser("check-config", help="validate the config and print every problem")
    _config_option(check)

    keys = commands.add_parser("keys", help="key tools")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_commands.add_parser("generate", help="print a new random session secret")

    db = commands.add_parser("db", help="database tools")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser("upgrade", help="apply pending schema migrations")
    _config_option(upgrade)

    users = commands.add_parser("users", help="user administration")
    user_commands = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    users_list = user_commands.add_parser("list", help="list users")
    _config_option(users_list)
    users_list.add_argument("--json", action="store_true", help="print JSON")
    for action in ("disable", "enable"):
        summary = ("disable a user and end its sessions" if action == "disable"
                   else "enable a disabled user")
        sub = user_commands.add_parser(action, help=summary)
        _config_option(sub)
        sub.add_argument("user", help="user id or username")
    show = user_commands.add_parser("show", help="show a user with its linked identities")
    _config_option(show)
    show.add_argument("user", help="user id or username")
    show.add_argument("--json", action="store_true", help="print JSON")
    link = user_commands.add_parser("link", help="link a provider identity to a user")
    _config_option(link)
    link.add_argument("user", help="user id or username")
    link.add_argument("--provider", required=True, help="provider id")
    link.add_argument("--subject", required=True, help="the provider's subject (sub) for the person")
    unlink = user_commands.add_parser("unlink", help="unlink identities (ends the user's sessions)")
    _config_option(unlink)
    unlink.add_argument("user", help="user id or username")
    unlink.add_argument("--provider", required=True, help="provider id")
    unlink.add_argument("--subject", help="only this subject (default: every one at the provider)")
    roles = user_commands.add_parser("roles", help="show or change a user's roles")
    _config_option(roles)
    roles.add_argument("user", help="user id or username")
    change = roles.add_mutually_exclusive_group()
    change.add_argument("--set", metavar="ROLES", help="replace the roles (comma-separated)")
    change.add_argument("--add", metavar="ROLE", help="add one role")
    change.add_argument("--remove", metavar="ROLE", help="remove one role")

    sessions = commands.add_parser("sessions", help="session administration")
    session_commands = sessions.add_subparsers(dest="sessions_command", required=True,
                                               metavar="ACTION")
    revoke = session_commands.add_parser("revoke", help="end every live session of a user")
    _config_option(revoke)
    revoke.add_argument("--user", required=True, help="user id or username")

    audit = commands.add_parser("audit", help="audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    for action in ("list", "export"):
        sub = audit_commands.add_parser(action, help=f"{action} audit events, newest first")
        _config_option(sub)
        sub.add_argument("--since", type=_parse_time, help="from this UTC time (ISO 8601)")
        sub.add_argument("--until", type=_parse_time, help="before this UTC time (ISO 8601)")
        sub.add_argument("--user", help="user id or username")
        sub.add_argument("--provider", help="provider id")
        sub.add_argument("--outcome", choices=["success", "failure", "info"])
        sub.add_argument("--limit", type=int, default=100 if action == "list" else 1_000_000,
                         help="maximum number of events")
        if action == "list":
            sub.add_argument("--json", action="store_true", help="print JSON")
        else:
            sub.add_argument("--format", choices=["csv", "json"], default="csv")
    prune = audit_commands.add_parser("prune", help="delete audit events older than a date")
    _config_option(prune)
    prune.add_argument("--before", type=_parse_time, required=True,
                       help="delete events before this UTC time (ISO 8601)")
    return parser


# --- commands ----------------------------------------------------------------


def _load(path: str | None) -> Settings:
    return load_settings(path)


def _check_providers(settings: Settings) -> None:
    """Build every provider, so type-specific settings are checked too; no request is sent."""
    import httpx

    from .providers import build_provider

    problems: list[str] = []
    client = httpx.AsyncClient()
    for provider in settings.providers:
        try:
            build_provider(provider, client)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)


def _sqlite_file(url: str) -> Path | None:
    """Return the absolute path of a SQLite store's file, or None for another store."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    database = parsed.database
    if not parsed.drivername.startswith("sqlite") or not database or database == ":memory:":
        return None
    if database.startswith("file:") or "mode=memory" in database:
        return None
    return Path(database).expanduser().absolute()


def _check_store_location(settings: Settings) -> None:
    """Raise ConfigError when a SQLite store's folder is missing or not writable."""
    path = _sqlite_file(settings.store.url)
    if path is None:
        return
    folder = path.parent
    hint = ("; an absolute path needs four slashes, as in sqlite:////var/lib/moko-guard/guard.db"
            if not settings.store.url.lower().split("://", 1)[-1].startswith("//") else "")
    if not folder.is_dir():
        raise ConfigError([f"store.url: the folder {folder} of the SQLite file does not exist; "
                           f"create it or correct the path{hint}"])
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError([f"store.url: the folder {folder} of the SQLite file is not writable "
                           "by this user; the store needs to create its file and journal there"])


def cmd_check_config(args: argparse.Namespace) -> int:
    problems: list[str] = []
    try:
        settings = _load(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    for check in (_check_providers, _check_store_location):
        try:
            check(settings)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        print(ConfigError(problems), file=sys.stderr)
        return 1
    providers = ", ".join(f"{p.id} ({p.type})" for p in settings.providers)
    sqlite_file = _sqlite_file(settings.store.url)
    store = f"sqlite file {sqlite_file}" if sqlite_file else settings.store.url.split(":", 1)[0]
    print(f"config is valid: mode {settings.server.mode}, providers {providers}, store {store}")
    return 0


def cmd_keys_generate(_args: argparse.Namespace) -> int:
    print(secrets.token_urlsafe(48))
    return 0


async def _with_store(settings: Settings) -> Store:
    store = Store.from_settings(settings.store)
    await store.open()
    return store


async def _db_upgrade(settings: Settings) -> int:
    store = await _with_store(settings)
    try:
        version = await store.upgrade()
    finally:
        await store.close()
    print(f"schema is at version {version}")
    return 0


async def _find_user_id(store: Store, value: str) -> int | None:
    if value.isdigit():
        user = await store.user_by_id(int(value))
    else:
        user = await store.user_by_username(value)
    return user.id if user else None


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    widths = {c: max([len(c), *(len(str(r.get(c, "") or "")) for r in rows)]) for c in columns}
    print("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "") or "").ljust(widths[c]) for c in columns))


async def _users_list(settings: Settings, as_json: bool) -> int:
    store = await _with_store(settings)
    try:
        users = await store.list_users()
    finally:
        await store.close()
    rows = [_user_row(u) for u in users]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["id", "username", "email", "roles", "disabled", "last_login"])
    return 0


async def _users_set_disabled(settings: Settings, value: str, disabled: bool) -> int:
    store = await _with_store(settings)
    try:
        user_id = await _find_user_id(store, value)
        if user_id is None:
            print(f"user \"{value}\" not found", file=sys.stderr)
            return 1
        await store.set_disabled(user_id, disabled)
        state = "disabled" if disabled else "enabled"
        await Auditor(store).record(AuditEvent(
            "user.disabled" if disabled else "user.enabled", "info", reason=f"user_{state}",
            user_id=user_id, detail="cli"))
        user = await store.user_by_id(user_id)
        ended = await _end_sessions(store, user, "user_disabled") if disabled and user else 0
    finally:
        await store.close()
    print(f"user {user_id} {state}" + (f", sessions ended: {ended}" if disabled else ""))
    return 0


def _user_row(user: UserRecord) -> dict[str, Any]:
    return {"id": user.id, "username": user.username, "email": user.email,
            "roles": ",".join(user.roles), "disabled": "yes" if user.disabled else "no",
            "last_login": user.last_login_at.isoformat(timespec="seconds")
            if user.last_login_at else ""}


async def _user_admin(settings: Settings, args: argparse.Namespace) -> int:
    """users show | link | unlink | roles, and sessions revoke."""
    store = await _with_store(settings)
    try:
        value = args.user
        user_id = await _find_user_id(store, value)
        user = await store.user_by_id(user_id) if user_id is not None else None
        if user is None:
            print(f"user \"{value}\" not found", file=sys.stderr)
            return 1
        return await _user_action(store, user, args)
    finally:
        await store.close()


async def _end_sessions(store: Store, user: UserRecord, reason: str) -> int:
    ended = await store.revoke_user_sessions(user.id)
    if ended:
        await Auditor(store).record(AuditEvent("session.revoked", "info", reason=reason,
                                               user_id=user.id, detail=f"{len(ended)} sessions"))
    return len(ended)


async def _user_action(store: Store, user: UserRecord, args: argparse.Namespace) -> int:
    command = args.command if args.command == "sessions" else args.users_command
    auditor = Auditor(store)
    if command == "show":
        identities = await store.identities_of(user.id)
        row = _user_row(user)
        row["identities"] = [{"provider": i.provider, "subject": i.subject, "email": i.email}
                             for i in identities]
        if args.json:
            print(json.dumps(row, indent=2))
        else:
            for key in ("id", "username", "email", "roles", "disabled", "last_login"):
                print(f"{key}: {row[key]}")
            for identity in row["identities"]:
                print(f"identity: {identity['provider']} {identity['subject']}")
        return 0
    if command == "link":
        try:
            await store.link_identity(user.id, args.provider, args.subject, None)
        except IdentityTaken as exc:
            print(f"identity {args.provider}/{args.subject} is already linked to user "
                  f"{exc.user_id}: unlink it there first", file=sys.stderr)
            return 1
        await auditor.record(AuditEvent("identity.linked", "info", provider=args.provider,
                                        subject=args.subject, user_id=user.id, detail="cli"))
        print(f"linked {args.provider}/{args.subject} to user {user.id}")
        return 0
    if command == "unlink":
        count = await store.unlink_identity(user.id, args.provider, args.subject)
        if count == 0:
            print(f"user {user.id} has no identity at provider \"{args.provider}\""
                  + (f" with subject \"{args.subject}\"" if args.subject else ""), file=sys.stderr)
            return 1
        await auditor.record(AuditEvent("identity.unlinked", "info", provider=args.provider,
                                        subject=args.subject, user_id=user.id, detail="cli"))
        ended = await _end_sessions(store, user, "identity_unlinked")
        print(f"unlinked {count} identities from user {user.id}, sessions ended: {ended}")
        return 0
    if command == "roles":
        roles = set(user.roles)
        if args.set is not None:
            roles = {r.strip() for r in args.set.split(",") if r.strip()}
        elif args.add:
            roles.add(args.add.strip())
        elif args.remove:
            roles.discard(args.remove.strip())
        if roles != set(user.roles):
            await store.set_roles(user.id, sorted(roles))
            await _end_sessions(store, user, "roles_changed")
        print(f"user {user.id} roles: {','.join(sorted(roles))}")
        return 0
    ended = await _end_sessions(store, user, "cli")
    print(f"sessions of user {user.id} ended: {ended}")
    return 0


async def _audit_prune(settings: Settings, before: datetime) -> int:
    store = await _with_store(settings)
    try:
        count = await store.prune_audit(before)
    finally:
        await store.close()
    print(f"deleted {count} audit events before {before.isoformat()}")
    return 0


async def _audit(settings: Settings, args: argparse.Namespace) -> int:
    store = await _with_store(settings)
    try:
        user_id = None
        if args.user:
            user_id = await _find_user_id(store, args.user)
            if user_id is None:
                print(f"user \"{args.user}\" not found", file=sys.stderr)
                return 1
        records = await store.list_audit(AuditFilter(
            since=args.since, until=args.until, user_id=user_id, provider=args.provider,
            outcome=args.outcome, limit=args.limit,
        ))
    finally:
        await store.close()
    rows = [r.to_json() for r in records]
    if args.audit_command == "export" and args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(AuditRecord.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(rows)
    elif getattr(args, "json", False) or args.audit_command == "export":
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["at", "event", "outcome", "reason", "provider", "user_id", "email",
                            "client_ip"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    settings = _load(args.config)
    configure_logging(settings.logging.level, settings.logging.format)
    if args.upstream:
        server = settings.server.model_copy(update={"upstream": args.upstream})
        settings = settings.model_copy(update={"server": server})
    from .server import create_app

    host = args.host or settings.server.host
    port = args.port or settings.server.port
    logger.info("serving on http://%s:%d", host, port)
    config_path = args.config or os.environ.get(ENV_PREFIX + "CONFIG") or DEFAULT_CONFIG_PATH
    options = dict(host=host, port=port, proxy_headers=False, server_header=False,
                   access_log=False, log_config=None, lifespan="on")
    if args.workers < 1:
        print(f"--workers must be 1 or more, found {args.workers}", file=sys.stderr)
        return 2
    if args.workers == 1:
        uvicorn.run(create_app(settings, config_path=config_path), **options)  # type: ignore[arg-type]
        return 0
    # Several worker processes each build their app from the same config and environment.
    os.environ[ENV_PREFIX + "CONFIG"] = str(config_path)
    if args.upstream:
        os.environ[ENV_PREFIX + "SERVER_UPSTREAM"] = args.upstream
    uvicorn.run("moko_guard.server:app_from_environment", factory=True, workers=args.workers,
                **options)  # type: ignore[arg-type]
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.port, args.provider_port)


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "keys":
        return cmd_keys_generate(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "serve":
        return cmd_serve(args)
    settings = _load(args.config)
    if args.command == "db":
        return asyncio.run(_db_upgrade(settings))
    if args.command == "sessions":
        return asyncio.run(_user_admin(settings, args))
    if args.command == "users":
        if args.users_command in ("show", "link", "unlink", "roles"):
            return asyncio.run(_user_admin(settings, args))
        if args.users_command == "list":
            return asyncio.run(_users_list(settings, args.json))
        return asyncio.run(_users_set_disabled(settings, args.user,
                                               args.users_command == "disable"))
    if args.command == "audit":
        if args.audit_command == "prune":
            return asyncio.run(_audit_prune(settings, args.before))
        return asyncio.run(_audit(settings, args))
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "text")
    try:
        return dispatch(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except GuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
