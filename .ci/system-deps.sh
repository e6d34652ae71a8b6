#!/usr/bin/env bash
# Install the Debian packages the real-system checks use, when they are missing.
set -euo pipefail
# podman builds and runs the container image (runc: crun refuses hosts with hybrid cgroups;
# catatonit: podman --init); haproxy stands in for the NLB; prometheus brings promtool.
want=(iproute2 tcpdump shellcheck packer systemd-container debootstrap gcc libc6-dev cppcheck haproxy
  prometheus podman runc catatonit)
missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]} and cannot apt-get here; the tests that need them skip" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
