"""Tests of ID token validation and the JWKS cache in moko_guard/tokens.py.

The JWKS is served through httpx.MockTransport at ``https://idp.test/jwks``, so
no request leaves the process. Time is injected: ``now=`` for the token's time
claims and a fake clock for the cache's refetch interval.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import ECAlgorithm
from support.fake_idp import CLIENT_ID, ISSUER, new_rsa_key, public_jwk

from moko_guard.errors import LoginError
from moko_guard.tokens import JwksCache, TokenExpectations, validate_id_token

pytestmark = pytest.mark.anyio

JWKS_URL = f"{ISSUER}/jwks"
NOW = 1_700_000_000
NONCE = "nonce-0123456789abcdef"
LEEWAY = 60.0
MISSING = object()


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class JwksEndpoint:
    """The provider's JWKS URL: it serves ``keys`` or the configured failure and counts requests."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.failure: str | None = None
        self.requests = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        assert str(request.url) == JWKS_URL
        self.requests += 1
        if self.failure == "http_500":
            return httpx.Response(500, text="internal error")
        if self.failure == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if self.failure == "not_json":
            return httpx.Response(200, text="<html>maintenance</html>")
        if self.failure == "no_keys_list":
            return httpx.Response(200, json={"keys": "none"})
        return httpx.Response(200, json={"keys": self.keys})


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()


@pytest.fixture(scope="module")
def rotated_key() -> rsa.RSAPrivateKey:
    return new_rsa_key()


@pytest.fixture
def endpoint(signing_key: rsa.RSAPrivateKey) -> JwksEndpoint:
    return JwksEndpoint([public_jwk(signing_key, "key-1")])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1000.0)


@pytest.fixture
async def http_client(endpoint: JwksEndpoint) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint.handle)) as client:
        yield client


@pytest.fixture
def jwks(http_client: httpx.AsyncClient, clock: FakeClock) -> JwksCache:
    return JwksCache(JWKS_URL, http_client, clock=clock)


def expectations(algorithms: tuple[str, ...] = ("RS256",), nonce: str | None = NONCE,
                 ) -> TokenExpectations:
    return TokenExpectations(
        issuer=ISSUER, client_id=CLIENT_ID, nonce=nonce, algorithms=algorithms, leeway=LEEWAY
    )


def make_claims(**overrides: Any) -> dict[str, Any]:
    """Return valid claims at ``NOW``. An override of ``MISSING`` removes the claim."""
    claims: dict[str, Any] = {
        "iss": ISSUER, "aud": CLIENT_ID, "sub": "alice-sub", "iat": NOW, "exp": NOW + 300,
        "nonce": NONCE,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not MISSING}


def sign(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, claims: dict[str, Any], *,
         kid: str | None = "key-1", algorithm: str = "RS256") -> str:
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


async def assert_rejected(token: str, jwks: JwksCache, expected: TokenExpectations | None = None,
                          *, now: float = NOW) -> LoginError:
    """Validate ``token``, expecting ``token_invalid`` with no part of the token in the message."""
    with pytest.raises(LoginError) as caught:
        await validate_id_token(token, expected or expectations(), jwks, now=now)

    error = caught.value
    assert error.reason == "token_invalid"
    message = f"{error} {error.detail}"
    if token:
        assert token not in message
    for segment in token.split("."):
        if len(segment) >= 12:
            assert segment not in message
    return error


# --- signature and algorithm ---------------------------------------------------


