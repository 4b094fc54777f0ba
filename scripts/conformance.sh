#!/usr/bin/env bash
# MCP conformance suite, direct vs through the gateway (issue 10).
#   scripts/conformance.sh                 install the suite if needed and run the comparison test
#   scripts/conformance.sh --install-only  install it into .cache/conformance, print the CLI path
# @modelcontextprotocol/conformance 0.1.13 is the newest release that runs on Node 20
# (later ones import fs.globSync, Node >= 22).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.1.13
DIR=.cache/conformance
CLI="$DIR/node_modules/@modelcontextprotocol/conformance/dist/index.js"
if [ ! -f "$CLI" ] || ! grep -q "\"version\": \"$VERSION\"" "$DIR/node_modules/@modelcontextprotocol/conformance/package.json" 2>/dev/null; then
  mkdir -p "$DIR"
  npm install --prefix "$DIR" --no-audit --no-fund --silent "@modelcontextprotocol/conformance@$VERSION" >&2
fi
if [ "${1:-}" = "--install-only" ]; then
  echo "$PWD/$CLI"
  exit 0
fi
exec ./run.sh test tests/e2e/test_conformance.py -s -q
