#!/usr/bin/env bash
# Installs what the approval browser test needs: Debian's chromium and the playwright
# Python package (driving that chromium; playwright's own browser download is not used).
# Idempotent and quiet; exits non-zero when it cannot install (the test then skips loudly).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
INSTALLER=install-browser scripts/apt-install.sh chromium >/dev/null || exit 1
if ! "$PY" -c 'import playwright' >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check playwright >/dev/null 2>&1 \
    || { echo "install-browser: pip install playwright failed" >&2; exit 1; }
fi
command -v chromium
