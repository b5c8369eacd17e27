"""Tests of the AES-256-GCM cookie sealing in moko_guard/sealing.py."""

from __future__ import annotations

import base64
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moko_guard.sealing import MAX_SEALED_LENGTH, Sealer, SealError, _derive_key

OLD_SECRET = "old-secret-" + "o" * 40
NEW_SECRET = "new-secret-" + "n" * 40
OTHER_SECRET = "other-secret-" + "x" * 40
PURPOSE = "session"
PAYLOAD: dict[str, Any] = {
    "sid": "abc123", "uid": 7, "usr": "alice@example.com", "rol": ["user", "admin"],
    "pun": "Ålice ✓", "nested": {"a": [1, 2.5, None, True]},
}
# key id (4 bytes) + nonce (12 bytes) + GCM tag (16 bytes)
OVERHEAD = 4 + 12 + 16


def decode(sealed: str) -> bytes:
    return base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))


def encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def seal_raw_plaintext(secret: str, plaintext: bytes, purpose: str) -> str:
    """Seal bytes that ``Sealer.seal`` would never produce, in the same wire format."""
    key = _derive_key(secret)
    key_id = decode(Sealer([secret]).seal({}, purpose))[:4]
    nonce = os.urandom(12)
    return encode(key_id + nonce + AESGCM(key).encrypt(nonce, plaintext, purpose.encode()))


def test_sealed_value_round_trips() -> None:
    sealer = Sealer([NEW_SECRET])

    sealed = sealer.seal(PAYLOAD, PURPOSE)

    assert sealer.open(sealed, PURPOSE) == PAYLOAD


def test_sealed_value_is_unpadded_base64url() -> None:
    sealer = Sealer([NEW_SECRET])

    sealed = sealer.seal(PAYLOAD, PURPOSE)

    assert set(sealed) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_sealing_twice_gives_different_values() -> None:
    sealer = Sealer([NEW_SECRET])

    first = sealer.seal(PAYLOAD, PURPOSE)
    second = sealer.seal(PAYLOAD, PURPOSE)

    assert first != second
    assert decode(first)[4:16] != decode(second)[4:16]


def test_sealed_value_hides_payload() -> None:
    sealer = Sealer([NEW_SECRET])

    raw = decode(sealer.seal(PAYLOAD, PURPOSE))

    assert b"alice@example.com" not in raw
    assert b"abc123" not in raw


def test_tampered_byte_anywhere_rejected() -> None:
    sealer = Sealer([NEW_SECRET])
    raw = decode(sealer.seal(PAYLOAD, PURPOSE))

    accepted = []
    for index in range(len(raw)):
        for bit in (0x01, 0x80):
            tampered = bytearray(raw)
            tampered[index] ^= bit
            try:
                sealer.open(encode(bytes(tampered)), PURPOSE)
            except SealError:
                continue
            accepted.append((index, bit))

    assert accepted == []


def test_truncated_value_rejected() -> None:
    sealer = Sealer([NEW_SECRET])
    sealed = sealer.seal(PAYLOAD, PURPOSE)

    accepted = []
    for length in range(len(sealed)):
        try:
            sealer.open(sealed[:length], PURPOSE)
        except SealError:
            continue
        accepted.append(length)

    assert accepted == []


def test_truncated_bytes_rejected() -> None:
    sealer = Sealer([NEW_SECRET])
    raw = decode(sealer.seal(PAYLOAD, PURPOSE))

    accepted = []
    for length in (0, 1, 4, 16, OVERHEAD - 1, OVERHEAD, len(raw) - 16, len(raw) - 1):
        try:
            sealer.open(encode(raw[:length]), PURPOSE)
        except SealError:
            continue
        accepted.append(length)

    assert accepted == []


def test_appended_bytes_rejected() -> None:
    sealer = Sealer([NEW_SECRET])
    raw = decode(sealer.seal(PAYLOAD, PURPOSE))

    with pytest.raises(SealError):
        sealer.open(encode(raw + b"\x00"), PURPOSE)


