"""Run Debian's nginx with the shipped template deploy/nginx/moko-guard.conf.

The template is used as operators get it, with only the lines an operator
edits changed: the two upstream addresses, and the TLS listen and certificate
lines, which become one plain-http ``listen`` on 127.0.0.1. Everything nginx
writes (pid, logs, temporary files) goes into a prefix directory of the test.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from .processes import RunningProcess, run_process

REPO_DIR = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_DIR / "deploy" / "nginx" / "moko-guard.conf"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")

# The lines of the template that the tests change, and how often each appears.
GUARD_SERVER_LINE = re.compile(r"^(\s*)server 127\.0\.0\.1:4180;", re.MULTILINE)
CRM_SERVER_LINE = re.compile(r"^(\s*)server 127\.0\.0\.1:8080;", re.MULTILINE)
LISTEN_LINE = re.compile(r"^\s*listen [^\n]*\n", re.MULTILINE)
TLS_LINE = re.compile(r"^\s*ssl_[a-z_]+ [^\n]*\n", re.MULTILINE)


def nginx_binary() -> str:
    """The nginx executable; RuntimeError naming the package if there is none."""
    found = shutil.which("nginx") or next(
        (path for path in NGINX_CANDIDATES if os.access(path, os.X_OK)), None
    )
    if found is None:
        raise RuntimeError(
            "nginx not found on PATH or in /usr/sbin: install it with "
            "`apt-get install nginx` (the tests need its auth_request module)"
        )
    return found


def _replace_once(pattern: re.Pattern[str], replacement: str, text: str, what: str) -> str:
    result, count = pattern.subn(replacement, text)
    if count != 1:
        raise AssertionError(f"expected one {what} line in {TEMPLATE_PATH}, found {count}")
    return result


def render_server_config(template: str, *, listen_port: int, guard_port: int,
                         crm_port: int) -> str:
    """The template with loopback addresses and plain http on ``listen_port``."""
    text = _replace_once(GUARD_SERVER_LINE, rf"\g<1>server 127.0.0.1:{guard_port};", template,
                         "moko-guard upstream")
    text = _replace_once(CRM_SERVER_LINE, rf"\g<1>server 127.0.0.1:{crm_port};", text,
                         "CRM upstream")
    listens = LISTEN_LINE.findall(text)
    if len(listens) != 2 or not all(":443 ssl" in line or " 443 ssl" in line for line in listens):
        raise AssertionError(f"expected two 'listen ... 443 ssl' lines, found {listens}")
    first = True

    def listen(match: re.Match[str]) -> str:
        nonlocal first
        if first:
            first = False
            return f"    listen 127.0.0.1:{listen_port};\n"
        return ""

    text = LISTEN_LINE.sub(listen, text)
    text, tls_lines = TLS_LINE.subn("", text)
    if tls_lines != 2:
        raise AssertionError(f"expected ssl_certificate and ssl_certificate_key, found {tls_lines}")
    return text


def _user_line() -> str:
    # As root, nginx would run its workers as "nobody", who cannot write the
    # test's temporary directories (request bodies are buffered there).
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def render_certificate_paths(template: str, certificate: Path, key: Path) -> str:
    """The template unchanged but for the paths of its TLS certificate and key."""
    text, count = re.subn(r"(?m)^(\s*ssl_certificate)\s+\S+;",
                          lambda m: f"{m.group(1)} {_quoted(certificate)};", template)
    text, key_count = re.subn(r"(?m)^(\s*ssl_certificate_key)\s+\S+;",
                              lambda m: f"{m.group(1)} {_quoted(key)};", text)
    if (count, key_count) != (1, 1):
        raise AssertionError(f"expected one ssl_certificate and one ssl_certificate_key line, "
                             f"found {count} and {key_count}")
    return text


def _quoted(path: Path) -> str:
    text = str(path)
    if '"' in text or "\\" in text:
        raise ValueError(f"path {text!r} cannot be written into an nginx config")
    return f'"{text}"'


def main_config(prefix: Path, server_config_path: Path) -> str:
    """An nginx.conf that keeps every file inside ``prefix`` and includes the server block."""
    temp = prefix / "temp"
    return (
        f"{_user_line()}"
        "worker_processes 1;\n"
        f"pid {_quoted(prefix / 'nginx.pid')};\n"
        f"error_log {_quoted(prefix / 'error.log')} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {_quoted(prefix / 'access.log')};\n"
        f"    client_body_temp_path {_quoted(temp / 'body')};\n"
        f"    proxy_temp_path {_quoted(temp / 'proxy')};\n"
        f"    fastcgi_temp_path {_quoted(temp / 'fastcgi')};\n"
        f"    uwsgi_temp_path {_quoted(temp / 'uwsgi')};\n"
        f"    scgi_temp_path {_quoted(temp / 'scgi')};\n"
        f"    include {_quoted(server_config_path)};\n"
        "}\n"
    )


def write_config(prefix: Path, server_config_text: str) -> Path:
    """Write nginx.conf and ``server_config_text`` into ``prefix``; return nginx.conf."""
    (prefix / "temp").mkdir(parents=True, exist_ok=True)
    server_config = prefix / "moko-guard.conf"
    server_config.write_text(server_config_text, encoding="utf-8")
    conf = prefix / "nginx.conf"
    conf.write_text(main_config(prefix, server_config), encoding="utf-8")
    return conf


def _command(prefix: Path, conf: Path, *extra: str) -> list[str]:
    # -e: the error log before the config is read (Debian's default is stderr).
    return [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
            *extra]


def check_config(prefix: Path, conf: Path) -> str:
    """``nginx -t``: AssertionError with nginx's message if the config is refused."""
    result = subprocess.run(_command(prefix, conf, "-t"), capture_output=True, text=True,
                            timeout=30, check=False, stdin=subprocess.DEVNULL)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        raise AssertionError(f"nginx -t refused {conf}:\n{output}")
    return output


@contextlib.contextmanager
def run_nginx(prefix: Path, *, listen_port: int, guard_port: int,
              crm_port: int) -> Iterator[RunningProcess]:
    """Run nginx in the foreground with the rendered template until the block ends."""
    server_config = render_server_config(TEMPLATE_PATH.read_text(encoding="utf-8"),
                                         listen_port=listen_port, guard_port=guard_port,
                                         crm_port=crm_port)
    conf = write_config(prefix, server_config)
    check_config(prefix, conf)
    with run_process("nginx", _command(prefix, conf, "-g", "daemon off;"), port=listen_port,
                     log_path=prefix / "nginx.out") as running:
        yield running


def _subject_name(host: str) -> object:
    import ipaddress

    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_self_signed_certificate(directory: Path, host: str) -> tuple[Path, Path]:
    """A one-day self-signed certificate for ``host`` (a name or an IP address) and its key.

    The files are ``certificate.pem`` and ``key.pem`` in ``directory``. The
    certificate is its own CA, so it can be given as a trust anchor.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([_subject_name(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    certificate_path = directory / "certificate.pem"
    key_path = directory / "key.pem"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return certificate_path, key_path
