"""Tests of the ``moko-guard`` command, run in-process and once as the installed script."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from moko_guard.audit import AuditEvent, Auditor
from moko_guard.cli import main
from moko_guard.store import Store, utcnow
from moko_guard.store.schema import LATEST_VERSION

SESSION_SECRET = "cli-session-secret-0123456789abcdefghij"
CLIENT_SECRET = "cli-client-secret-never-printed-7d2e"
AUDIT_FIELDS = {"at", "event", "outcome", "reason", "provider", "subject", "user_id", "email",
                "client_ip", "user_agent"}


def config_text(
    store_path: Path, *, session_secret: str = SESSION_SECRET,
    issuer: str = "https://idp.example.com",
) -> str:
    return f"""
[server]
public_url = "https://crm.example.com"

[session]
secrets = ["{session_secret}"]

[store]
url = "sqlite:///{store_path}"

[[providers]]
id = "idp"
type = "oidc"
issuer = "{issuer}"
client_id = "crm"
client_secret = "{CLIENT_SECRET}"
"""


@dataclass(frozen=True)
class Seeded:
    """The config file, and the users and sessions that the `seeded` fixture stored."""

    config: Path
    store_url: str
    alice_id: int
    bob_id: int
    alice_sessions: tuple[str, ...]
    bob_session: str


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep MOKO_GUARD_* variables of the calling shell out of every command."""
    for name in list(os.environ):
        if name.startswith("MOKO_GUARD_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo main()'s logging setup, whose handler writes to this test's captured stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "moko-guard.toml"
    path.write_text(config_text(tmp_path / "guard.db"), encoding="utf-8")
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliResult:
    code = main(list(args))
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def usage_exit_code(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as caught:
        main(list(args))
    return int(caught.value.code or 0), capsys.readouterr().err


def at(day: int, hour: int) -> datetime:
    return datetime(2026, 1, day, hour, 0, 0)


async def seed_store(url: str) -> tuple[int, int, tuple[str, ...], str]:
    store = Store(url)
    await store.open()
    try:
        alice, _ = await store.create_user_with_identity(
            username="alice@example.com", email="alice@example.com", display_name="Alice",
            roles=["user"], provider="idp", subject="alice-sub",
            identity_email="alice@example.com",
        )
        bob, _ = await store.create_user_with_identity(
            username="bob@example.com", email="bob@example.com", display_name="Bob",
            roles=["user", "admin"], provider="github", subject="bob-sub",
            identity_email="bob@example.com",
        )
        now = utcnow()
        for session_id in ("alice-1", "alice-2", "bob-1"):
            await store.create_session(
                session_id=session_id, user_id=alice.id if session_id.startswith("a") else bob.id,
                provider="idp", created_at=now, expires_at=now + timedelta(hours=8),
                client_ip="127.0.0.1", user_agent="pytest",
            )

        auditor = Auditor(store)
        await auditor.record(AuditEvent(
            event="login.success", outcome="success", provider="idp", subject="alice-sub",
            user_id=alice.id, email="alice@example.com", client_ip="127.0.0.1",
            user_agent="Firefox/130",
        ), at=at(10, 8))
        await auditor.record(AuditEvent(
            event="login.failure", outcome="failure", reason="domain_not_allowed",
            provider="idp", subject="mallory-sub", email="mallory@evil.example",
            client_ip="127.0.0.9", user_agent="curl/8",
        ), at=at(11, 9))
        await auditor.record(AuditEvent(
            event="login.success", outcome="success", provider="github", subject="bob-sub",
            user_id=bob.id, email="bob@example.com", client_ip="127.0.0.1",
            user_agent="Chrome/128",
        ), at=at(12, 10))
        await auditor.record(AuditEvent(
            event="sign_out", outcome="info", provider="idp", subject="alice-sub",
            user_id=alice.id, email="alice@example.com", client_ip="127.0.0.1",
            user_agent="Firefox/130",
        ), at=at(13, 11))
    finally:
        await store.close()
    return alice.id, bob.id, ("alice-1", "alice-2"), "bob-1"


@pytest.fixture
def seeded(tmp_path: Path, config_path: Path) -> Seeded:
    url = f"sqlite:///{tmp_path / 'guard.db'}"
    alice_id, bob_id, alice_sessions, bob_session = asyncio.run(seed_store(url))
    return Seeded(config_path, url, alice_id, bob_id, alice_sessions, bob_session)


async def read_state(
    url: str, user_id: int, session_ids: tuple[str, ...]
) -> tuple[bool, list[bool]]:
    """Return whether the user is disabled, and whether each session is still active."""
    store = Store(url)
    await store.open()
    try:
        user = await store.user_by_id(user_id)
        assert user is not None
        active = [await store.is_session_active(session_id) for session_id in session_ids]
    finally:
        await store.close()
    return user.disabled, active


def audit_json(
    capsys: pytest.CaptureFixture[str], config: Path, *filters: str
) -> list[dict[str, object]]:
    result = run_cli(capsys, "audit", "list", "--config", str(config), "--json", *filters)
    assert result.code == 0, result.err
    rows: list[dict[str, object]] = json.loads(result.out)
    return rows


# --- check-config -----------------------------------------------------------------


def test_check_config_accepts_valid_file(
    capsys: pytest.CaptureFixture[str], config_path: Path
) -> None:
    result = run_cli(capsys, "check-config", "--config", str(config_path))

    assert result.code == 0
    summary = ("config is valid: mode sso_only, providers idp (oidc), "
               f"store sqlite file {config_path.parent / 'guard.db'}")
    assert result.out.strip() == summary
    assert CLIENT_SECRET not in result.out
    assert SESSION_SECRET not in result.out


def test_check_config_reads_path_from_environment(
    capsys: pytest.CaptureFixture[str], config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOKO_GUARD_CONFIG", str(config_path))

    result = run_cli(capsys, "check-config")

    assert result.code == 0
    assert result.out.startswith("config is valid")


def test_check_config_lists_every_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    short_secret = "short-session-secret-XYZ"
    text = config_text(tmp_path / "guard.db", session_secret=short_secret,
                       issuer="http://idp.example.com")
    text = text.replace('public_url = "https://crm.example.com"',
                        'public_url = "http://crm.example.com"\nmode = "everyone"')
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")

    result = run_cli(capsys, "check-config", "--config", str(path))

    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("the configuration has 3 problems:")
    assert '"server.mode"' in result.err
    assert "session.secrets" in result.err
    assert 'issuer "http://idp.example.com" must be an https URL' in result.err
    assert short_secret not in result.err
    assert CLIENT_SECRET not in result.err


def test_check_config_reports_server_problem_after_fields(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = config_text(tmp_path / "guard.db").replace("https://crm", "http://crm")
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")

    result = run_cli(capsys, "check-config", "--config", str(path))

    assert result.code == 1
    assert "server.enforce_https is on" in result.err
    assert CLIENT_SECRET not in result.err


def test_check_config_missing_sqlite_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    absent = tmp_path / "absent-folder"
    path = tmp_path / "moko-guard.toml"
    path.write_text(config_text(absent / "guard.db"), encoding="utf-8")

    result = run_cli(capsys, "check-config", "--config", str(path))

    assert result.code == 1
    assert result.err.startswith("the configuration has 1 problem:")
    assert f"store.url: the folder {absent} of the SQLite file does not exist" in result.err
    assert not absent.exists()


def test_check_config_relative_sqlite_path_named_with_hint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three slashes make a relative path: the message shows where it points and the fix."""
    monkeypatch.chdir(tmp_path)
    text = config_text(tmp_path / "guard.db")
    text = text.replace(f"sqlite:///{tmp_path / 'guard.db'}", "sqlite:///var/lib/moko-guard/guard.db")
    path = tmp_path / "moko-guard.toml"
    path.write_text(text, encoding="utf-8")

    result = run_cli(capsys, "check-config", "--config", str(path))

    assert result.code == 1
    assert f"the folder {tmp_path / 'var/lib/moko-guard'} of the SQLite file" in result.err
    assert "four slashes, as in sqlite:////var/lib/moko-guard/guard.db" in result.err


def test_check_config_unwritable_sqlite_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    path = tmp_path / "moko-guard.toml"
    path.write_text(config_text(folder / "guard.db"), encoding="utf-8")
    # root may write anywhere, so the permission check is replaced by one for another user.
    monkeypatch.setattr("moko_guard.cli.os.access", lambda target, mode: Path(target) != folder)

    result = run_cli(capsys, "check-config", "--config", str(path))

    assert result.code == 1
    assert f"store.url: the folder {folder} of the SQLite file is not writable" in result.err


def test_check_config_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    result = run_cli(capsys, "check-config", "--config", str(path))

    assert result.code == 1
    assert f'config file "{path}" not found' in result.err
    assert "Traceback" not in result.err


def test_store_command_with_missing_config_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    result = run_cli(capsys, "users", "list", "--config", str(tmp_path / "absent.toml"))

    assert result.code == 1
    assert "not found" in result.err


# --- usage errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["users"],
        ["users", "disable"],
        ["users", "delete", "alice"],
        ["audit", "list", "--since", "yesterday"],
        ["audit", "list", "--outcome", "maybe"],
        ["audit", "export", "--format", "xml"],
        ["check-config", "--no-such-option"],
    ],
    ids=["no-command", "unknown-command", "users-no-action", "disable-no-user",
         "unknown-action", "bad-since", "bad-outcome", "bad-format", "unknown-option"],
)
def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    code, err = usage_exit_code(capsys, *args)

    assert code == 2
    assert "usage: moko-guard" in err


# --- keys and db ----------------------------------------------------------------------


def test_keys_generate_prints_new_secret(capsys: pytest.CaptureFixture[str]) -> None:
    first = run_cli(capsys, "keys", "generate")
    second = run_cli(capsys, "keys", "generate")

    assert first.code == 0
    assert second.code == 0
    first_key = first.out.strip()
    second_key = second.out.strip()
    assert len(first_key) >= 48
    assert len(second_key) >= 48
    assert first_key != second_key
    assert first.out.count("\n") == 1


def test_db_upgrade_reports_version(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    first = run_cli(capsys, "db", "upgrade", "--config", str(config_path))
    second = run_cli(capsys, "db", "upgrade", "--config", str(config_path))

    assert first.code == 0
    assert first.out.strip() == f"schema is at version {LATEST_VERSION}"
    assert second.code == 0
    assert second.out.strip() == f"schema is at version {LATEST_VERSION}"


# --- audit ----------------------------------------------------------------------------


def test_audit_list_prints_table(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    result = run_cli(capsys, "audit", "list", "--config", str(seeded.config))

    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["AT", "EVENT", "OUTCOME", "REASON", "PROVIDER", "USER_ID",
                                "EMAIL", "CLIENT_IP"]
    assert len(lines) == 5
    assert lines[1].startswith("2026-01-13T11:00:00+00:00")
    assert "sign_out" in lines[1]
    assert "domain_not_allowed" in lines[3]
    assert "mallory@evil.example" in lines[3]


def test_audit_list_json_has_every_field(
    capsys: pytest.CaptureFixture[str], seeded: Seeded
) -> None:
    rows = audit_json(capsys, seeded.config)

    assert len(rows) == 4
    for row in rows:
        assert AUDIT_FIELDS <= set(row), row
    assert [row["at"] for row in rows] == [
        "2026-01-13T11:00:00+00:00", "2026-01-12T10:00:00+00:00",
        "2026-01-11T09:00:00+00:00", "2026-01-10T08:00:00+00:00",
    ]
    failure = rows[2]
    assert failure["event"] == "login.failure"
    assert failure["outcome"] == "failure"
    assert failure["reason"] == "domain_not_allowed"
    assert failure["provider"] == "idp"
    assert failure["subject"] == "mallory-sub"
    assert failure["user_id"] is None
    assert failure["email"] == "mallory@evil.example"
    assert failure["client_ip"] == "127.0.0.9"
    assert failure["user_agent"] == "curl/8"


@pytest.mark.parametrize(
    ("filters", "expected_events"),
    [
        (["--since", "2026-01-11"], ["sign_out@13", "login.success@12", "login.failure@11"]),
        (["--until", "2026-01-12"], ["login.failure@11", "login.success@10"]),
        (["--since", "2026-01-11T09:00", "--until", "2026-01-12T10:00"], ["login.failure@11"]),
        (["--since", "2026-01-11T10:00+01:00", "--until", "2026-01-11T10:00:01+01:00"],
         ["login.failure@11"]),
        (["--provider", "github"], ["login.success@12"]),
        (["--outcome", "failure"], ["login.failure@11"]),
        (["--outcome", "info"], ["sign_out@13"]),
        (["--user", "alice@example.com"], ["sign_out@13", "login.success@10"]),
        (["--provider", "idp", "--outcome", "success"], ["login.success@10"]),
        (["--limit", "1"], ["sign_out@13"]),
        (["--provider", "nobody"], []),
    ],
    ids=["since", "until", "window", "since-with-offset", "provider", "outcome-failure",
         "outcome-info", "user-by-name", "provider-and-outcome", "limit", "no-match"],
)
def test_audit_list_filters(
    capsys: pytest.CaptureFixture[str], seeded: Seeded, filters: list[str],
    expected_events: list[str],
) -> None:
    rows = audit_json(capsys, seeded.config, *filters)

    events = [f"{row['event']}@{str(row['at'])[8:10]}" for row in rows]
    assert events == expected_events


def test_audit_list_user_by_id(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    rows = audit_json(capsys, seeded.config, "--user", str(seeded.bob_id))

    assert [row["user_id"] for row in rows] == [seeded.bob_id]


def test_audit_list_unknown_user_exits_1(
    capsys: pytest.CaptureFixture[str], seeded: Seeded
) -> None:
    result = run_cli(capsys, "audit", "list", "--config", str(seeded.config), "--user", "nobody")

    assert result.code == 1
    assert 'user "nobody" not found' in result.err


def test_audit_export_csv(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    result = run_cli(capsys, "audit", "export", "--config", str(seeded.config),
                     "--format", "csv", "--outcome", "success")

    assert result.code == 0
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert len(rows) == 2
    assert AUDIT_FIELDS <= set(rows[0])
    assert [row["provider"] for row in rows] == ["github", "idp"]
    assert rows[1]["user_agent"] == "Firefox/130"
    assert rows[1]["at"] == "2026-01-10T08:00:00+00:00"


def test_audit_export_json(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    result = run_cli(capsys, "audit", "export", "--config", str(seeded.config), "--format", "json")

    assert result.code == 0
    assert len(json.loads(result.out)) == 4


# --- users ------------------------------------------------------------------------------


def test_users_list_prints_table(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    result = run_cli(capsys, "users", "list", "--config", str(seeded.config))

    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == ["ID", "USERNAME", "EMAIL", "ROLES", "DISABLED", "LAST_LOGIN"]
    assert len(lines) == 3
    assert lines[1].split()[:5] == [str(seeded.alice_id), "alice@example.com",
                                    "alice@example.com", "user", "no"]
    assert lines[2].split()[:5] == [str(seeded.bob_id), "bob@example.com", "bob@example.com",
                                    "admin,user", "no"]


def test_users_list_json(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    result = run_cli(capsys, "users", "list", "--config", str(seeded.config), "--json")

    assert result.code == 0
    users = json.loads(result.out)
    assert [user["username"] for user in users] == ["alice@example.com", "bob@example.com"]
    assert users[0]["disabled"] == "no"


def test_users_disable_ends_sessions(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    result = run_cli(capsys, "users", "disable", "--config", str(seeded.config),
                     "alice@example.com")

    assert result.code == 0
    assert result.out.strip() == f"user {seeded.alice_id} disabled, sessions ended: 2"
    disabled, active = asyncio.run(read_state(seeded.store_url, seeded.alice_id,
                                              seeded.alice_sessions))
    assert disabled is True
    assert active == [False, False]
    _, bob_active = asyncio.run(read_state(seeded.store_url, seeded.bob_id, (seeded.bob_session,)))
    assert bob_active == [True]


def test_users_enable_after_disable(capsys: pytest.CaptureFixture[str], seeded: Seeded) -> None:
    disable = run_cli(capsys, "users", "disable", "--config", str(seeded.config),
                      str(seeded.bob_id))

    enable = run_cli(capsys, "users", "enable", "--config", str(seeded.config), str(seeded.bob_id))

    assert disable.code == 0
    assert enable.code == 0
    assert enable.out.strip() == f"user {seeded.bob_id} enabled"
    disabled, active = asyncio.run(read_state(seeded.store_url, seeded.bob_id,
                                              (seeded.bob_session,)))
    assert disabled is False
    assert active == [False]


@pytest.mark.parametrize("action", ["disable", "enable"], ids=["disable", "enable"])
@pytest.mark.parametrize("user", ["nobody@example.com", "999"], ids=["username", "id"])
def test_users_unknown_user_exits_1(
    capsys: pytest.CaptureFixture[str], seeded: Seeded, action: str, user: str
) -> None:
    result = run_cli(capsys, "users", action, "--config", str(seeded.config), user)

    assert result.code == 1
    assert f'user "{user}" not found' in result.err.splitlines()
    assert result.out == ""


# --- installed console script --------------------------------------------------------------


def test_console_script_runs(config_path: Path) -> None:
    script = shutil.which("moko-guard")
    assert script is not None, "the moko-guard console script is not installed"
    environ = {name: value for name, value in os.environ.items()
               if not name.startswith("MOKO_GUARD_")}

    keys = subprocess.run([script, "keys", "generate"], capture_output=True, text=True,
                          timeout=60, env=environ, check=False)
    check = subprocess.run([script, "check-config", "--config", str(config_path)],
                           capture_output=True, text=True, timeout=60, env=environ, check=False)
    usage = subprocess.run([script, "frobnicate"], capture_output=True, text=True, timeout=60,
                           env=environ, check=False)

    assert keys.returncode == 0, keys.stderr
    assert len(keys.stdout.strip()) >= 48
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("config is valid")
    assert usage.returncode == 2
    assert "invalid choice" in usage.stderr


def test_admin_verbs_change_user_and_audit(tmp_path: Path) -> None:
    config = _admin_config(tmp_path)
    asyncio.run(_seed_user(tmp_path))

    show = _run_cli(["users", "show", "ann@example.com", "--json", "--config", str(config)])
    link = _run_cli(["users", "link", "1", "--provider", "gh", "--subject", "9",
                     "--config", str(config)])
    roles = _run_cli(["users", "roles", "1", "--add", "admin", "--config", str(config)])
    unlink = _run_cli(["users", "unlink", "1", "--provider", "gh", "--config", str(config)])
    unlink_again = _run_cli(["users", "unlink", "1", "--provider", "gh", "--config", str(config)])
    revoke = _run_cli(["sessions", "revoke", "--user", "1", "--config", str(config)])
    prune = _run_cli(["audit", "prune", "--before", "2999-01-01", "--config", str(config)])

    assert show[0] == 0
    assert json.loads(show[1])["identities"] == [
        {"provider": "idp", "subject": "s1", "email": None}]
    assert link == (0, "linked gh/9 to user 1\n")
    assert roles == (0, "user 1 roles: admin,user\n")
    assert unlink[0] == 0
    assert unlink_again[0] == 1
    assert revoke[0] == 0
    assert prune[0] == 0
    assert prune[1].startswith("deleted 2 audit events")


def test_link_taken_identity_fails(tmp_path: Path) -> None:
    config = _admin_config(tmp_path)
    asyncio.run(_seed_user(tmp_path))

    asyncio.run(_seed_user(tmp_path, email="bob@example.com", subject="bob-sub"))

    taken, _ = _run_cli(["users", "link", "1", "--provider", "idp", "--subject", "bob-sub",
                         "--config", str(config)])
    unknown, _ = _run_cli(["users", "link", "99", "--provider", "idp", "--subject", "x",
                           "--config", str(config)])

    assert taken == 1
    assert unknown == 1


def _admin_config(tmp_path: Path) -> Path:
    config = tmp_path / "admin.toml"
    config.write_text(
        '[server]\npublic_url = "https://crm.example.com"\n'
        f'[session]\nsecrets = ["{"k" * 40}"]\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "admin.db"}"\n'
        '[[providers]]\nid = "idp"\ntype = "oidc"\nissuer = "https://idp.test"\n'
        'client_id = "c"\nclient_secret = "s"\n'
    )
    return config


async def _seed_user(tmp_path: Path, email: str = "ann@example.com", subject: str = "s1") -> None:
    from moko_guard.store import Store

    store = Store(f"sqlite:///{tmp_path / 'admin.db'}")
    await store.open()
    try:
        await store.create_user_with_identity(
            username=email, email=email, display_name=None, roles=["user"], provider="idp",
            subject=subject, identity_email=None)
    finally:
        await store.close()


def _run_cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from moko_guard.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def test_store_that_cannot_open_gives_plain_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text(
        '[server]\npublic_url = "https://crm.example.com"\n'
        f'[session]\nsecrets = ["{"k" * 40}"]\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "no" / "such" / "folder.db"}"\n'
        '[[providers]]\nid = "idp"\ntype = "oidc"\nissuer = "https://idp.test"\n'
        'client_id = "c"\nclient_secret = "s"\n'
    )

    code = main(["users", "list", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 1
    assert "cannot open the store" in err
    assert "Traceback" not in err


def test_empty_csv_export_has_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _admin_config(tmp_path)

    code = main(["audit", "export", "--format", "csv", "--config", str(config)])

    header = capsys.readouterr().out.splitlines()[0]
    assert code == 0
    assert header.startswith("id,at,event,outcome,reason,provider,subject,user_id,email")
