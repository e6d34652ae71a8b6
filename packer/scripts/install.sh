#!/usr/bin/env bash
# Install relayd onto the image: a Python venv in /opt/relayd from the wheel, the system user,
# the rootfs tree (etc/, systemd/) copied as it is, the unit enabled; relayd on PATH with its
# man pages, bash completion and docs.
# Runs on Amazon Linux 2023 (dnf; the Packer build) and Debian 12 (apt; the boot test).
#
# Environment:
#   RELAYD_WHEEL_DIR   directory holding the relayd wheel (required)
#   RELAYD_TREE        checkout holding etc/, systemd/, docs/, README.md (required)
#   RELAYD_WHEELHOUSE  directory of dependency wheels; when set, pip installs offline from it
#   RELAYD_PREFIX      venv location (default /opt/relayd)
set -euo pipefail

: "${RELAYD_WHEEL_DIR:?directory of the relayd wheel}"
: "${RELAYD_TREE:?directory holding etc/ and systemd/}"
prefix=${RELAYD_PREFIX:-/opt/relayd}
wheelhouse=${RELAYD_WHEELHOUSE:-}

log() { printf 'install.sh: %s\n' "$*"; }

# shellcheck source=/dev/null
. /etc/os-release
case "${ID:-}" in
  amzn)
    python=python3.11
    log "Amazon Linux ${VERSION_ID:-}: dnf"
    # awscli-2: the user data fetches the feeds' HELLO keys from SSM (the ECS-optimized AMI is
    # built from the minimal one, which has no AWS CLI).
    dnf install -y -q "$python" "$python-pip" rsyslog logrotate amazon-cloudwatch-agent awscli-2 \
      man-db
    ;;
  debian)
    python=python3
    log "Debian ${VERSION_ID:-}: apt"
    want=()
    command -v "$python" >/dev/null || want+=(python3)
    "$python" -c 'import ensurepip' 2>/dev/null || want+=(python3-venv)
    command -v useradd >/dev/null || want+=(passwd)
    command -v man >/dev/null || want+=(man-db)
    if [ ${#want[@]} -gt 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${want[@]}"
    fi
    ;;
  *)
    echo "install.sh: unsupported distribution '${ID:-unknown}'" >&2
    exit 1
    ;;
esac

shopt -s nullglob
wheels=("$RELAYD_WHEEL_DIR"/relayd-*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -ne 1 ]; then
  echo "install.sh: want exactly one relayd wheel in $RELAYD_WHEEL_DIR, found ${#wheels[@]}" >&2
  exit 1
fi

if ! getent group relayd >/dev/null; then
  groupadd --system relayd
fi
if ! getent passwd relayd >/dev/null; then
  useradd --system --gid relayd --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "relayd multicast relay" relayd
fi

log "venv in $prefix"
rm -rf "$prefix"
"$python" -m venv "$prefix"
pip_args=(--quiet --disable-pip-version-check --no-cache-dir)
if [ -n "$wheelhouse" ]; then
  pip_args+=(--no-index --find-links "$wheelhouse")
fi
"$prefix/bin/pip" install "${pip_args[@]}" "${wheels[0]}"
"$prefix/bin/relayd" --version
# A wheel built with a C compiler carries the C data plane: it must load here (libc, platform).
# A pure wheel runs the Python data path, which is supported but slower: say so.
probe=$("$prefix/bin/python" -c \
  'import relayd.fastpath as f; print(int(f.LIBRARY.is_file()), f.describe())')
read -r shipped datapath <<<"$probe"
log "data path: $datapath"
if [ "$shipped" = 1 ] && [ "$datapath" != C ]; then
  echo "install.sh: the wheel's C data plane does not load on this system: $datapath" >&2
  exit 1
fi

log "relayd on PATH, man pages, bash completion, docs"
ln -sfn "$prefix/bin/relayd" /usr/local/bin/relayd
install -d -m 0755 /usr/share/man/man1 /usr/share/bash-completion/completions /usr/share/doc/relayd
# Generated from the installed command line, so they say what --help says.
"$prefix/bin/python" -m relayd.tools.manpage /usr/share/man/man1 >/dev/null
"$prefix/bin/python" -m relayd.tools.completion >/usr/share/bash-completion/completions/relayd
install -m 0644 "$RELAYD_TREE/README.md" "$RELAYD_TREE/CHANGELOG.md" "$RELAYD_TREE"/docs/*.md \
  /usr/share/doc/relayd/
if command -v mandb >/dev/null; then
  mandb --quiet || true
fi

log "rootfs tree"
install -d -m 0755 /etc/sysctl.d /etc/ecs /etc/rsyslog.d /etc/logrotate.d \
  /etc/amazon-cloudwatch-agent /etc/systemd/system
install -m 0644 "$RELAYD_TREE/etc/sysctl.d/60-relayd.conf" /etc/sysctl.d/
install -m 0644 "$RELAYD_TREE/etc/ecs/ecs.config" /etc/ecs/
install -m 0644 "$RELAYD_TREE/etc/rsyslog.d/30-relayd.conf" /etc/rsyslog.d/
install -m 0644 "$RELAYD_TREE/etc/logrotate.d/relayd" /etc/logrotate.d/
install -m 0644 "$RELAYD_TREE/etc/amazon-cloudwatch-agent/relayd.json" /etc/amazon-cloudwatch-agent/
# relayd reads its config as the relayd group; the key files named in it live here too.
install -d -m 0750 -o root -g relayd /etc/relayd
for f in "$RELAYD_TREE"/etc/relayd/*.toml; do
  install -m 0640 -o root -g relayd "$f" /etc/relayd/
done
# HELLO authentication keys (auth_key_files) go here at launch, readable by relayd alone.
install -d -m 0700 -o relayd -g relayd /etc/relayd/keys
install -m 0644 "$RELAYD_TREE/systemd/relayd.service" /etc/systemd/system/

systemctl enable relayd.service
if [ -d /run/systemd/system ]; then
  # A booted machine (the Packer builder): apply the sysctl file now so validate.sh sees it.
  systemctl daemon-reload
  systemctl restart systemd-sysctl.service
fi

if [ "${ID}" = amzn ]; then
  systemctl enable rsyslog.service
  # Translate the agent config into the agent's own format now; the agent starts at boot.
  /opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 \
    -c file:/etc/amazon-cloudwatch-agent/relayd.json
  systemctl enable amazon-cloudwatch-agent.service
fi
log "done"
