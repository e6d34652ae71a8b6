#!/usr/bin/env bash
# One image for both deployment modes: the ECS agent stays off unless the instance is in ECS
# mode. Host mode (the default): relayd.service runs relayd, the agent never starts, so there
# is no registration loop against a cluster that does not exist. ECS mode: the user data marks
# the instance, names the cluster, disables relayd.service and starts the agent, which runs
# relayd as an ECS task (terraform/modules/relay, mode = "ecs").
#
# Two locks, so that neither alone has to hold: the unit is disabled (no start at boot), and a
# drop-in makes any start a no-op (ConditionPathExists) until the ECS-mode marker exists.
# Runs after install.sh on Amazon Linux 2023 (the Packer build) and Debian 12 (the boot test,
# where no ECS agent is installed and only the drop-in and the marker rule apply).
set -euo pipefail

marker=/etc/relayd/ecs-mode
dropin_dir=/etc/systemd/system/ecs.service.d

log() { printf 'ecs-agent.sh: %s\n' "$*"; }
# has_unit UNIT: the unit file exists (captured, not piped into grep -q: with pipefail, grep's
# early exit can fail the pipeline with SIGPIPE).
has_unit() { [ -n "$(systemctl list-unit-files --no-legend "$1" 2>/dev/null)" ]; }

install -d -m 0755 "$dropin_dir"
cat >"$dropin_dir/50-relayd-mode.conf" <<CONF
# relayd: the ECS agent runs only on instances in ECS mode; their user data creates
# $marker (see packer/README.md). Without it, a start is skipped.
[Unit]
ConditionPathExists=$marker
CONF
chmod 0644 "$dropin_dir/50-relayd-mode.conf"
rm -f "$marker"

# The ECS-optimized base enables the agent (and Docker, which only the agent needs).
for unit in ecs.service docker.service docker.socket; do
  if has_unit "$unit"; then
    systemctl disable "$unit"
    log "$unit disabled (ECS mode starts it from user data)"
  fi
done
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  # The builder's own agent, if it already runs, stops now (cleanup.sh clears its state).
  systemctl stop ecs.service 2>/dev/null || true
fi

# The result, checked where it is made.
[ -f "$dropin_dir/50-relayd-mode.conf" ] || { echo "ecs-agent.sh: no drop-in" >&2; exit 1; }
if has_unit ecs.service; then
  state=$(systemctl is-enabled ecs.service 2>/dev/null || true)
  [ "$state" = disabled ] || { echo "ecs-agent.sh: ecs.service is $state" >&2; exit 1; }
fi
log "done: the ECS agent starts only where $marker exists"
