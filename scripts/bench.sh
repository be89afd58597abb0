#!/usr/bin/env bash
# The end-to-end benchmark repeated with the order of the two catch-ups alternating
# (docs/benchmarks.md): run 1 reads with pg_recvlogical first, run 2 with the engine first,
# and so on. Every run's raw output is kept, with the date, machine and commit, in
# docs/bench-output/e2e-<date>-<name>.txt.
# With --single-and-clusters each run measures single servers, then the clusters
# (--clusters), one after the other, and the output ends with each run's clusters / single.
#   scripts/bench.sh [--runs 4] [--name NAME] [--single-and-clusters] [-- OPTIONS for benches/e2e.rs]
# e.g. scripts/bench.sh --runs 4 --name 1000contents -- --events 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
runs=4
name=e2e
both=
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="${2:?--runs needs a number}"; shift 2 ;;
    --name) name="${2:?--name needs a name}"; shift 2 ;;
    --single-and-clusters) both=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; use --runs N --name NAME -- OPTIONS" >&2; exit 2 ;;
  esac
done
case "$runs" in
  ''|*[!0-9]*|0) echo "error: --runs $runs is not a positive whole number" >&2; exit 2 ;;
esac
case "$name" in
  *[!A-Za-z0-9._-]*) echo "error: --name $name: letters, digits, '.', '_' and '-' only" >&2; exit 2 ;;
esac
scripts/stack.sh install
mkdir -p docs/bench-output
out="docs/bench-output/e2e-$(date -u +%Y-%m-%d)-${name}.txt"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet -- . ':!docs/bench-output' || echo ' (with local changes)')"
  echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(uname -sr)"
  echo "command: scripts/bench.sh --runs $runs --name $name${both:+ --single-and-clusters} -- $*"
} > "$out"
cargo bench --locked --bench e2e --no-run
for i in $(seq 1 "$runs"); do
  if [ $((i % 2)) -eq 1 ]; then first=recvlogical; else first=engine; fi
  for servers in single ${both:+clusters}; do
    extra=()
    [ "$servers" = clusters ] && extra=(--clusters)
    echo "" >> "$out"
    echo "### run $i of $runs (--first $first${both:+, $servers})" >> "$out"
    cargo bench --locked --bench e2e -- --first "$first" "${extra[@]}" "$@" 2>&1 | tee -a "$out"
  done
done
if [ -n "$both" ]; then
  # Each run's clusters / single: the catch-up rates, and the same with each set against its
  # own pg_recvlogical (the machine's speed can move between the two halves of a run).
  summary=$(awk '
    /^### run / { half = ($0 ~ /clusters\)$/) ? "c" : "s"; run = $3 }
    /^\| pg_recvlogical alone \|/ { raw[run, half] = $5 }
    /^\| engine catch-up, all listed sinks \|/ { rate[run, half] = $8 }
    END {
      for (r = 1; (r, "s") in rate; r++) {
        if (!((r, "c") in rate) || !raw[r, "s"] || !raw[r, "c"] || !rate[r, "s"]) continue
        ratio = rate[r, "c"] / rate[r, "s"]
        norm = (rate[r, "c"] / raw[r, "c"]) / (rate[r, "s"] / raw[r, "s"])
        printf "run %d: clusters / single %.2f (%d / %d events/s); against each half'"'"'s own pg_recvlogical %.2f\n", r, ratio, rate[r, "c"], rate[r, "s"], norm
        sc += rate[r, "c"]; ss += rate[r, "s"]
      }
      if (ss > 0) printf "all runs: clusters / single %.2f (rates summed)\n", sc / ss
    }' "$out")
  { echo ""; echo "### clusters / single"; echo "$summary"; } | tee -a "$out"
fi
echo "raw output kept in $out"