async def test_valid_rs256_token_accepted(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, endpoint: JwksEndpoint
) -> None:
    token = sign(signing_key, make_claims())

    claims = await validate_id_token(token, expectations(), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"
    assert claims["nonce"] == NONCE
    assert endpoint.requests == 1


async def test_token_without_kid_uses_matching_key(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey
) -> None:
    token = sign(signing_key, make_claims(), kid=None)

    claims = await validate_id_token(token, expectations(), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"


@pytest.mark.parametrize("kid", [1, ["key-1"], {"id": "key-1"}], ids=["number", "list", "object"])
async def test_non_string_kid_rejected_before_jwks_lookup(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey, kid: object
) -> None:
    signing_input = f"{b64url_json({'alg': 'RS256', 'kid': kid})}.{b64url_json(make_claims())}"
    signature = signing_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    token = f"{signing_input}.{b64url(signature)}"

    await assert_rejected(token, jwks)

    assert endpoint.requests == 0


@pytest.mark.parametrize("alg", ["none", "None", "NONE"], ids=["lower", "title", "upper"])
async def test_unsigned_token_rejected(jwks: JwksCache, alg: str) -> None:
    token = f"{b64url_json({'alg': alg, 'kid': 'key-1'})}.{b64url_json(make_claims())}."

    await assert_rejected(token, jwks)


@pytest.mark.parametrize(
    "public_format",
    [serialization.PublicFormat.SubjectPublicKeyInfo, serialization.PublicFormat.PKCS1],
    ids=["spki_pem", "pkcs1_pem"],
)
@pytest.mark.parametrize(
    "algorithms", [("RS256",), ("RS256", "HS256")], ids=["rs256_only", "hs256_listed"]
)
async def test_hs256_with_public_key_as_secret_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey,
    public_format: serialization.PublicFormat, algorithms: tuple[str, ...],
) -> None:
    pem = signing_key.public_key().public_bytes(serialization.Encoding.PEM, public_format)
    signing_input = f"{b64url_json({'alg': 'HS256', 'kid': 'key-1'})}.{b64url_json(make_claims())}"
    signature = hmac.new(pem, signing_input.encode("ascii"), hashlib.sha256).digest()
    token = f"{signing_input}.{b64url(signature)}"

    await assert_rejected(token, jwks, expectations(algorithms=algorithms))


async def test_algorithm_outside_allow_list_rejected(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey
) -> None:
    # The JWK declares no "alg", so only the allow-list can stop an RS384 token.
    endpoint.keys = [{k: v for k, v in public_jwk(signing_key, "key-1").items() if k != "alg"}]
    token = sign(signing_key, make_claims(), algorithm="RS384")

    await assert_rejected(token, jwks, expectations(algorithms=("RS256",)))


async def test_algorithm_on_allow_list_accepted(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey
) -> None:
    endpoint.keys = [{k: v for k, v in public_jwk(signing_key, "key-1").items() if k != "alg"}]
    token = sign(signing_key, make_claims(), algorithm="RS384")

    claims = await validate_id_token(
        token, expectations(algorithms=("RS256", "RS384")), jwks, now=NOW
    )

    assert claims["sub"] == "alice-sub"


async def test_key_declaring_other_alg_not_used(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey
) -> None:
    endpoint.keys = [{**public_jwk(signing_key, "key-1"), "alg": "RS512"}]
    token = sign(signing_key, make_claims())

    await assert_rejected(token, jwks)


async def test_signature_from_other_key_rejected(
    jwks: JwksCache, rotated_key: rsa.RSAPrivateKey
) -> None:
    token = sign(rotated_key, make_claims(), kid="key-1")

    await assert_rejected(token, jwks)


async def test_tampered_payload_rejected(jwks: JwksCache, signing_key: rsa.RSAPrivateKey) -> None:
    header, _, signature = sign(signing_key, make_claims()).split(".")
    forged_payload = b64url_json(make_claims(sub="mallory-sub"))

    await assert_rejected(f"{header}.{forged_payload}.{signature}", jwks)


# --- issuer and audience -------------------------------------------------------


@pytest.mark.parametrize(
    "issuer",
    [ISSUER + "/", "https://evil.test", "http://idp.test", "https://IDP.test", "", MISSING],
    ids=["trailing_slash", "other_host", "http_scheme", "upper_case_host", "empty", "missing"],
)
async def test_wrong_issuer_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, issuer: object
) -> None:
    token = sign(signing_key, make_claims(iss=issuer))

    await assert_rejected(token, jwks)


@pytest.mark.parametrize(
    "audience_claims",
    [
        {"aud": "other-client"},
        {"aud": [CLIENT_ID, "other-client"]},
        {"aud": [CLIENT_ID, "other-client"], "azp": "other-client"},
        {"aud": CLIENT_ID, "azp": "other-client"},
        {"aud": ["other-client"], "azp": CLIENT_ID},
        {"aud": []},
        {"aud": MISSING},
        {"aud": {"client": CLIENT_ID}},
    ],
    ids=["other_client", "list_without_azp", "list_with_foreign_azp", "foreign_azp",
         "list_without_client", "empty_list", "missing", "object"],
)
async def test_wrong_audience_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, audience_claims: dict[str, Any]
) -> None:
    token = sign(signing_key, make_claims(**audience_claims))

    await assert_rejected(token, jwks)


