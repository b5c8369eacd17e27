"""Encrypted, authenticated cookie values (AES-256-GCM) with key rotation.

Each configured secret yields one 256-bit key through HKDF-SHA256. A sealed
value is ``base64url(key_id | nonce | ciphertext+tag)``: ``key_id`` is the first
4 bytes of SHA-256 over the key, so opening picks the right key without trying
them all. The first secret seals; every secret opens, so a new secret can be put
first without signing anybody out. The ``purpose`` is bound as associated data,
so a flow cookie can never be opened as a session cookie or the reverse.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_KEY_ID_LENGTH = 4
_NONCE_LENGTH = 12
_TAG_LENGTH = 16
MAX_SEALED_LENGTH = 4096


class SealError(ValueError):
    """A sealed value is malformed, tampered with, or sealed with an unknown key."""


def _derive_key(secret: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"moko_guard", info=b"cookie-seal v1")
    return hkdf.derive(secret.encode("utf-8"))


class Sealer:
    """Seals and opens JSON payloads for one or more secrets."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        keys = [_derive_key(secret) for secret in secrets]
        self._seal_key_id = hashlib.sha256(keys[0]).digest()[:_KEY_ID_LENGTH]
        self._ciphers = {
            hashlib.sha256(key).digest()[:_KEY_ID_LENGTH]: AESGCM(key) for key in keys
        }

    def seal(self, payload: dict[str, Any], purpose: str) -> str:
        plaintext = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
        nonce = os.urandom(_NONCE_LENGTH)
        ciphertext = self._ciphers[self._seal_key_id].encrypt(nonce, plaintext, purpose.encode())
        token = self._seal_key_id + nonce + ciphertext
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode("ascii")

    def open(self, sealed: str, purpose: str) -> dict[str, Any]:
        """Return the payload, or raise :class:`SealError` with a short reason."""
        if not sealed or len(sealed) > MAX_SEALED_LENGTH:
            raise SealError("empty or oversized value")
        try:
            raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        except (binascii.Error, ValueError):
            raise SealError("not base64url") from None
        if len(raw) < _KEY_ID_LENGTH + _NONCE_LENGTH + _TAG_LENGTH:
            raise SealError("too short")
        cipher = self._ciphers.get(raw[:_KEY_ID_LENGTH])
        if cipher is None:
            raise SealError("sealed with an unknown key")
        nonce = raw[_KEY_ID_LENGTH:_KEY_ID_LENGTH + _NONCE_LENGTH]
        try:
            plaintext = cipher.decrypt(nonce, raw[_KEY_ID_LENGTH + _NONCE_LENGTH:], purpose.encode())
        except InvalidTag:
            raise SealError("authentication failed") from None
        try:
            payload = json.loads(plaintext)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SealError("payload is not JSON") from None
        if not isinstance(payload, dict):
            raise SealError("payload is not an object")
        return payload
