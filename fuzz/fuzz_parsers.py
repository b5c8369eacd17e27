"""Fuzz the parsers that read client input: the session cookie opener and the redirect check.

Runs outside the test suite, for far more inputs than tests/test_properties.py
and tests/test_redirects.py try. Examples (fuzz/README.md has more):

    python fuzz/fuzz_parsers.py --examples 200000
    python fuzz/fuzz_parsers.py --engine hypothesis --target redirect --seconds 300
    python fuzz/fuzz_parsers.py --engine atheris --seconds 600 -- -jobs=2

Each input must keep these invariants:

* cookie: ``Sealer.open`` raises only ``SealError``, ``SessionManager.check``
  never raises, and neither accepts any value except the bytes of the one
  genuine cookie that seeds the run;
* redirect: ``check_redirect`` returns the input or "/", and an accepted
  target has no backslash or control character in any of three
  percent-decodings and leads a browser to the CRM's host or an allowed one.

The exit code is 0 when every input kept them. A failure exits with 1 under
hypothesis and with libFuzzer's 77 under atheris, which also writes the
failing input into the folder it prints at start.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

ROOT = Path(__file__).resolve().parent.parent
REDIRECT_CORPUS = ROOT / "tests" / "data" / "open_redirects.txt"
SECRET = "fuzz-session-secret-0123456789abcdefghijkl"
PUBLIC_HOST = "crm.example.com"
SESSION_PAYLOAD = {"sid": "fuzz-session-0001", "uid": 7, "usr": "alice@example.com",
                   "eml": "alice@example.com", "rol": ["user"], "prv": "idp", "pun": "alice",
                   "iat": 1_700_000_000, "exp": 4_000_000_000}
HYPOTHESIS_BATCH = 10_000


class FuzzTargets:
    """The functions under test and the invariants each input must keep."""

    def __init__(self, redirects: ModuleType, sealing: ModuleType, sessions: ModuleType,
                 store: ModuleType) -> None:
        self.check_redirect = redirects.check_redirect
        self.policy = redirects.RedirectPolicy(
            public_host=PUBLIC_HOST, public_port=443,
            allowed_hosts=(".example.com", "reports.example.org"), allow_http=False,
        )
        self.seal_error = sealing.SealError
        self.sealer = sealing.Sealer([SECRET])
        self.purpose = sessions.SESSION_PURPOSE
        # SessionManager.check does no I/O, so the store is never opened.
        self.sessions = sessions.SessionManager([SECRET], store.Store("sqlite:///:memory:"),
                                                lifetime=3600)
        self.genuine_cookie = self.sealer.seal(SESSION_PAYLOAD, self.purpose)

    def cookie(self, value: str) -> None:
        try:
            payload = self.sealer.open(value, self.purpose)
        except self.seal_error:
            payload = None
        check = self.sessions.check(value)
        if payload is None and check.principal is None:
            return
        # Only the genuine cookie opens; the unused low bits of its last base64url
        # character allow a few spellings of the same bytes.
        assert payload == SESSION_PAYLOAD, f"opened a forged cookie: {value!r}"
        assert base64url_bytes(value) == base64url_bytes(self.genuine_cookie), repr(value)

    def redirect(self, value: str) -> None:
        result = self.check_redirect(value, self.policy)
        if result.rejected or value == "":
            assert result.target == "/", f"rejected {value!r} but target is {result.target!r}"
            return
        assert result.target == value, f"accepted {value!r} as {result.target!r}"
        for form in percent_decodings(value):
            assert "\\" not in form, f"accepted {value!r} with a backslash in {form!r}"
            assert not any(unicodedata.category(char) == "Cc" for char in form), repr(value)
        host = browser_host(value)
        assert host is not None and is_allowed_host(host), f"accepted {value!r} leads to {host!r}"
        if not value.startswith("/"):
            parts = urlsplit(value)
            assert parts.scheme.lower() == "https", repr(value)
            assert parts.username is None, repr(value)
            assert parts.port in (None, 443), repr(value)


def load_targets() -> FuzzTargets:
    from moko_guard import redirects, sealing, sessions, store

    return FuzzTargets(redirects, sealing, sessions, store)


def base64url_bytes(value: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except ValueError:
        return None


def percent_decodings(value: str) -> list[str]:
    forms = [value]
    for _ in range(3):
        forms.append(unquote(forms[-1]))
    return forms


def is_allowed_host(host: str) -> bool:
    return (host in (PUBLIC_HOST, "example.com", "reports.example.org")
            or host.endswith(".example.com"))


def browser_host(location: str, base: str = f"https://{PUBLIC_HOST}/") -> str | None:
    """Return the host a browser opens when it follows ``location`` from the page ``base``.

    It applies the steps of the WHATWG URL parser that open redirects rely on.
    Leading and trailing C0 controls and spaces are stripped, and tab, CR and LF
    are removed anywhere. ``\\`` counts as ``/``. An http(s) scheme other than
    the base's needs no ``//`` before its host.
    """
    cleaned = location.strip("".join(chr(code) for code in range(0x21)))
    cleaned = re.sub(r"[\t\r\n]", "", cleaned).replace("\\", "/")
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", cleaned)
    base_scheme = urlsplit(base).scheme
    if match and match.group(1).lower() in ("http", "https") \
            and match.group(1).lower() != base_scheme:
        return urlsplit(f"{match.group(1)}://{match.group(2).lstrip('/')}").hostname
    try:
        return urlsplit(urljoin(base, cleaned)).hostname
    except ValueError:
        return None


def redirect_seeds() -> list[str]:
    text = REDIRECT_CORPUS.read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line and not line.startswith("#")]


# --- hypothesis ---------------------------------------------------------------------------


def run_hypothesis(targets: FuzzTargets, names: list[str], examples: int,
                   seconds: float | None) -> int:
    from hypothesis import strategies as st

    base64url = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    genuine = targets.genuine_cookie
    strategies: dict[str, Any] = {
        "cookie": st.one_of(
            st.text(max_size=400),
            st.text(alphabet=base64url, max_size=400),
            st.builds(lambda position, char: genuine[:position] + char + genuine[position + 1:],
                      st.integers(0, len(genuine) - 1), st.sampled_from(base64url)),
            st.builds(lambda cut, extra: genuine[:cut] + extra,
                      st.integers(0, len(genuine)), st.text(alphabet=base64url, max_size=8)),
        ),
        "redirect": st.one_of(
            st.text(max_size=200),
            st.sampled_from(redirect_seeds()),
            st.builds(lambda seed, extra: seed + extra, st.sampled_from(redirect_seeds()),
                      st.text(max_size=20)),
            st.lists(st.sampled_from(["/", "//", "\\", ".", "..", "%2F", "%5C", "%2e", "%25",
                                      "%09", "%0a", "https:", "https://", "@", ":443", ":8443",
                                      "crm.example.com", "ops.example.com", "evil.example", "#",
                                      "?", "\t", " ", "\u3002", "%E3%80%82"]),
                     max_size=10).map("".join),
        ),
    }
    started = time.monotonic()
    done = 0
    while done < examples and (seconds is None or time.monotonic() - started < seconds):
        batch = min(HYPOTHESIS_BATCH, examples - done)
        for name in names:
            property_holds = _property(getattr(targets, name), strategies[name], batch)
            try:
                property_holds()
            except AssertionError as error:
                print(f"FAILED {name}: {error}", file=sys.stderr)
                return 1
        done += batch
        print(f"{done} examples per target, {time.monotonic() - started:.0f} s, no failure",
              flush=True)
    return 0


def _property(check: Callable[[str], None], strategy: Any, examples: int) -> Callable[[], None]:
    """Wrap ``check`` in a Hypothesis test that draws ``examples`` inputs from ``strategy``."""
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(value=strategy)
    def property_holds(value: str) -> None:
        check(value)

    result: Callable[[], None] = property_holds
    return result


# --- atheris --------------------------------------------------------------------------------


def run_atheris(names: list[str], examples: int, seconds: float | None,
                libfuzzer_args: list[str]) -> int:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    with atheris.instrument_imports(include=["moko_guard"]):
        targets = load_targets()

    workdir = Path(tempfile.mkdtemp(prefix="moko-guard-fuzz-"))
    corpus = workdir / "corpus"
    corpus.mkdir()
    seeds = [("cookie", targets.genuine_cookie), *(("redirect", seed) for seed in redirect_seeds())]
    for index, (name, seed) in enumerate(seed for seed in seeds if seed[0] in names):
        selector = bytes([names.index(name)]) if len(names) > 1 else b""
        (corpus / f"seed-{index:04d}").write_bytes(selector + seed.encode("utf-8"))
    print(f"atheris: corpus and failing inputs go to {workdir}", flush=True)

    def test_one_input(data: bytes) -> None:
        # The first byte picks the target when several run, so one corpus serves both.
        name = names[data[0] % len(names)] if data and len(names) > 1 else names[0]
        body = data[1:] if len(names) > 1 else data
        if name == "cookie":
            targets.cookie(body.decode("latin-1"))
        else:
            targets.redirect(body.decode("utf-8", "replace"))

    argv = [sys.argv[0], f"-runs={examples}", f"-artifact_prefix={workdir}/", *libfuzzer_args]
    if not any(not argument.startswith("-") for argument in libfuzzer_args):
        # No input file to replay was given, so fuzz from the seed corpus.
        argv.append(str(corpus))
    if seconds is not None:
        argv.insert(2, f"-max_total_time={int(seconds)}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    return 0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fuzz moko_guard's session cookie opener and redirect check.",
        epilog="Arguments after -- go to libFuzzer (atheris engine only).",
    )
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto",
                        help="atheris when it is installed (auto), or hypothesis")
    parser.add_argument("--target", choices=["cookie", "redirect", "all"], default="all",
                        help="which parser to fuzz (default: both)")
    parser.add_argument("--examples", type=int, default=100_000,
                        help="inputs per target (hypothesis) or in total (atheris)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="stop after this many seconds even if examples remain")
    own, _, libfuzzer = _split_at_double_dash(argv)
    arguments = parser.parse_args(own)
    arguments.libfuzzer = libfuzzer
    if arguments.examples < 1:
        parser.error("--examples must be at least 1")
    return arguments


def _split_at_double_dash(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" in argv:
        index = argv.index("--")
        return argv[:index], "--", argv[index + 1:]
    return argv, "", []


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    names = ["cookie", "redirect"] if arguments.target == "all" else [arguments.target]
    engine = arguments.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") is not None else "hypothesis"
    print(f"fuzzing {', '.join(names)} with {engine}", flush=True)
    if engine == "atheris":
        return run_atheris(names, arguments.examples, arguments.seconds, arguments.libfuzzer)
    if arguments.libfuzzer:
        print("arguments after -- are for atheris and are ignored by hypothesis", file=sys.stderr)
    return run_hypothesis(load_targets(), names, arguments.examples, arguments.seconds)


if __name__ == "__main__":
    sys.exit(main())
