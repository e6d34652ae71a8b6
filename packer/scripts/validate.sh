#!/usr/bin/env bash
# Check the image before it is snapshotted: the package runs, the baked config passes the same
# check systemd runs before start and reload, the unit verifies clean, the sysctls hold.
set -euo pipefail

prefix=${RELAYD_PREFIX:-/opt/relayd}
failures=0
fail() { echo "validate.sh: FAIL: $*" >&2; failures=$((failures + 1)); }
ok() { echo "validate.sh: ok: $*"; }
# check DESCRIPTION COMMAND...: ok when the command succeeds, a failure otherwise.
check() {
  local what=$1
  shift
  if "$@" >/dev/null; then ok "$what"; else fail "$what"; fi
}

if version=$("$prefix/bin/relayd" --version 2>&1); then
  ok "relayd --version: $version"
else
  fail "relayd --version: $version"
fi

# On PATH (a symlink to the venv's entry point), with its man page and docs.
check "relayd on PATH is $prefix/bin/relayd" [ "$(readlink -f "$(command -v relayd)")" = "$(readlink -f "$prefix/bin/relayd")" ]
check "man relayd" man -w relayd
check "docs in /usr/share/doc/relayd" test -f /usr/share/doc/relayd/CONFIG.md
check "bash completion" test -s /usr/share/bash-completion/completions/relayd

if out=$("$prefix/bin/relayd" check-config --config /etc/relayd/relayd.toml 2>&1); then
  ok "check-config /etc/relayd/relayd.toml"
else
  fail "check-config /etc/relayd/relayd.toml: $out"
fi

# systemd-analyze verify exits 0 on many problems and only prints them: any output fails.
verify=$(systemd-analyze verify relayd.service 2>&1) || true
if [ -z "$verify" ]; then
  ok "systemd-analyze verify relayd.service"
else
  fail "systemd-analyze verify relayd.service: $verify"
fi

check "relayd.service enabled" [ "$(systemctl is-enabled relayd.service)" = enabled ]
check "system user relayd" getent passwd relayd
check "relayd.toml owned root:relayd" [ "$(stat -c %U:%G /etc/relayd/relayd.toml)" = root:relayd ]
check "key directory relayd-only" [ "$(stat -c %U:%a /etc/relayd/keys)" = relayd:700 ]

# The file is in place and, on a booted machine (the builder), systemd-sysctl applied it.
want=(
  net.ipv4.conf.all.force_igmp_version=2
  net.ipv4.conf.default.force_igmp_version=2
  net.core.rmem_max=33554432
  net.ipv4.igmp_max_memberships=1024
)
for pair in "${want[@]}"; do
  key=${pair%%=*} value=${pair#*=}
  if grep -Eq "^-?${key//./\\.} = ${value}\$" /etc/sysctl.d/60-relayd.conf; then
    ok "sysctl.d sets $key = $value"
  else
    fail "/etc/sysctl.d/60-relayd.conf does not set $key = $value"
  fi
  if [ -d /run/systemd/system ]; then
    live=$(sysctl -n "$key")
    check "live $key = $live (want $value)" [ "$live" = "$value" ]
  fi
done

check "ecs.config names a cluster" grep -q '^ECS_CLUSTER=' /etc/ecs/ecs.config

if [ "$failures" -ne 0 ]; then
  echo "validate.sh: $failures check(s) failed" >&2
  exit 1
fi
echo "validate.sh: all checks passed"
