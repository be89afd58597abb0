#!/usr/bin/env bash
# The test suite: formatting, lints, then unit and integration tests against real servers
# (each test starts its own PostgreSQL, Redis and ClickHouse on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
# The integration tests start their own PostgreSQL 15, Redis and ClickHouse: install the
# Debian packages that are missing, and chdb-core (PyPI) into .venv/.
scripts/stack.sh install
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Benchmarks are built by clippy above and run with `cargo bench` (docs/benchmarks.md).
cargo test --locked --lib --bins --tests -- --test-threads "${TEST_THREADS:-4}"
# The ClickHouse tests again against a modern engine (ClickHouse 26.x through chDB behind
# tests/support/chdb_http.py; docs/testing.md says what that adapter emulates).
ECDC_TEST_CLICKHOUSE=chdb cargo test --locked --test setup --test sinks --test backfill \
  -- --test-threads "${TEST_THREADS:-4}"
