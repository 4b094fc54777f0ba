#!/usr/bin/env bash
# Installs what the approval browser test needs: Debian's chromium and the playwright
# Python package (driving that chromium; playwright's own browser download is not used).
# Idempotent and quiet; exits non-zero when it cannot install (the test then skips loudly).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
      || { echo "install-browser: apt-get install chromium failed" >&2; exit 1; }
  else
    echo "install-browser: chromium missing and cannot apt-get install it (need root + apt)" >&2
    exit 1
  fi
fi
if ! "$PY" -c 'import playwright' >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check playwright >/dev/null 2>&1 \
    || { echo "install-browser: pip install playwright failed" >&2; exit 1; }
fi
command -v chromium
