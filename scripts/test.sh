#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests run when it is missing, then
# formatting, lints, unit and integration tests (integration tests start real redis-server processes
# on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests run besides cargo: real redis-server (and Sentinel, the same binary), redis-cli and
# redis-benchmark, openssl for the TLS tests' certificates, and redis_exporter as a real scraper.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v prometheus-redis-exporter >/dev/null 2>&1 || missing+=(prometheus-redis-exporter)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing with apt-get: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  # --no-install-recommends: the exporter's package would otherwise pull in Prometheus itself.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
redis-server --version

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# Unit tests and the integration suites (examples and the binary have no tests; clippy above
# already builds them). The summary line counts every test that ran.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --no-fail-fast --lib --tests -- --test-threads "${TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
