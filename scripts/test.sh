#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the tools the tests use (promtool, Alertmanager, curl, python3,
# unshare, PostgreSQL), finds or starts a PostgreSQL for the database tests, then runs every test with cargo-nextest.
#
# PostgreSQL: DATABASE_URL if set; else the local server on 127.0.0.1:5432 if it answers; else a throwaway
# cluster started here (and stopped on exit).
set -euo pipefail
cd "$(dirname "$0")/.."

need_packages=()
command -v promtool >/dev/null || need_packages+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need_packages+=(prometheus-alertmanager)
command -v curl >/dev/null || need_packages+=(curl)
command -v unshare >/dev/null || need_packages+=(util-linux)
command -v ip >/dev/null || need_packages+=(iproute2)
command -v psql >/dev/null || need_packages+=(postgresql-client)
command -v python3 >/dev/null || need_packages+=(python3)  # the README drill's webhook receiver
if [ -z "${DATABASE_URL:-}" ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_packages+=(postgresql)
fi
if [ "${#need_packages[@]}" -gt 0 ]; then
  echo "test.sh: installing ${need_packages[*]}" >&2
  if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
  "${apt_get[@]}" update -qq
  DEBIAN_FRONTEND=noninteractive "${apt_get[@]}" install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
fi

if [ -z "${DATABASE_URL:-}" ]; then
  if psql "postgres://postgres@127.0.0.1:5432/postgres" -Atqc 'select 1' >/dev/null 2>&1; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
  else
    eval "$(scripts/pgtmp.sh up)"
    trap 'scripts/pgtmp.sh down "$PGTMP_DIR"' EXIT
  fi
fi
echo "test.sh: PostgreSQL at ${DATABASE_URL%%\?*}" >&2

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast "$@"
else
  cargo test --all-targets --no-fail-fast "$@"
fi