@pytest.mark.parametrize(
    "audience_claims",
    [
        {"aud": [CLIENT_ID]},
        {"aud": [CLIENT_ID, "other-client"], "azp": CLIENT_ID},
        {"aud": CLIENT_ID, "azp": CLIENT_ID},
    ],
    ids=["single_item_list", "list_with_own_azp", "own_azp"],
)
async def test_audience_with_client_accepted(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, audience_claims: dict[str, Any]
) -> None:
    token = sign(signing_key, make_claims(**audience_claims))

    claims = await validate_id_token(token, expectations(), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"


# --- time claims ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("time_claims", "now"),
    [
        ({"exp": NOW}, NOW + LEEWAY + 1),
        ({"iat": NOW + LEEWAY + 1}, NOW),
        ({"nbf": NOW + LEEWAY + 1}, NOW),
        ({"nbf": NOW + 3600}, NOW),
        ({"exp": MISSING}, NOW),
        ({"iat": MISSING}, NOW),
        ({"exp": str(NOW + 300)}, NOW),
        ({"iat": True}, NOW),
        ({"nbf": "soon"}, NOW),
        ({"exp": float("nan")}, NOW),
        ({"exp": float("inf")}, NOW),
        ({"iat": float("-inf")}, NOW),
        ({"nbf": float("nan")}, NOW),
        ({"exp": 10**400}, NOW),
    ],
    ids=["expired_beyond_leeway", "iat_future_beyond_leeway", "nbf_future_beyond_leeway",
         "nbf_an_hour_ahead", "missing_exp", "missing_iat", "exp_string", "iat_bool",
         "nbf_string", "exp_nan", "exp_infinite", "iat_minus_infinite", "nbf_nan",
         "exp_beyond_float_range"],
)
async def test_time_claims_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, time_claims: dict[str, Any], now: float
) -> None:
    token = sign(signing_key, make_claims(**time_claims))

    await assert_rejected(token, jwks, now=now)


@pytest.mark.parametrize(
    ("time_claims", "now"),
    [
        ({"exp": NOW}, NOW + LEEWAY - 1),
        ({"iat": NOW + 4}, NOW),
        ({"iat": NOW + LEEWAY - 1}, NOW),
        ({"nbf": NOW + 4}, NOW),
        ({"iat": NOW + 0.5, "exp": NOW + 300.5}, NOW),
    ],
    ids=["expired_within_leeway", "iat_4s_skew", "iat_within_leeway", "nbf_4s_skew",
         "fractional_times"],
)
async def test_time_claims_within_leeway_accepted(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, time_claims: dict[str, Any], now: float
) -> None:
    token = sign(signing_key, make_claims(**time_claims))

    claims = await validate_id_token(token, expectations(), jwks, now=now)

    assert claims["sub"] == "alice-sub"


# --- nonce and subject ---------------------------------------------------------


@pytest.mark.parametrize(
    "nonce", ["other-nonce", NONCE + "x", NONCE.upper(), "", MISSING, 12345],
    ids=["other", "longer", "upper_case", "empty", "missing", "number"],
)
async def test_wrong_nonce_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, nonce: object
) -> None:
    token = sign(signing_key, make_claims(nonce=nonce))

    await assert_rejected(token, jwks)


@pytest.mark.parametrize("nonce", [MISSING, "any-nonce"], ids=["missing", "present"])
async def test_nonce_ignored_when_none_expected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, nonce: object
) -> None:
    """Bearer tokens come from no sign-in of ours, so their validation expects no nonce."""
    token = sign(signing_key, make_claims(nonce=nonce))

    claims = await validate_id_token(token, expectations(nonce=None), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"


@pytest.mark.parametrize(
    "subject", [MISSING, "", "s" * 256, 12345, None],
    ids=["missing", "empty", "too_long", "number", "null"],
)
async def test_invalid_subject_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, subject: object
) -> None:
    token = sign(signing_key, make_claims(sub=subject))

    await assert_rejected(token, jwks)


# --- JWKS cache ----------------------------------------------------------------


