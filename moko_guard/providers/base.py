"""The provider contract and the HTTP helpers every provider type shares."""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import httpx

from ..errors import LoginError
from ..identity import Identity

logger = logging.getLogger(__name__)


class Provider(Protocol):
    id: str
    name: str

    async def authorization_url(
        self, *, state: str, nonce: str, code_challenge: str, redirect_uri: str
    ) -> str: ...

    async def complete(
        self, *, code: str, redirect_uri: str, code_verifier: str, nonce: str
    ) -> Identity: ...

    async def ready(self) -> bool: ...


def timeouts(connect: float, total: float) -> httpx.Timeout:
    return httpx.Timeout(total, connect=connect)


async def request_json(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    provider_id: str,
    step: str,
    timeout: httpx.Timeout,
    **kwargs: Any,
) -> dict[str, Any]:
    """Send a request to a provider and return its JSON object.

    Raises :class:`LoginError` with reason ``provider_timeout``,
    ``provider_unreachable`` or ``provider_error``; the detail names the step and
    the HTTP status or the provider's ``error`` code, never a token.
    """
    try:
        response = await client.request(method, url, timeout=timeout, **kwargs)
    except httpx.TimeoutException:
        raise LoginError("provider_timeout", f"{provider_id} {step}: timed out", status=504) from None
    except httpx.HTTPError as exc:
        raise LoginError(
            "provider_unreachable", f"{provider_id} {step}: {type(exc).__name__}", status=502
        ) from None

    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None

    if response.status_code >= 400:
        code = body.get("error") if isinstance(body, dict) else None
        detail = f"{provider_id} {step}: HTTP {response.status_code}"
        if isinstance(code, str):
            detail += f" error={code[:64]}"
        raise LoginError("provider_error", detail, status=502)
    if not isinstance(body, dict):
        raise LoginError(
            "provider_error", f"{provider_id} {step}: answer is not a JSON object", status=502
        )
    return body
