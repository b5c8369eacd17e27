"""Message catalogues for the pages a signed-out person sees, chosen by ``Accept-Language``.

English is built in. Each other language is a JSON file ``<code>.json``
mapping keys to text: ``ui.*`` for page text and ``reason.<code>`` for the
sign-in failure reasons. French and German ship in this package; an admin adds
or overrides a language by putting such a file in ``ui.locales_dir``. A key
missing from a catalogue falls back to English.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_LANGUAGE = "en"
BUILTIN_DIR = Path(__file__).with_name("locales")
_LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")
_MAX_ACCEPT_LANGUAGE = 512

UI_STRINGS = {
    "ui.sign_in.title": "Sign in",
    "ui.sign_in.lead": "Choose how you want to sign in.",
    "ui.sign_in.button": "Sign in with {name}",
    "ui.request_id": "Request ID",
    "ui.theme.switch": "Switch theme",
    "ui.theme.label": "Switch light or dark theme",
    "ui.signed_out.title": "Signed out",
    "ui.signed_out.message": "You are signed out.",
    "ui.signed_out.link": "Sign in again",
    "ui.native_login.link": "Use the application's own sign-in",
}


def parse_accept_language(header: str | None) -> list[str]:
    """Return the language tags of an ``Accept-Language`` header, best first (RFC 9110 12.5.4)."""
    if not header:
        return []
    weighted: list[tuple[float, int, str]] = []
    for index, part in enumerate(header[:_MAX_ACCEPT_LANGUAGE].split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        if tag and quality > 0 and (tag == "*" or _LANGUAGE_RE.match(tag)):
            weighted.append((-quality, index, tag))
    return [tag for _, _, tag in sorted(weighted)]


class Catalogues:
    """The available languages and their strings, English included."""

    def __init__(self, english: dict[str, str], extra_dir: Path | None = None) -> None:
        self.english = english
        self.languages: dict[str, dict[str, str]] = {DEFAULT_LANGUAGE: english}
        self._load_dir(BUILTIN_DIR)
        if extra_dir is not None:
            self._load_dir(extra_dir)

    def _load_dir(self, folder: Path) -> None:
        if not folder.is_dir():
            logger.warning("locales_dir_missing path=%s", folder)
            return
        for path in sorted(folder.glob("*.json")):
            code = path.stem.lower()
            if not _LANGUAGE_RE.match(code):
                logger.warning("locale_file_ignored path=%s reason=invalid_language_code", path)
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                logger.warning("locale_file_ignored path=%s reason=%s", path, type(exc).__name__)
                continue
            if not isinstance(data, dict):
                logger.warning("locale_file_ignored path=%s reason=not_an_object", path)
                continue
            strings = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}
            self.languages[code] = {**self.languages.get(code, {}), **strings}

    def choose(self, accept_language: str | None) -> str:
        """Return the best available language for an ``Accept-Language`` header."""
        for tag in parse_accept_language(accept_language):
            if tag in self.languages:
                return tag
            base = tag.split("-", 1)[0]
            if base in self.languages:
                return base
        return DEFAULT_LANGUAGE

    def strings(self, language: str) -> dict[str, str]:
        """Return every string in ``language``, with English for the keys it lacks."""
        return {**self.english, **self.languages.get(language, {})}