async def test_unknown_kid_refetches_once_for_rotated_key(
    jwks: JwksCache, endpoint: JwksEndpoint, clock: FakeClock,
    signing_key: rsa.RSAPrivateKey, rotated_key: rsa.RSAPrivateKey,
) -> None:
    await validate_id_token(sign(signing_key, make_claims()), expectations(), jwks, now=NOW)
    endpoint.keys = [public_jwk(rotated_key, "key-2"), public_jwk(signing_key, "key-1")]
    clock.advance(100)

    claims = await validate_id_token(
        sign(rotated_key, make_claims(), kid="key-2"), expectations(), jwks, now=NOW
    )

    assert claims["sub"] == "alice-sub"
    assert endpoint.requests == 2


async def test_unknown_kid_refetch_rate_limited(
    jwks: JwksCache, endpoint: JwksEndpoint, clock: FakeClock,
    signing_key: rsa.RSAPrivateKey, rotated_key: rsa.RSAPrivateKey,
) -> None:
    await validate_id_token(sign(signing_key, make_claims()), expectations(), jwks, now=NOW)
    clock.advance(100)
    await assert_rejected(sign(rotated_key, make_claims(), kid="key-9"), jwks)
    assert endpoint.requests == 2
    endpoint.keys = [public_jwk(rotated_key, "key-2")]
    clock.advance(30)

    await assert_rejected(sign(rotated_key, make_claims(), kid="key-2"), jwks)

    assert endpoint.requests == 2


async def test_unknown_kid_refetched_after_interval(
    jwks: JwksCache, endpoint: JwksEndpoint, clock: FakeClock,
    signing_key: rsa.RSAPrivateKey, rotated_key: rsa.RSAPrivateKey,
) -> None:
    await validate_id_token(sign(signing_key, make_claims()), expectations(), jwks, now=NOW)
    clock.advance(100)
    await assert_rejected(sign(rotated_key, make_claims(), kid="key-2"), jwks)
    endpoint.keys = [public_jwk(rotated_key, "key-2")]
    clock.advance(61)

    claims = await validate_id_token(
        sign(rotated_key, make_claims(), kid="key-2"), expectations(), jwks, now=NOW
    )

    assert claims["sub"] == "alice-sub"
    assert endpoint.requests == 3


async def test_known_kid_does_not_refetch(
    jwks: JwksCache, endpoint: JwksEndpoint, clock: FakeClock, signing_key: rsa.RSAPrivateKey
) -> None:
    token = sign(signing_key, make_claims())

    for _ in range(3):
        await validate_id_token(token, expectations(), jwks, now=NOW)
        clock.advance(3600)

    assert endpoint.requests == 1


