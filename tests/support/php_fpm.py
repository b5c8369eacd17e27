"""Run Debian's PHP-FPM for the end-to-end tests, on a unix socket in a temporary directory.

PHP-FPM runs in the foreground (``-F``) with a pool config written here and
without any php.ini (``-n``), so the machine's PHP settings do not change what
the tests see. It is stopped by its PID like the other test servers.
"""

from __future__ import annotations

import contextlib
import glob
import grp
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .processes import STARTUP_TIMEOUT_SECONDS, read_tail, stop_process

# sun_path has room for 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107
TCP_LISTEN_STATE = "0A"


def php_fpm_binary() -> str:
    """The php-fpm executable; RuntimeError naming the package if there is none."""
    found = shutil.which("php-fpm") or next(
        iter(sorted(glob.glob("/usr/sbin/php-fpm*"), reverse=True)), None
    )
    if found is None or not os.access(found, os.X_OK):
        raise RuntimeError(
            "php-fpm not found on PATH or in /usr/sbin: install it with "
            "`apt-get install php-fpm` (scripts/test.sh does that when it is missing)"
        )
    return found


@dataclass
class RunningPhpFpm:
    """A started PHP-FPM master: its process, its socket and its log files."""

    process: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path
    error_log_path: Path

    def log_tail(self) -> str:
        return read_tail(self.error_log_path) + "\n" + read_tail(self.log_path)


def _pool_user_lines() -> str:
    # As root, PHP-FPM needs a pool user (and -R to accept root): the test's
    # temporary directories are readable by their owner only.
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user = {user}\ngroup = {group}\n"


def write_pool_config(directory: Path) -> tuple[Path, Path]:
    """Write php-fpm.conf with one pool listening on ``directory``/php-fpm.sock."""
    socket_path = directory / "php-fpm.sock"
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH_BYTES:
        raise RuntimeError(f"socket path {socket_path} is longer than a unix socket allows")
    config = directory / "php-fpm.conf"
    config.write_text(
        "[global]\n"
        f"pid = {directory / 'php-fpm.pid'}\n"
        f"error_log = {directory / 'php-fpm-error.log'}\n"
        "daemonize = no\n"
        "\n[moko]\n"
        f"{_pool_user_lines()}"
        f"listen = {socket_path}\n"
        "listen.mode = 0600\n"
        "pm = static\n"
        "pm.max_children = 2\n"
        "clear_env = yes\n"
        "catch_workers_output = yes\n"
        "security.limit_extensions = .php\n",
        encoding="utf-8",
    )
    return config, socket_path


def _socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _wait_until_ready(running: RunningPhpFpm, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exit_code = running.process.poll()
        if exit_code is not None:
            raise RuntimeError(f"php-fpm exited with code {exit_code} before it was ready:\n"
                               f"{running.log_tail()}")
        if running.socket_path.exists() and _socket_accepts(running.socket_path):
            return
        time.sleep(0.05)
    raise RuntimeError(f"php-fpm did not accept connections on {running.socket_path} within "
                       f"{timeout:.0f} s:\n{running.log_tail()}")


@contextlib.contextmanager
def run_php_fpm(directory: Path) -> Iterator[RunningPhpFpm]:
    """Run PHP-FPM until the block ends; ready once its socket accepts connections."""
    directory.mkdir(parents=True, exist_ok=True)
    config, socket_path = write_pool_config(directory)
    command = [php_fpm_binary(), "-F", "-n", "-y", str(config)]
    if os.geteuid() == 0:
        command.append("-R")
    log_path = directory / "php-fpm.out"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    running = RunningPhpFpm(process, socket_path, log_path, directory / "php-fpm-error.log")
    try:
        _wait_until_ready(running, STARTUP_TIMEOUT_SECONDS)
        yield running
    finally:
        stop_process(process)


def listening_tcp_ports(pid: int) -> list[int]:
    """The TCP ports that process ``pid`` listens on, from /proc (Linux only)."""
    inodes = set()
    for link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in (Path(f"/proc/{pid}/net/tcp"), Path(f"/proc/{pid}/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text(encoding="ascii").splitlines()[1:]:
            fields = line.split()
            local_address, state, inode = fields[1], fields[3], fields[9]
            if state == TCP_LISTEN_STATE and inode in inodes:
                ports.append(int(local_address.rsplit(":", 1)[1], 16))
    return ports
