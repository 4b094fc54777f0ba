#!/usr/bin/env bash
# Installs what the shared-state tests need: Debian's redis-server (Redis 7). Idempotent
# and quiet; exits non-zero with the reason when it cannot (the tests then FAIL with it).
set -uo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1; } \
      || { echo "install-redis: apt-get install redis-server failed" >&2; exit 1; }
  else
    echo "install-redis: redis-server missing and cannot apt-get install it (need root + apt)" >&2
    exit 1
  fi
fi
command -v redis-server