@pytest.mark.parametrize("failure", ["http_500", "timeout", "not_json", "no_keys_list"])
async def test_failed_refetch_keeps_old_keys(
    jwks: JwksCache, endpoint: JwksEndpoint, clock: FakeClock,
    signing_key: rsa.RSAPrivateKey, rotated_key: rsa.RSAPrivateKey, failure: str,
) -> None:
    old_token = sign(signing_key, make_claims())
    await validate_id_token(old_token, expectations(), jwks, now=NOW)
    endpoint.failure = failure
    clock.advance(100)
    await assert_rejected(sign(rotated_key, make_claims(), kid="key-2"), jwks)
    assert endpoint.requests == 2

    claims = await validate_id_token(old_token, expectations(), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"
    assert endpoint.requests == 2


async def test_failed_first_fetch_retried_after_interval(
    jwks: JwksCache, endpoint: JwksEndpoint, clock: FakeClock, signing_key: rsa.RSAPrivateKey
) -> None:
    token = sign(signing_key, make_claims())
    endpoint.failure = "http_500"
    await assert_rejected(token, jwks)
    endpoint.failure = None
    clock.advance(61)

    claims = await validate_id_token(token, expectations(), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"
    assert endpoint.requests == 2


@pytest.fixture(scope="module")
def ec_jwk() -> dict[str, Any]:
    public_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(public_key))
    return {**jwk, "kid": "key-1", "use": "sig"}


@pytest.mark.parametrize("declared_alg", [None, "RS256"], ids=["no_alg", "rs256_alg"])
async def test_key_of_wrong_type_not_used(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey,
    ec_jwk: dict[str, Any], declared_alg: str | None,
) -> None:
    endpoint.keys = [ec_jwk if declared_alg is None else {**ec_jwk, "alg": declared_alg}]
    token = sign(signing_key, make_claims())

    await assert_rejected(token, jwks)


async def test_encryption_key_not_used_for_signatures(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey
) -> None:
    endpoint.keys = [{**public_jwk(signing_key, "key-1"), "use": "enc"}]
    token = sign(signing_key, make_claims())

    await assert_rejected(token, jwks)


@pytest.mark.parametrize(
    "broken_jwk",
    [{"kty": "RSA", "kid": "key-1"}, {"kty": "RSA", "kid": "key-1", "n": "!!", "e": "AQAB"}],
    ids=["no_modulus", "modulus_not_base64"],
)
async def test_malformed_jwk_rejected_cleanly(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey,
    broken_jwk: dict[str, Any],
) -> None:
    endpoint.keys = [broken_jwk]
    token = sign(signing_key, make_claims())

    await assert_rejected(token, jwks)


async def test_malformed_jwk_skipped_for_token_without_kid(
    jwks: JwksCache, endpoint: JwksEndpoint, signing_key: rsa.RSAPrivateKey
) -> None:
    good = {k: v for k, v in public_jwk(signing_key, "unused").items() if k != "kid"}
    endpoint.keys = [{"kty": "RSA"}, good]
    token = sign(signing_key, make_claims(), kid=None)

    claims = await validate_id_token(token, expectations(), jwks, now=NOW)

    assert claims["sub"] == "alice-sub"


# --- malformed tokens ----------------------------------------------------------

VALID_HEADER = b64url_json({"alg": "RS256", "kid": "key-1"})
VALID_PAYLOAD = b64url_json(make_claims())
NOT_UTF8_HEADER = b64url(b"\xff\xfe\xfd")


@pytest.mark.parametrize(
    "token",
    [
        "",
        f"{VALID_HEADER}.{VALID_PAYLOAD}",
        f"{VALID_HEADER}.{VALID_PAYLOAD}.c2lnbmF0dXJl.ZXh0cmE",
        "..",
        "!!!!.@@@@.####",
        "bm90IGpzb24.bm90IGpzb24.c2ln",
        f"{b64url_json(['RS256'])}.{VALID_PAYLOAD}.c2ln",
        f"{NOT_UTF8_HEADER}.{VALID_PAYLOAD}.c2ln",
        f"{VALID_HEADER}.bm90IGpzb24.c2ln",
        f"{VALID_HEADER}.{VALID_PAYLOAD}.!!!!",
        f"{VALID_HEADER}.{VALID_PAYLOAD}.",
        f"{b64url_json({'alg': ['RS256'], 'kid': 'key-1'})}.{VALID_PAYLOAD}.c2ln",
        f"{b64url_json({'alg': 'RS256', 'kid': 5})}.{VALID_PAYLOAD}.c2ln",
        f"{b64url_json({'alg': 'RS256', 'kid': 'key-1', 'b64': False})}.{VALID_PAYLOAD}.c2ln",
        f"\ud800{VALID_HEADER}.{VALID_PAYLOAD}.c2ln",
        f"{VALID_HEADER}.{VALID_PAYLOAD}.c2ln\u00e9",
        f"{VALID_HEADER} .{VALID_PAYLOAD}.c2ln",
    ],
    ids=["empty", "two_segments", "four_segments", "dots_only", "garbage_base64",
         "header_not_json", "header_json_array", "header_not_utf8", "payload_not_json",
         "signature_garbage", "signature_empty", "alg_not_string", "kid_not_string",
         "unencoded_payload_header", "lone_surrogate", "non_ascii_signature",
         "space_in_header"],
)
async def test_malformed_token_rejected(jwks: JwksCache, token: str) -> None:
    await assert_rejected(token, jwks)


def sign_raw_payload(key: rsa.RSAPrivateKey, payload: bytes) -> str:
    """Sign payload bytes that json.dumps would not produce, with RS256 and kid key-1."""
    header = b64url_json({"alg": "RS256", "kid": "key-1"})
    signing_input = f"{header}.{b64url(payload)}"
    signature = jwt.get_algorithm_by_name("RS256").sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64url(signature)}"


@pytest.mark.parametrize(
    "payload",
    [
        b'["not", "an", "object"]',
        json.dumps(make_claims(exp=0)).replace('"exp": 0', '"exp": ' + "9" * 5000).encode(),
        b"\xff\xfe",
    ],
    ids=["json_array", "exp_with_5000_digits", "not_utf8"],
)
async def test_signed_malformed_payload_rejected(
    jwks: JwksCache, signing_key: rsa.RSAPrivateKey, payload: bytes
) -> None:
    token = sign_raw_payload(signing_key, payload)

    await assert_rejected(token, jwks)
