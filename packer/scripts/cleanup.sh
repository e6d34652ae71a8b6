#!/usr/bin/env bash
# Last step before the snapshot: nothing that identifies this build instance may reach the AMI.
set -euo pipefail

# The ECS agent registered the builder with a cluster at boot; a launched instance must
# register afresh with the cluster its ecs.config names.
if systemctl list-unit-files ecs.service >/dev/null 2>&1; then
  systemctl stop ecs.service || true
fi
rm -rf /var/lib/ecs/data/*

# Host identity: new SSH host keys and machine-id on first boot of each instance.
rm -f /etc/ssh/ssh_host_*
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id /var/lib/systemd/random-seed

# cloud-init runs again (user data, instance id) on every launched instance.
if command -v cloud-init >/dev/null; then
  cloud-init clean --logs
fi

# Logs and leftovers of the build.
rm -rf /tmp/relayd-install /var/log/relayd/*
journalctl --rotate >/dev/null 2>&1 || true
journalctl --vacuum-time=1s >/dev/null 2>&1 || true
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -f /root/.bash_history /home/*/.bash_history
echo "cleanup.sh: done"
