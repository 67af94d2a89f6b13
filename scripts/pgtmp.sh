#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests, on a random loopback port with trust authentication.
# usage: eval "$(scripts/pgtmp.sh up)"   exports PGTMP_DIR, PGPORT, DATABASE_URL
#        scripts/pgtmp.sh down "$PGTMP_DIR"
set -euo pipefail
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
case "${1:-}" in
up)
  dir=$(mktemp -d -t pgtmp.XXXXXX)
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir"; fi
  port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust -N -E UTF8 --no-locale >"$dir/initdb.log" 2>&1
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null
  echo "export PGTMP_DIR=$dir PGPORT=$port DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres"
  ;;
down)
  dir=${2:?usage: pgtmp.sh down DIR}
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  rm -rf "$dir"
  ;;
*) echo "usage: $0 up|down DIR" >&2; exit 2 ;;
esac