@pytest.mark.parametrize(
    "value",
    ["!!!!", "not base64 at all", "a", "abcde", "é" * 64, "\x00" * 64, "A" * 63 + "\ud800",
     "====", "AAAA" * 8],
    ids=["punctuation", "spaces", "one_char", "five_chars", "non_ascii", "nul_bytes",
         "lone_surrogate", "only_padding", "zeros"],
)
def test_value_not_base64_rejected(value: str) -> None:
    sealer = Sealer([NEW_SECRET])

    with pytest.raises(SealError):
        sealer.open(value, PURPOSE)


def test_oversized_value_rejected_before_decoding() -> None:
    sealer = Sealer([NEW_SECRET])
    sealed = sealer.seal({"blob": "z" * MAX_SEALED_LENGTH}, PURPOSE)

    with pytest.raises(SealError, match="oversized"):
        sealer.open(sealed, PURPOSE)


def test_value_at_length_limit_is_decoded() -> None:
    sealer = Sealer([NEW_SECRET])
    value = "A" * MAX_SEALED_LENGTH

    with pytest.raises(SealError) as caught:
        sealer.open(value, PURPOSE)

    assert "oversized" not in str(caught.value)


def test_empty_value_rejected() -> None:
    sealer = Sealer([NEW_SECRET])

    with pytest.raises(SealError):
        sealer.open("", PURPOSE)


def test_value_sealed_with_unknown_key_rejected() -> None:
    sealed = Sealer([OTHER_SECRET]).seal(PAYLOAD, PURPOSE)

    with pytest.raises(SealError, match="unknown key"):
        Sealer([NEW_SECRET, OLD_SECRET]).open(sealed, PURPOSE)


def test_old_secret_opens_after_new_secret_put_first() -> None:
    sealed = Sealer([OLD_SECRET]).seal(PAYLOAD, PURPOSE)

    opened = Sealer([NEW_SECRET, OLD_SECRET]).open(sealed, PURPOSE)

    assert opened == PAYLOAD


def test_rotated_sealer_seals_with_first_secret() -> None:
    rotated = Sealer([NEW_SECRET, OLD_SECRET])

    sealed = rotated.seal(PAYLOAD, PURPOSE)

    assert Sealer([NEW_SECRET]).open(sealed, PURPOSE) == PAYLOAD
    with pytest.raises(SealError):
        Sealer([OLD_SECRET]).open(sealed, PURPOSE)


def test_removed_secret_no_longer_opens() -> None:
    sealed = Sealer([OLD_SECRET]).seal(PAYLOAD, PURPOSE)

    with pytest.raises(SealError):
        Sealer([NEW_SECRET]).open(sealed, PURPOSE)


@pytest.mark.parametrize(
    ("sealed_for", "opened_as"),
    [("flow", "session"), ("session", "flow"), ("session", "Session"), ("session", "")],
    ids=["flow_as_session", "session_as_flow", "case_differs", "empty_purpose"],
)
def test_purpose_bound_to_value(sealed_for: str, opened_as: str) -> None:
    sealer = Sealer([NEW_SECRET])
    sealed = sealer.seal(PAYLOAD, sealed_for)

    with pytest.raises(SealError):
        sealer.open(sealed, opened_as)


@pytest.mark.parametrize(
    "plaintext", [b"[1, 2]", b'"text"', b"null", b"not json", b"\xff\xfe"],
    ids=["array", "string", "null", "not_json", "not_utf8"],
)
def test_authentic_non_object_payload_rejected(plaintext: bytes) -> None:
    sealed = seal_raw_plaintext(NEW_SECRET, plaintext, PURPOSE)

    with pytest.raises(SealError):
        Sealer([NEW_SECRET]).open(sealed, PURPOSE)


def test_sealer_requires_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        Sealer([])
