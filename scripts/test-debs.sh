#!/usr/bin/env bash
# Debian packages the tests use beyond .venv, installed when missing (called by ./run-tests):
# prometheus (prometheus and promtool) for tests/test_prometheus.py, which runs a real server
# scraping `bastion up` and checks deploy/prometheus/alerts.yml with promtool.
# Installs only as root (CI); elsewhere it says which test will skip. With CI=true that test
# fails instead of skipping when prometheus is missing.
set -uo pipefail
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "${CI:-}" = "true" ]; then
  outcome="fail (CI=true requires it)"
else
  outcome="skip"
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus is not installed (apt-get install prometheus as root): tests/test_prometheus.py will $outcome" >&2
  exit 0
fi
echo "Installing Debian's prometheus package for tests/test_prometheus.py..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends prometheus >/dev/null ||
  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; } ||
  echo "could not install prometheus: tests/test_prometheus.py will $outcome" >&2
exit 0
