#!/usr/bin/env bash
# Runs the key-fetching part of a rendered user data script (the relay module's edge-case inputs)
# against a stand-in `aws` command, in a temporary directory instead of /etc/relayd/keys, and
# checks what it leaves behind: a good key as a 0400 file with exactly the parameter's value, no
# file for a missing or short parameter, no temporary files, every fetch in the right region,
# and no key value in the script's output. Used by .ci/terraform-check.sh.
#
# usage: user-data-keys.sh USER_DATA
set -euo pipefail
user_data=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/keys"

fail() {
  echo "user data keys: $*" >&2
  exit 1
}

good_key=$(head -c 32 /dev/urandom | base64)
printf '%s' "$good_key" >"$work/good-key"

# The stand-in CLI: the new prod key (by ARN, in Tokyo) exists, 0_a's parameter is too short to
# be a key, the old prod key is missing. Every call is logged with its arguments.
cat >"$work/bin/aws" <<'EOF'
#!/usr/bin/env bash
printf '%s\n' "$*" >>"$STUB_DIR/aws.log"
name='' region=''
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift ;;
    --region) region=$2; shift ;;
  esac
  shift
done
case "$region $name" in
  "ap-northeast-1 arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-2")
    printf '%s\n' "$(cat "$STUB_DIR/good-key")" ;;
  "eu-west-2 relayd.edge_key-1") printf 'short\n' ;;
  *)
    echo "An error occurred (ParameterNotFound) when calling the GetParameter operation: " >&2
    exit 254 ;;
esac
EOF
# chown to relayd needs that user and root; elsewhere the stand-in records the call.
if [ "$(id -u)" != 0 ] || ! id relayd >/dev/null 2>&1; then
  cat >"$work/bin/chown" <<'EOF'
#!/usr/bin/env bash
printf '%s\n' "$*" >>"$STUB_DIR/chown.log"
EOF
fi
printf '#!/bin/sh\nexit 0\n' >"$work/bin/sleep"
chmod +x "$work/bin/"*

# The function and its calls, as rendered, with the key directory moved.
script=$work/fetch.sh
{
  echo 'set -euo pipefail'
  echo 'instance_region=eu-west-2'
  sed -n '/^fetch_key() {$/,/^}$/p; /^fetch_key .* || true$/p' "$user_data"
} | sed "s|/etc/relayd/keys/|$work/keys/|g" >"$script"
grep -q '^fetch_key() {$' "$script" || fail "no fetch_key function in $user_data"
[ "$(grep -c '^fetch_key .* || true$' "$script")" = 3 ] || fail "expected 3 fetch_key calls in $user_data"

STUB_DIR=$work PATH="$work/bin:$PATH" timeout 60 bash "$script" >"$work/out.log" 2>&1 ||
  { cat "$work/out.log"; fail "the fetch block failed"; }

# The good key: in place, 0400, exactly the value (the CLI's trailing newline is fine: relayd
# strips surrounding whitespace).
file=$work/keys/prod-2.key
[ -f "$file" ] || { cat "$work/out.log"; fail "prod-2.key was not written"; }
[ "$(stat -c %a "$file")" = 400 ] || fail "prod-2.key has mode $(stat -c %a "$file"), not 0400"
[ "$(tr -d '[:space:]' <"$file")" = "$good_key" ] || fail "prod-2.key does not hold the parameter's value"
if [ -f "$work/chown.log" ]; then
  grep -qx "relayd:relayd $work/keys/.prod-2.key.*" "$work/chown.log" || fail "prod-2.key not given to relayd:relayd"
else
  [ "$(stat -c %U:%G "$file")" = relayd:relayd ] || fail "prod-2.key is not relayd:relayd"
fi

# Missing and short parameters: no file; nothing half-written anywhere.
[ ! -e "$work/keys/prod-1.key" ] || fail "prod-1.key written from a missing parameter"
[ ! -e "$work/keys/0_a-1.key" ] || fail "0_a-1.key written from a too-short parameter"
[ "$(find "$work/keys" -mindepth 1 | wc -l)" = 1 ] ||
  fail "stray files in the key directory: $(find "$work/keys" -mindepth 1 -printf "%f ")"
grep -q 'feed prod stays down' "$work/out.log" || fail "no message for the missing prod key"
grep -q 'fewer than 16 characters' "$work/out.log" || fail "no message for the short 0_a key"

# Regions: names in the instance's region, the ARN in the region it names. The missing key is
# retried, the short one is not.
grep -qx 'ssm get-parameter --region ap-northeast-1 --name arn:aws:ssm:ap-northeast-1:111122223333:parameter/relayd/prod/key-2 --with-decryption --query Parameter.Value --output text' "$work/aws.log" ||
  fail "the ARN was not fetched in ap-northeast-1 with decryption"
[ "$(grep -c -- '--region eu-west-2 --name /relayd/prod/key-1 ' "$work/aws.log")" = 5 ] || fail "the missing key was not tried 5 times"
[ "$(grep -c -- '--region eu-west-2 --name relayd.edge_key-1 ' "$work/aws.log")" = 1 ] || fail "the short key was retried"

# No key value in what the script printed (cloud-init's output log).
if grep -qF "$good_key" "$work/out.log"; then fail "the key value appears in the output"; fi
if grep -qx 'short' "$work/out.log"; then fail "the short value appears in the output"; fi
echo "user data keys: 1 key written 0400, missing and short parameters left out, no value in the output"
