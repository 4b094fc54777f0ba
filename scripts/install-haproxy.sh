#!/usr/bin/env bash
# Installs what the scale-out tests need: Debian's haproxy (the load balancer in front of
# the gateway replicas). Idempotent and quiet; prints the binary's path. Exits non-zero
# with the reason when it cannot install (the tests then fail with that reason, never skip).
set -uo pipefail
if ! command -v haproxy >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q haproxy >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q haproxy >/dev/null 2>&1; } \
      || { echo "install-haproxy: apt-get install haproxy failed (no network to the Debian mirror?)" >&2; exit 1; }
  else
    echo "install-haproxy: haproxy missing and cannot apt-get install it (need root + apt-get)" >&2
    exit 1
  fi
fi
command -v haproxy
