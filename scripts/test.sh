#!/usr/bin/env bash
# Install what the test suite needs on a fresh Debian machine, then run it.
#
# Installs only what is missing: Debian's nginx, chromium and php-fpm (for the
# end-to-end, browser and Dolibarr recipe tests), the npm package oidc-provider (the real
# OpenID Connect provider the end-to-end tests sign in against), and this
# package with its test extras. Extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v php-fpm >/dev/null 2>&1 || compgen -G '/usr/sbin/php-fpm*' >/dev/null || missing+=(php-fpm)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  # RUNLEVEL=1 keeps the package scripts from starting a system nginx on port 80.
  $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The store tests also run against PostgreSQL on 127.0.0.1:5432 (trust auth,
# database "test"); start the local cluster when it is installed but down.
if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
  fi
fi

if [ ! -d tests/oidc/node_modules/oidc-provider ]; then
  npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error
fi

python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'

# The security modules must keep 100% line and branch coverage. The data goes to a
# directory of this run only: pytest-cov combines every .coverage.* file next to its
# data file, so a shared one would mix in files of other runs in this checkout.
# Servers that the end-to-end tests start in subprocesses are not measured.
SECURITY_MODULES="moko_guard/redirects.py,moko_guard/flow.py,moko_guard/sessions.py"
SECURITY_MODULES+=",moko_guard/sealing.py,moko_guard/tokens.py,moko_guard/logout.py"
SECURITY_MODULES+=",moko_guard/headers.py,moko_guard/paths.py,moko_guard/forwarding.py"
coverage_dir="$(mktemp -d)"
trap 'rm -rf "$coverage_dir"' EXIT
export COVERAGE_FILE="$coverage_dir/.coverage"

set +e
python3 -m pytest --cov=moko_guard --cov-branch --cov-report= "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no tests; the suite must not pass empty" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  exit "$status"
fi

if ! python3 -m coverage report --fail-under=100 --show-missing --skip-covered \
    --include="$SECURITY_MODULES"; then
  echo "error: the security modules are below 100% line and branch coverage;" \
    "add tests for the lines and branches listed above" >&2
  exit 1
fi
