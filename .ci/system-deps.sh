#!/usr/bin/env bash
# Install the Debian packages the real-system checks use, when they are missing.
set -euo pipefail
want=(iproute2 tcpdump shellcheck packer systemd-container debootstrap gcc libc6-dev cppcheck haproxy
  prometheus)
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
