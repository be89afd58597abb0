#!/usr/bin/env bash
# The test suite: formatting, lints, then unit and integration tests against real servers
# (each test starts its own PostgreSQL, Redis and ClickHouse on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
# The integration tests start their own PostgreSQL 15, Redis and ClickHouse: install the
# Debian packages that are missing.
scripts/stack.sh install
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Benchmarks are built by clippy above and run with `cargo bench` (docs/benchmarks.md).
cargo test --locked --lib --bins --tests -- --test-threads "${TEST_THREADS:-4}"
