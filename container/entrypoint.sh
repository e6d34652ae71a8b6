#!/bin/bash
# The container's entrypoint: put the configuration and the feeds' keys in place, check the
# configuration as systemd's ExecStartPre does, then exec `relayd run`, so that relayd is the
# process the runtime signals (SIGTERM stops it cleanly, SIGHUP reloads the file).
#
# With arguments it runs that relayd command instead. Configuration, first match wins:
#   RELAYD_CONFIG_TOML   the whole relayd.toml as text (ECS: the task definition's environment,
#                        rendered by Terraform); written to $RELAYD_RUNTIME_DIR/relayd.toml
#   RELAYD_CONFIG        path of a mounted file (default /etc/relayd/relayd.toml)
# Keys (HELLO authentication, auth_key_files), optional:
#   RELAYD_KEY_FILES     space-separated key file paths, in order
#   RELAYD_KEY_1, ...    the key for the n-th path (ECS: task definition `secrets`, which the
#                        agent reads from SSM with the execution role before the start)
# Each key is written 0400 by rename and its variable is removed from the environment before
# relayd starts, so it is not in /proc/<relayd>/environ. Without RELAYD_KEY_FILES, key files are
# whatever is mounted (keep them out of the image).
#   RELAYD_RUNTIME_DIR   writable directory for the rendered config and the keys (/run/relayd)
set -euo pipefail

relayd=/opt/relayd/bin/relayd
runtime_dir=${RELAYD_RUNTIME_DIR:-/run/relayd}

# Arguments: another relayd command instead (`podman run IMAGE --version`, `... status`).
if [ $# -gt 0 ]; then
  exec "$relayd" "$@"
fi

die() {
  printf 'relayd-entrypoint: %s\n' "$*" >&2
  exit 2
}

umask 077
# The image's /etc/relayd/keys points at $runtime_dir/keys (/run/relayd/keys).
mkdir -p "$runtime_dir/keys"

# write_file PATH: stdin to PATH, 0400, through a temporary file in the same directory.
write_file() {
  local path=$1 dir tmp
  dir=$(dirname "$path")
  [ -d "$dir" ] || mkdir -p "$dir"
  tmp=$(mktemp "$dir/.$(basename "$path").XXXXXX")
  cat >"$tmp"
  chmod 0400 "$tmp"
  mv -f "$tmp" "$path"
}

if [ -n "${RELAYD_KEY_FILES:-}" ]; then
  read -r -a key_files <<<"$RELAYD_KEY_FILES"
  for i in "${!key_files[@]}"; do
    var=RELAYD_KEY_$((i + 1))
    [ -n "${!var:-}" ] || die "$var is empty or unset: no key for ${key_files[$i]}"
    printf '%s' "${!var}" | write_file "${key_files[$i]}"
    unset "$var"
    printf 'relayd-entrypoint: key %s written\n' "${key_files[$i]}"
  done
fi

if [ -n "${RELAYD_CONFIG_TOML:-}" ]; then
  config=$runtime_dir/relayd.toml
  printf '%s\n' "$RELAYD_CONFIG_TOML" | write_file "$config"
  unset RELAYD_CONFIG_TOML
  printf 'relayd-entrypoint: configuration from RELAYD_CONFIG_TOML in %s\n' "$config"
else
  config=${RELAYD_CONFIG:-/etc/relayd/relayd.toml}
  [ -f "$config" ] ||
    die "no configuration: mount a relayd.toml at $config (or set RELAYD_CONFIG) or pass its text in RELAYD_CONFIG_TOML"
fi

# The same check systemd runs before a start: a broken configuration stops here with one line
# per problem (exit 2), and the orchestrator sees the container fail instead of a relayd that
# half starts.
"$relayd" check-config --config "$config" || exit 2

exec "$relayd" run --config "$config"
