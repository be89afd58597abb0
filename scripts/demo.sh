#!/usr/bin/env bash
# The demo, from a fresh clone: bring up the local stack, build, start the mock API, set up,
# start the engine, load events for a while, then show what a user looks at.
#
#   scripts/demo.sh          run the demo (leaves everything running)
#   scripts/demo.sh stop     stop the engine and the mock API (then: scripts/stack.sh down)
#
# DEMO_RATE (default 1000 events/s) and DEMO_SECONDS (default 15) shape the load;
# ENGAGEMENT_CDC_BIN runs that binary instead of building target/release/engagement-cdc.
# The ports are engagement-cdc.toml's; STACK_PG_PORT, STACK_REDIS_PORT, STACK_CH_HTTP_PORT,
# STACK_CH_TCP_PORT (as for scripts/stack.sh), DEMO_API_PORT and DEMO_SERVER_PORT move
# them, and the engine is told through its ENGAGEMENT_CDC__… variables.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STACK="$ROOT/.stack"
BIN="${ENGAGEMENT_CDC_BIN:-$ROOT/target/release/engagement-cdc}"
RATE="${DEMO_RATE:-1000}"
SECONDS_="${DEMO_SECONDS:-15}"
export STACK_PG_PORT="${STACK_PG_PORT:-55432}" STACK_REDIS_PORT="${STACK_REDIS_PORT:-56379}"
export STACK_CH_HTTP_PORT="${STACK_CH_HTTP_PORT:-58123}" STACK_CH_TCP_PORT="${STACK_CH_TCP_PORT:-59000}"
API_PORT="${DEMO_API_PORT:-58000}"
SERVER_PORT="${DEMO_SERVER_PORT:-59187}"
export ENGAGEMENT_CDC__POSTGRES__URL="postgres://postgres@127.0.0.1:$STACK_PG_PORT/engagement"
export ENGAGEMENT_CDC__CLICKHOUSE__URL="http://127.0.0.1:$STACK_CH_HTTP_PORT"
export ENGAGEMENT_CDC__REDIS__URL="redis://127.0.0.1:$STACK_REDIS_PORT"
export ENGAGEMENT_CDC__HTTP__URL="http://127.0.0.1:$API_PORT/events"
export ENGAGEMENT_CDC__SERVER__LISTEN="127.0.0.1:$SERVER_PORT"
PSQL=(psql -h 127.0.0.1 -p "$STACK_PG_PORT" -U postgres -d engagement -Atq)
CH=(clickhouse-client --port "$STACK_CH_TCP_PORT" -q)
REDIS=(redis-cli -p "$STACK_REDIS_PORT")

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  local f
  for f in "$STACK/engine.pid" "$STACK/mock-api.pid"; do
    if pid_alive "$f"; then
      kill "$(cat "$f")"
      for _ in $(seq 1 300); do pid_alive "$f" || break; sleep 0.1; done
      echo "stopped $(basename "$f" .pid)"
    fi
    rm -f "$f"
  done
}

# Poll until a command succeeds, or fail naming what was awaited.
wait_until() { # seconds, description, command...
  local limit="$1" what="$2"
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "demo: timed out after ${limit}s waiting for $what" >&2
      exit 1
    fi
    sleep 0.2
  done
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
fi

echo "== local stack"
scripts/stack.sh up

if [ -z "${ENGAGEMENT_CDC_BIN:-}" ]; then
  echo "== build (release)"
  cargo build --release --locked --quiet
fi

# The mock API first: setup checks that every enabled sink answers, the API too.
echo "== mock API"
mkdir -p "$STACK"
if ! pid_alive "$STACK/mock-api.pid"; then
  nohup "$BIN" mock-api --listen "127.0.0.1:$API_PORT" >"$STACK/mock-api.log" 2>&1 &
  echo $! >"$STACK/mock-api.pid"
fi
wait_until 20 "the mock API" curl -sf "http://127.0.0.1:$API_PORT/stats"

echo "== setup"
"$BIN" setup

echo "== engine"
if ! pid_alive "$STACK/engine.pid"; then
  nohup "$BIN" run >"$STACK/engine.log" 2>&1 &
  echo $! >"$STACK/engine.pid"
fi
wait_until 30 "the engine to stream (see .stack/engine.log)" curl -sf "http://127.0.0.1:$SERVER_PORT/readyz"
echo "mock API on :$API_PORT (log .stack/mock-api.log), engine on :$SERVER_PORT (log .stack/engine.log)"

redis_total() {
  local sum=0 v
  for v in $("${REDIS[@]}" --scan --pattern 'content:count:*' | xargs -r "${REDIS[@]}" MGET); do
    sum=$((sum + v))
  done
  echo "$sum"
}
api_unique() { curl -sf "http://127.0.0.1:$API_PORT/stats" | sed -E 's/.*"unique_event_ids":([0-9]+).*/\1/'; }
echo "== load: $RATE events/s for ${SECONDS_}s"
PG_BEFORE="$("${PSQL[@]}" -c 'SELECT count(*) FROM engagement_events')"
API_BEFORE="$(api_unique)"
"$BIN" load --rate "$RATE" --duration "${SECONDS_}s"

# The mock API counts only what it received since it started; Postgres, ClickHouse and
# Redis keep everything. So: every event in ClickHouse and Redis, and every event loaded now
# at the API.
all_caught_up() {
  local pg ch
  pg="$("${PSQL[@]}" -c 'SELECT count(*) FROM engagement_events')"
  ch="$("${CH[@]}" 'SELECT count() FROM engagement.events_enriched FINAL')"
  [ "$pg" = "$ch" ] && [ "$pg" = "$(redis_total)" ] &&
    [ $(($(api_unique) - API_BEFORE)) -ge $((pg - PG_BEFORE)) ]
}
wait_until 120 "every sink to hold every event" all_caught_up

echo
PG_NOW="$("${PSQL[@]}" -c 'SELECT count(*) FROM engagement_events')"
echo "== events: Postgres $PG_NOW, ClickHouse $("${CH[@]}" 'SELECT count() FROM engagement.events_enriched FINAL'), Redis $(redis_total)"
echo "   this run loaded $((PG_NOW - PG_BEFORE)); the API received $(($(api_unique) - API_BEFORE)) of them ($(api_unique) since it started)"
echo
echo "== top 10 content of the last 10 minutes (redis-cli ZREVRANGE top:content:10m 0 9 WITHSCORES)"
"${REDIS[@]}" ZREVRANGE top:content:10m 0 9 WITHSCORES | paste - -
echo
echo "== the seed's ClickHouse query (first 10 contents)"
"${CH[@]}" 'SELECT content_id, avg(engagement_pct) FROM engagement.events_enriched GROUP BY content_id ORDER BY content_id LIMIT 10'
echo
echo "== the API's /stats"
curl -s "http://127.0.0.1:$API_PORT/stats"
echo
echo
echo "== engagement-cdc status"
# status exits 1 when something needs attention (docs/operations.md, "Monitoring"); the
# demo shows it either way.
"$BIN" status || echo "(status exited $?: see the unhealthy line above)"
echo
echo "Everything is still running. Insert more with: $BIN load --rate 1000 --duration 30s"
echo "Stop with: scripts/demo.sh stop && scripts/stack.sh down"
