#!/usr/bin/env bash
# Makes sure a real Prometheus server is on this machine for the autoscaling tests (tests/test_metrics_api_standin.py,
# the scaling test's scrapes) and prints its path: Debian's `prometheus` package (2.42 on Debian 12), installed with
# apt-get when missing (needs root; the package's service is not started: no systemd here, policy-rc.d refuses).
set -euo pipefail
if ! command -v prometheus >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "prometheus is not installed and this is not root: apt-get install prometheus" >&2
    exit 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2 \
    || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2; }
fi
command -v prometheus
