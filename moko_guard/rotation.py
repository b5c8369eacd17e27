"""Secret rotation without a restart.

``moko-guard serve`` re-reads its config file on SIGHUP and whenever the config
file or a ``file:`` secret it references changes (checked every few seconds).
New session secrets take effect at once: the first seals new cookies and every
listed one still opens old cookies, so putting a new secret first and removing
the old one a session lifetime later signs nobody out. New client secrets are
used from the next token exchange. Each change is a ``secret.changed`` audit
event naming what changed, never the value.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from .audit import AuditEvent
from .config import Settings, load_settings
from .errors import ConfigError

if TYPE_CHECKING:
    from .guard import Guard

logger = logging.getLogger(__name__)

WATCH_INTERVAL = 5.0


def _referenced_files(settings: Settings) -> list[Path]:
    references = [s.reference for s in settings.session.secrets]
    references += [p.client_secret.reference for p in settings.providers if p.client_secret]
    return [Path(r[5:]) for r in references if r and r.startswith("file:")]


def _mtimes(paths: list[Path]) -> dict[Path, float]:
    stamps = {}
    for path in paths:
        try:
            stamps[path] = os.stat(path).st_mtime
        except OSError:
            stamps[path] = -1.0
    return stamps


class SecretReloader:
    def __init__(self, guard: Guard, config_path: str) -> None:
        self.guard = guard
        self.config_path = Path(config_path)
        self._task: asyncio.Task[None] | None = None
        self._stamps = _mtimes(self._watched(guard.settings))

    def _watched(self, settings: Settings) -> list[Path]:
        return [self.config_path, *_referenced_files(settings)]

    async def reload(self, trigger: str) -> list[str]:
        """Re-read the config and apply changed secrets; return the names of what changed."""
        try:
            fresh = load_settings(self.config_path)
        except ConfigError as exc:
            logger.error("secret_reload_failed trigger=%s problems=%d (keeping the current "
                         "secrets): %s", trigger, len(exc.problems), "; ".join(exc.problems))
            return []
        changed = self.guard.apply_secrets(fresh)
        self._stamps = _mtimes(self._watched(fresh))
        for name in changed:
            await self.guard.auditor.record(AuditEvent(
                "secret.changed", "info", reason=trigger, detail=name))
        if changed:
            logger.info("secrets_reloaded trigger=%s changed=%s", trigger, ",".join(changed))
        return changed

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            current = _mtimes(list(self._stamps))
            if current != self._stamps:
                await self.reload("file_changed")

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP,
                                    lambda: loop.create_task(self.reload("sighup")))
        except (NotImplementedError, RuntimeError, ValueError):
            logger.warning("sighup_unavailable: secrets reload only when files change")
        self._task = loop.create_task(self._watch(), name="moko-secret-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
