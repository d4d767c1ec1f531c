#!/usr/bin/env bash
# Debian packages the benchmarks use beyond .venv (none of the tests need them):
# h2load (nghttp2-client) drives HTTP and gRPC with one C client in benchmarks/bench_grpc.py.
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get install -y --no-install-recommends nghttp2-client
