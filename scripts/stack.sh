#!/usr/bin/env bash
# The local stack without Docker: a private PostgreSQL (wal_level = logical), Redis and
# ClickHouse on loopback at the default ports of engagement-cdc.toml, all data under ./.stack/.
#
#   scripts/stack.sh up       install what is missing, start the servers, apply migrations/postgres/
#   scripts/stack.sh install  only install what is missing (the tests need the same servers,
#                             and chdb-core in .venv/ for their modern ClickHouse)
#   scripts/stack.sh status   show each server
#   scripts/stack.sh down     stop exactly the processes `up` started
#
# Ports can be changed with STACK_PG_PORT, STACK_REDIS_PORT, STACK_CH_HTTP_PORT, STACK_CH_TCP_PORT
# (then set the matching ENGAGEMENT_CDC__… variables for the engine).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${STACK_DIR:-$ROOT/.stack}"
PG_PORT="${STACK_PG_PORT:-55432}"
REDIS_PORT="${STACK_REDIS_PORT:-56379}"
CH_HTTP_PORT="${STACK_CH_HTTP_PORT:-58123}"
CH_TCP_PORT="${STACK_CH_TCP_PORT:-59000}"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_DB=engagement

say() { printf '%s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

# Run a command as the postgres user when we are root (the server refuses root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(head -n1 "$1")" 2>/dev/null; }

need_port_free() { # port, name, pidfile
  if port_open "$1" && ! pid_alive "$3"; then
    die "port $1 (for $2) is already in use by another process; stop it, or choose another port with the STACK_* variables"
  fi
}

install_missing() {
  local missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v clickhouse-server >/dev/null || missing+=(clickhouse-server)
  command -v clickhouse-client >/dev/null || missing+=(clickhouse-client)
  # ZooKeeper coordinates the ClickHouse cluster of the tests (tests/support/clickhouse.rs).
  [ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
  # The dashboard test drives a headless browser.
  command -v chromium >/dev/null || missing+=(chromium)
  [ -x "$PG_BIN/postgres" ] || missing+=(postgresql-15)
  # The demo and the readiness checks ask over HTTP.
  command -v curl >/dev/null || missing+=(curl)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    die "missing ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}"
  fi
  say "installing ${missing[*]} from Debian's packages"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The tests' modern ClickHouse engine: chdb-core (ClickHouse 26.x in-process, from PyPI)
# in a virtualenv of the project, behind tests/support/chdb_http.py (docs/testing.md).
CHDB_VERSION=26.9.0
install_python() {
  local venv="$ROOT/.venv"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import chdb" 2>/dev/null \
    && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("chdb-core"))')" = "$CHDB_VERSION" ]; then
    return 0
  fi
  command -v python3 >/dev/null || die "python3 is missing; install it (Debian: apt-get install -y python3 python3-venv)"
  say "installing chdb-core $CHDB_VERSION into $venv"
  python3 -m venv "$venv" || die "cannot create a virtualenv at $venv (Debian: apt-get install -y python3-venv)"
  "$venv/bin/pip" install -q --disable-pip-version-check "chdb-core==$CHDB_VERSION" \
    || die "pip could not install chdb-core==$CHDB_VERSION into $venv"
}

pg_up() {
  local data="$STACK/pg/data" sock="$STACK/pg/sock"
  if as_pg "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    say "postgres   already running on 127.0.0.1:$PG_PORT"
    return 0
  fi
  need_port_free "$PG_PORT" postgres "$data/postmaster.pid"
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$STACK/pg"
    [ "$(id -u)" = 0 ] && chown postgres: "$STACK/pg"
    as_pg "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$STACK/pg/initdb.log" 2>&1 \
      || die "initdb failed; see $STACK/pg/initdb.log"
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$sock'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
fsync = on
timezone = 'UTC'
EOF
  fi
  mkdir -p "$sock"
  [ "$(id -u)" = 0 ] && chown postgres: "$sock"
  as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$STACK/pg/postgres.log" -w -t 30 start >/dev/null \
    || die "postgres did not start; see $STACK/pg/postgres.log"
  if ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'" postgres | grep -q 1; then
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE $PG_DB" postgres
  fi
  for f in "$ROOT"/migrations/postgres/*.sql; do
    PGOPTIONS="-c client_min_messages=warning" \
      psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$PG_DB" -v ON_ERROR_STOP=1 -q -f "$f" >/dev/null
  done
  say "postgres   started on 127.0.0.1:$PG_PORT (database $PG_DB, wal_level = logical)"
}

redis_up() {
  local pidfile="$STACK/redis/redis.pid"
  if pid_alive "$pidfile"; then say "redis      already running on 127.0.0.1:$REDIS_PORT"; return 0; fi
  need_port_free "$REDIS_PORT" redis "$pidfile"
  mkdir -p "$STACK/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --pidfile "$pidfile" \
    --dir "$STACK/redis" --logfile "$STACK/redis/redis.log" --save "" \
    --appendonly yes --appendfsync everysec >/dev/null
  for _ in $(seq 1 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "redis did not start; see $STACK/redis/redis.log"
  say "redis      started on 127.0.0.1:$REDIS_PORT"
}

clickhouse_up() {
  local dir="$STACK/clickhouse" pidfile="$STACK/clickhouse/clickhouse.pid"
  if pid_alive "$pidfile"; then say "clickhouse already running on 127.0.0.1:$CH_HTTP_PORT"; return 0; fi
  need_port_free "$CH_HTTP_PORT" "clickhouse http" "$pidfile"
  need_port_free "$CH_TCP_PORT" "clickhouse tcp" "$pidfile"
  mkdir -p "$dir/log" "$dir/data" "$dir/tmp"
  sed -e "s#@DIR@#$dir#g; s#@HTTP_PORT@#$CH_HTTP_PORT#g; s#@TCP_PORT@#$CH_TCP_PORT#g" \
    "$ROOT/scripts/clickhouse/config.xml" >"$dir/config.xml"
  cp "$ROOT/scripts/clickhouse/users.xml" "$dir/users.xml"
  clickhouse-server --config-file="$dir/config.xml" --pid-file="$pidfile" --daemon
  for _ in $(seq 1 200); do
    [ "$(curl -s "http://127.0.0.1:$CH_HTTP_PORT/ping" 2>/dev/null)" = "Ok." ] && break
    sleep 0.05
  done
  [ "$(curl -s "http://127.0.0.1:$CH_HTTP_PORT/ping" 2>/dev/null)" = "Ok." ] \
    || die "clickhouse did not start; see $dir/log/clickhouse-server.err.log"
  say "clickhouse started on 127.0.0.1:$CH_HTTP_PORT (http), $CH_TCP_PORT (native)"
}

status() {
  local rc=0
  if as_pg "$PG_BIN/pg_ctl" -D "$STACK/pg/data" status >/dev/null 2>&1; then
    say "postgres   running  127.0.0.1:$PG_PORT  pid $(head -n1 "$STACK/pg/data/postmaster.pid")"
  else say "postgres   stopped"; rc=3; fi
  if pid_alive "$STACK/redis/redis.pid"; then
    say "redis      running  127.0.0.1:$REDIS_PORT  pid $(cat "$STACK/redis/redis.pid")"
  else say "redis      stopped"; rc=3; fi
  if pid_alive "$STACK/clickhouse/clickhouse.pid"; then
    say "clickhouse running  127.0.0.1:$CH_HTTP_PORT  pid $(cat "$STACK/clickhouse/clickhouse.pid")"
  else say "clickhouse stopped"; rc=3; fi
  return $rc
}

down() {
  if as_pg "$PG_BIN/pg_ctl" -D "$STACK/pg/data" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$STACK/pg/data" -m fast -w stop >/dev/null && say "postgres   stopped"
  fi
  local f
  for f in "$STACK/redis/redis.pid" "$STACK/clickhouse/clickhouse.pid"; do
    if pid_alive "$f"; then
      local pid name
      pid="$(head -n1 "$f")"
      name="$(basename "$(dirname "$f")")"
      kill "$pid"
      for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      rm -f "$f"
      printf '%-10s stopped\n' "$name"
    fi
  done
  return 0
}

case "${1:-}" in
  up)
    mkdir -p "$STACK"
    install_missing
    pg_up
    redis_up
    clickhouse_up
    ;;
  install) install_missing; install_python ;;
  status) status ;;
  down) down ;;
  *) say "usage: scripts/stack.sh up|install|status|down"; exit 2 ;;
esac
