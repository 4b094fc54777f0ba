#!/usr/bin/env bash
# mcp-bastion entry point.
#   ./run.sh            demo gateway on 127.0.0.1 (demo MCP server + mitmdump + example rules)
#   ./run.sh web        the same under mitmweb (approval console)
#   ./run.sh test       the whole test suite (extra args go to pytest)
#   ./run.sh bench      benchmarks (see bench/README.md)
#   ./run.sh replay ID  open a recorded session in mitmweb
#   ./run.sh <other>    passed to the mcp-bastion CLI (token, check, explain, sql, ...)
#   ./run.sh --rules DIR <command>   the CLI with its global option (--rules DIR alone: the gateway)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"

find_python() {
  local c v
  for c in python3.13 python3.12 python3 python; do
    if command -v "$c" >/dev/null 2>&1; then
      v=$("$c" -c 'import sys; print(int(sys.version_info >= (3, 12)))' 2>/dev/null || echo 0)
      [ "$v" = 1 ] && { command -v "$c"; return 0; }
    fi
  done
  local root="${PYENV_ROOT:-$HOME/.pyenv}"
  for c in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
    [ -x "$c/bin/python3" ] && { echo "$c/bin/python3"; return 0; }
  done
  return 1
}

ensure_venv() {
  local want_test="${1:-0}" stamp="$VENV/.bastion-installed"
  local hash
  hash=$(cat pyproject.toml | sha256sum | cut -c1-16)
  [ "$want_test" = 1 ] && hash="$hash-test"
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && grep -qx -- "$hash" "$stamp" ; then
    return 0
  fi
  if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$want_test" = 0 ] && grep -qx -- "$hash-test" "$stamp"; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    local py
    py=$(find_python) || { echo "run.sh: need Python >= 3.12 (on PATH or under pyenv)" >&2; exit 1; }
    echo "run.sh: creating .venv with $py" >&2
    "$py" -m venv "$VENV"
  fi
  local spec="."
  [ "$want_test" = 1 ] && spec=".[test]"
  echo "run.sh: installing mcp-bastion ($spec) into .venv" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
  echo "$hash" > "$stamp"
}

run_cli() {
  ensure_venv 0
  # the shipped rules name the demo's service token; create it (0600, git-ignored) so
  # check/explain/pin work on a fresh clone before the demo has ever run
  [ -s .secrets/demo-service-token ] || "$VENV/bin/python" -c \
    'from demo.tokens import ensure_token; ensure_token(".secrets/demo-service-token")'
  exec "$VENV/bin/mcp-bastion" "$@"
}

run_gateway() {
  # ./run.sh [--set option=value ...] and ./run.sh web [...]: mitmproxy options pass through
  local web=""
  if [ "${1:-}" = web ]; then shift; web="--web"; fi
  ensure_venv 0
  exec "$VENV/bin/python" -m addons.cli.launcher $web "$@"
}

cmd="${1:-}"
case "$cmd" in
  --rules|--rules=*)
    # the CLI's global option when a command follows it (./run.sh --rules DIR check),
    # else the gateway's (./run.sh --rules DIR [--set ...])
    n=1; [ "$cmd" = --rules ] && n=2
    if [ $# -gt "$n" ] && [[ "${@:$((n + 1)):1}" != -* ]]; then run_cli "$@"; fi
    run_gateway "$@"
    ;;
  test)
    shift
    ensure_venv 1
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  ""|web|--*)
    run_gateway "$@"
    ;;
  replay)
    shift
    ensure_venv 0
    exec "$VENV/bin/mcp-bastion" replay "$@" --web
    ;;
  bench)
    shift
    ensure_venv 1
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  fuzz)
    # long fuzzing run of every property test (FUZZ_EXAMPLES per property, default 20000)
    shift
    ensure_venv 1
    HYPOTHESIS_PROFILE=long exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --hypothesis-show-statistics \
      tests/fuzz tests/unit/test_mask_property.py tests/unit/test_sse.py -k "fuzz or property" "$@"
    ;;
  *)
    run_cli "$@"
    ;;
esac
