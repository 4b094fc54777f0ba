#!/usr/bin/env bash
# Installs what the scale-out tests need: Debian's haproxy (the load balancer in front of
# the gateway replicas). Prints the binary's path; exits non-zero with the reason when it
# cannot install (the tests then fail with that reason, never skip).
INSTALLER=install-haproxy exec "$(dirname "$0")/apt-install.sh" haproxy
