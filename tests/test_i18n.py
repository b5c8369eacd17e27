"""Sign-in page languages: Accept-Language negotiation and admin catalogues."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import GuardHarness
from moko_guard.web import REASON_MESSAGES, english_strings
from moko_guard.web.i18n import BUILTIN_DIR, Catalogues, parse_accept_language

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7, *;q=0.5", ["fr-ch", "fr", "en", "de", "*"]),
        ("de;q=0.5, en;q=0.9", ["en", "de"]),
        ("en;q=0, fr", ["fr"]),
        ("xx-<script>, fr;q=abc, de", ["de"]),
        ("", []),
    ],
    ids=["rfc-example", "reordered", "q-zero", "junk", "empty"],
)
def test_accept_language_parsed_in_order(header: str, expected: list[str]) -> None:
    assert parse_accept_language(header) == expected


@pytest.mark.parametrize(
    ("header", "language"),
    [("fr-CA,fr;q=0.9", "fr"), ("de-AT", "de"), ("es, it", "en"), (None, "en"),
     ("de;q=0.4, fr;q=0.6", "fr")],
    ids=["fr-region", "de-region", "unknown", "none", "quality"],
)
def test_best_language_chosen(header: str | None, language: str) -> None:
    catalogues = Catalogues(english_strings())

    assert catalogues.choose(header) == language


@pytest.mark.parametrize("code", ["fr", "de"])
def test_shipped_catalogues_translate_every_string(code: str) -> None:
    data = json.loads((BUILTIN_DIR / f"{code}.json").read_text(encoding="utf-8"))

    missing = set(english_strings()) - set(data)

    assert missing == set()
    assert "{name}" in data["ui.sign_in.button"]


async def test_sign_in_page_in_french(harness: GuardHarness) -> None:
    response = await harness.client.get("/oauth2/sign_in", headers={"Accept-Language": "fr-FR"})

    assert response.status_code == 200
    assert response.headers["content-language"] == "fr"
    assert '<html lang="fr">' in response.text
    assert "Se connecter avec Example IdP" in response.text


async def test_failure_reason_in_german(harness: GuardHarness) -> None:
    response = await harness.client.get(
        "/oauth2/callback", params={"state": "x"}, headers={"Accept-Language": "de"})

    assert response.status_code == 400
    assert "Die Anmeldung konnte diesem Browser nicht zugeordnet werden" in response.text
    assert "Anfrage-ID" in response.text


async def test_admin_catalogue_adds_language(make_harness: Any, tmp_path: Path) -> None:
    folder = tmp_path / "locales"
    folder.mkdir()
    (folder / "nl.json").write_text(json.dumps({"ui.sign_in.title": "Inloggen"}), encoding="utf-8")
    (folder / "bad name.json").write_text("{}", encoding="utf-8")
    (folder / "es.json").write_text("not json", encoding="utf-8")
    harness: GuardHarness = await make_harness(ui={"locales_dir": str(folder)})

    response = await harness.client.get("/oauth2/sign_in", headers={"Accept-Language": "nl"})

    assert "<h1>Inloggen</h1>" in response.text
    assert "Sign in with Example IdP" in response.text
    assert harness.guard.catalogues.choose("es") == "en"


def test_every_reason_has_english_text() -> None:
    strings = english_strings()

    assert all(f"reason.{code}" in strings for code in REASON_MESSAGES)
