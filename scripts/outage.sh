#!/usr/bin/env bash
# ClickHouse away under steady load (docs/guarantees.md, "ClickHouse away for 3 minutes"):
# 1,000 events/s over 1,000 content ids while ClickHouse is stopped for N seconds, with the
# journal on and off; the slot's retained WAL and lag, the journal and ClickHouse's backlog
# every second, Redis and API latency during the outage, the drain, exact counts after.
#   scripts/outage.sh [--seconds 180] [--rate 1000]
# Reports are printed and kept in docs/bench-output/outage-<date>-<seconds>s-journal-{on,off}.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=180
rate=1000
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="${2:?--seconds needs a number}"; shift 2 ;;
    --rate) rate="${2:?--rate needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; use --seconds N [--rate N]" >&2; exit 2 ;;
  esac
done
for v in "$seconds" "$rate"; do
  case "$v" in
    ''|*[!0-9]*) echo "error: $v is not a whole number" >&2; exit 2 ;;
  esac
done
scripts/stack.sh install
mkdir -p docs/bench-output
for journal in on off; do
  out="docs/bench-output/outage-$(date -u +%Y-%m-%d)-${seconds}s-journal-${journal}.txt"
  report=$(mktemp)
  {
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet -- . ':!docs/bench-output' || echo ' (with local changes)')"
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(uname -sr)"
    echo "command: scripts/outage.sh --seconds $seconds --rate $rate (journal $journal)"
  } > "$out"
  OUTAGE_SECONDS="$seconds" OUTAGE_RATE="$rate" OUTAGE_JOURNAL="$journal" OUTAGE_REPORT="$report" \
    cargo test --locked --test soak -- --nocapture --test-threads 1 clickhouse_outage_under_steady_load
  cat "$report" >> "$out"
  rm -f "$report"
  echo "report kept in $out"
done
