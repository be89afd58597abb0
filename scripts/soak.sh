#!/usr/bin/env bash
# The chaos soak (docs/guarantees.md, "Chaos soak"): load plus random faults for N minutes
# against servers of its own on loopback ports, then exact counts in every sink.
#   scripts/soak.sh --minutes 30 [--seed N]
# The report is printed and kept in docs/bench-output/soak-<date>-<minutes>min.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=2
seed=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="${2:?--minutes needs a number}"; shift 2 ;;
    --seed) seed="${2:?--seed needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; use --minutes N [--seed N]" >&2; exit 2 ;;
  esac
done
case "$minutes" in
  ''|*[!0-9.]*) echo "error: --minutes $minutes is not a number" >&2; exit 2 ;;
esac
scripts/stack.sh install
out="docs/bench-output/soak-$(date -u +%Y-%m-%d)-${minutes}min.txt"
mkdir -p docs/bench-output
report=$(mktemp)
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet -- . ':!docs/bench-output' || echo ' (with local changes)')"
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(uname -sr)"
  echo "command: scripts/soak.sh --minutes $minutes${seed:+ --seed $seed}"
} > "$out"
SOAK_MINUTES="$minutes" SOAK_SEED="$seed" SOAK_REPORT="$report" \
  cargo test --locked --test soak -- --nocapture --test-threads 1
cat "$report" >> "$out"
rm -f "$report"
echo "report kept in $out"
cat "$out"
