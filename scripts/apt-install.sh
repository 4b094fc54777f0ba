#!/usr/bin/env bash
# apt-install.sh PACKAGE [COMMAND]: makes sure COMMAND (default: PACKAGE) is on PATH,
# installing Debian's PACKAGE with apt-get when it is missing (root only; `apt-get update`
# when the first attempt fails). Idempotent and quiet; prints the command's path. Exits
# non-zero with the reason when it cannot (callers fail with it, they never skip).
set -uo pipefail
pkg="$1"; cmd="${2:-$1}"; me="${INSTALLER:-apt-install}"
if ! command -v "$cmd" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$pkg" >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$pkg" >/dev/null 2>&1; } \
      || { echo "$me: apt-get install $pkg failed (package unknown to apt, or the Debian mirror unreachable)" >&2; exit 1; }
  else
    echo "$me: $cmd missing and cannot apt-get install $pkg (need root + apt-get)" >&2
    exit 1
  fi
fi
command -v "$cmd"
