#!/bin/bash
# relayd-host-check HEALTH_PORT FAILURES: the instance's own health for its Auto Scaling group.
#
# Healthy means the host runs relayd and relayd answers /healthz at all: 200 (every feed
# healthy) and 503 (some feed down, or stopping) both count, because one feed's fault must not
# replace an instance that serves the others (that feed leaves its own target group instead).
# After FAILURES checks in a row without an answer (relayd stopped, crashed past systemd's
# restarts, or its event loop stuck), the instance reports itself Unhealthy and the group
# replaces it. Run by relayd-host-check.timer; the count of failures lives in /run.
set -uo pipefail
port=${1:?usage: relayd-host-check HEALTH_PORT FAILURES}
failures=${2:?usage: relayd-host-check HEALTH_PORT FAILURES}
state=${RELAYD_HOST_CHECK_STATE:-/run/relayd-host-check.failures}
imds=${RELAYD_HOST_CHECK_IMDS:-http://169.254.169.254}

code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$port/healthz" || true)
active=$(systemctl is-active relayd.service || true)
if [ "$active" = active ] && { [ "$code" = 200 ] || [ "$code" = 503 ]; }; then
  echo 0 >"$state"
  exit 0
fi

count=$(($(cat "$state" 2>/dev/null || echo 0) + 1))
echo "$count" >"$state"
echo "relayd host check: relayd is $active, /healthz answered '$code' (failure $count of $failures)" >&2
if [ "$count" -lt "$failures" ]; then
  exit 1
fi

token=$(curl -sf -m 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' "$imds/latest/api/token" || true)
instance_id=$(curl -sf -m 5 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/instance-id" || true)
region=$(curl -sf -m 5 -H "X-aws-ec2-metadata-token: $token" "$imds/latest/meta-data/placement/region" || true)
if [ -z "$instance_id" ] || [ -z "$region" ]; then
  echo "relayd host check: no instance identity from the metadata service; cannot report" >&2
  exit 1
fi
if timeout 30 aws autoscaling set-instance-health --region "$region" --instance-id "$instance_id" \
  --health-status Unhealthy --should-respect-grace-period; then
  echo "relayd host check: reported $instance_id Unhealthy to its Auto Scaling group" >&2
else
  echo "relayd host check: could not report $instance_id Unhealthy" >&2
fi
exit 1
