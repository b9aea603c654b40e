#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster for the tests on a free loopback port.
# Usage: eval "$(bash scripts/pg_test_server.sh start)"  -> exports QCNODE_TEST_PG_URL, QCNODE_TEST_PG_DIR
#        bash scripts/pg_test_server.sh stop DIR
set -euo pipefail
cmd=${1:-start}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ]; then echo "echo '[pg] PostgreSQL not installed: PostgreSQL tests will be skipped' >&2"; exit 0; fi
run_as() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$cmd" = stop ]; then
  dir=${2:?dir}
  run_as "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
  rm -rf "$dir"
  exit 0
fi
dir=$(mktemp -d /tmp/qcnode-pg.XXXXXX)
chmod 755 "$dir"
[ "$(id -u)" = 0 ] && chown postgres "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
run_as "$bin/initdb" -D "$dir/data" -U qcnode --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1
run_as "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null
run_as "$bin/createdb" -h 127.0.0.1 -p "$port" -U qcnode qcnode_test
echo "export QCNODE_TEST_PG_URL=postgresql+psycopg2://qcnode@127.0.0.1:$port/qcnode_test QCNODE_TEST_PG_DIR=$dir"
echo "echo '[pg] test server on 127.0.0.1:$port' >&2"
