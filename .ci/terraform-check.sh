#!/usr/bin/env bash
# Terraform checks (`make terraform-check`): fmt, validate, the offline `terraform test` suites
# (mock_provider "aws"), checkov, `relayd check-config` on the relayd.toml that Terraform
# renders (as it is, and with the key files it names provisioned), shellcheck of the rendered
# user data, and a run of its key-fetching block against a stand-in AWS CLI. The AWS provider
# comes from this machine's local filesystem mirror; where there is none, the checks are skipped
# with a loud line and the script exits 0. Anything else that goes wrong exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tf_root=terraform
checkov_version=3.3.30
checkov_venv=.venv-checkov

dirs=(modules/relay modules/multicast-domain modules/consumer environments/london environments/tokyo)
# Validated only: they have no tests of their own.
validate_only=(modules/consumer/examples/basic)
envs=(environments/london environments/tokyo)

skip() {
  local bar='!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
  printf '\n%s\nSKIPPED: terraform checks: %s\n%s\n\n' "$bar" "$1" "$bar"
  exit 0
}

step() { printf '\n==> [%3ds] %s\n' "$SECONDS" "$*"; }

command -v terraform >/dev/null || skip "terraform is not installed on this machine"

# The mirror root is the directory holding registry.terraform.io/hashicorp/aws/<version>/...;
# TF_PROVIDER_MIRROR may name it directly.
mirror=${TF_PROVIDER_MIRROR:-}
if [ -z "$mirror" ]; then
  provider_bin=$(timeout 120 find / -xdev -path '*/registry.terraform.io/hashicorp/aws/*' \
    -name 'terraform-provider-aws*' -type f 2>/dev/null | sort | tail -n 1 || true)
  if [ -n "$provider_bin" ]; then
    mirror=${provider_bin%%/registry.terraform.io/*}
  fi
fi
if [ -z "$mirror" ] || [ ! -d "$mirror/registry.terraform.io/hashicorp/aws" ]; then
  skip "no local filesystem mirror of the hashicorp/aws provider on this machine"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

cat >"$work/cli.tfrc" <<EOF
provider_installation {
  filesystem_mirror {
    path    = "$mirror"
    include = ["registry.terraform.io/*/*"]
  }
}
EOF
export TF_CLI_CONFIG_FILE=$work/cli.tfrc
export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
unset TF_WORKSPACE TF_CLI_ARGS

echo "terraform: $(terraform version | head -n 1); AWS provider from the local mirror"

# tf SECONDS DIR ARGS...: terraform in one directory, with a time limit. Each directory keeps
# its providers in a throw-away data dir, outside the work tree.
tf() {
  local limit=$1 dir=$2
  shift 2
  TF_DATA_DIR="$work/data/${dir//\//_}" timeout "$limit" terraform -chdir="$tf_root/$dir" "$@"
}

step "terraform fmt -check"
timeout 60 terraform fmt -check -recursive -diff "$tf_root"

step "terraform init + validate"
for dir in "${dirs[@]}" "${validate_only[@]}"; do
  tf 120 "$dir" init -backend=false -input=false -no-color >"$work/init.log" 2>&1 ||
    { cat "$work/init.log"; echo "terraform init failed in $tf_root/$dir" >&2; exit 1; }
  printf '%-34s ' "$dir"
  tf 120 "$dir" validate -no-color
done

step "terraform test (mock_provider \"aws\", offline; in parallel)"
# Each job: a directory and its test arguments. The environments also plan and apply their own
# example.tfvars (tests/example holds that one run, which takes every value from the file).
jobs=()
for dir in "${dirs[@]}"; do jobs+=("$dir|"); done
for dir in "${envs[@]}"; do jobs+=("$dir|-test-directory=tests/example -var-file=example.tfvars"); done
pids=()
for i in "${!jobs[@]}"; do
  dir=${jobs[$i]%%|*}
  read -r -a args <<<"${jobs[$i]#*|}"
  (tf 600 "$dir" test -no-color "${args[@]}" >"$work/test-$i.log" 2>&1; echo $? >"$work/test-$i.rc") &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || true; done
failed=()
for i in "${!jobs[@]}"; do
  echo "--- $tf_root/${jobs[$i]%%|*} ${jobs[$i]#*|}"
  cat "$work/test-$i.log"
  [ "$(cat "$work/test-$i.rc")" = 0 ] || failed+=("${jobs[$i]}")
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'terraform test failed in: %s\n' "${failed[@]}" >&2
  exit 1
fi

step "relayd check-config on the rendered relayd.toml"
# The same expression the launch template's user data embeds (the tests assert that), rendered
# from each environment's example tfvars and from the relay module's edge-case inputs.
render() {
  local dir=$1 var_file=$2 expr=$3 out=$4
  shift 4
  echo "base64encode($expr)" | tf 120 "$dir" console -var-file="$var_file" "$@" -no-color >"$out.b64"
  tr -d '"\n' <"$out.b64" | base64 -d >"$out"
  [ -s "$out" ] || { echo "empty relayd.toml rendered from $tf_root/$dir" >&2; exit 1; }
}
tomls=()
for dir in "${envs[@]}"; do
  out="$work/relayd-${dir##*/}.toml"
  render "$dir" example.tfvars module.relay.relayd_toml "$out"
  tomls+=("$out")
done
render modules/relay tests/edge-cases.tfvars local.relayd_toml "$work/relayd-edge-cases.toml"
tomls+=("$work/relayd-edge-cases.toml")
# ECS mode (the same inputs): the task's relayd.toml (RELAYD_CONFIG_TOML) and the user data.
ecs_vars=(-var mode=ecs -var 'ecs={image_tag="check"}')
render modules/relay tests/edge-cases.tfvars local.relayd_toml_ecs "$work/relayd-edge-cases-ecs.toml" "${ecs_vars[@]}"
tomls+=("$work/relayd-edge-cases-ecs.toml")

# The user data around it is a bash script: shellcheck it too where shellcheck is installed.
render modules/relay tests/edge-cases.tfvars local.user_data "$work/user-data.sh"
render modules/relay tests/edge-cases.tfvars local.user_data "$work/user-data-ecs.sh" "${ecs_vars[@]}"
if command -v shellcheck >/dev/null; then
  timeout 60 shellcheck -s bash "$work/user-data.sh" "$work/user-data-ecs.sh" "$tf_root/tests/user-data-keys.sh" \
    "$tf_root/modules/relay/files/relayd-host-check.sh"
  echo "user data: shellcheck clean"
else
  echo "WARNING: shellcheck is not installed; the rendered user data is not linted" >&2
fi
# The CloudWatch agent's Prometheus scrape configuration it writes, through promtool.
render modules/relay tests/edge-cases.tfvars local.prometheus_yaml_rendered "$work/prometheus.yaml"
if command -v promtool >/dev/null; then
  timeout 60 promtool check config "$work/prometheus.yaml"
else
  echo "WARNING: promtool is not installed; the agent's scrape configuration is not checked" >&2
fi
# Its key-fetching block, run against a stand-in AWS CLI in a scratch directory.
timeout 120 bash "$tf_root/tests/user-data-keys.sh" "$work/user-data.sh"

relayd=$repo/.venv/bin/relayd
python=$repo/.venv/bin/python
[ -x "$python" ] || python=python3
have_checker=0
if [ -x "$relayd" ] && timeout 60 "$relayd" check-config --help >/dev/null 2>&1; then
  have_checker=1
else
  echo "WARNING: '.venv/bin/relayd check-config' is not available yet; only checking that the rendered files parse as TOML" >&2
fi
for toml in "${tomls[@]}"; do
  printf '%s: ' "$(basename "$toml")"
  # Syntax first, with the standard library's parser, so a broken template names the line.
  timeout 60 "$python" -c 'import sys, tomllib; tomllib.load(open(sys.argv[1], "rb"))' "$toml" ||
    { cat -n "$toml"; exit 1; }
  if [ "$have_checker" = 1 ]; then
    # As rendered, the key files of authenticated feeds do not exist here: warnings, exit 0.
    timeout 60 "$relayd" check-config --config "$toml" || { cat -n "$toml"; exit 1; }
    # With every key file provisioned (in a scratch directory), the file must check clean.
    if grep -q '^auth_key_files = ' "$toml"; then
      keys=$work/keys-$(basename "$toml" .toml)
      mkdir -p "$keys"
      sed "s|\"/etc/relayd/keys/|\"$keys/|g" "$toml" >"$keys/relayd.toml"
      for key in $(grep -o "\"$keys/[^\"]*\"" "$keys/relayd.toml" | tr -d '"'); do
        (umask 077 && head -c 32 /dev/urandom | base64 >"$key")
      done
      printf '%s with its keys: ' "$(basename "$toml")"
      timeout 60 "$relayd" check-config --config "$keys/relayd.toml" 2>"$keys/stderr" ||
        { cat "$keys/stderr"; cat -n "$keys/relayd.toml"; exit 1; }
      if [ -s "$keys/stderr" ]; then
        cat "$keys/stderr"
        echo "relayd check-config warns although every key file exists" >&2
        exit 1
      fi
    fi
  else
    echo "parses as TOML"
  fi
done

step "checkov"
if ! [ -x "$checkov_venv/bin/checkov" ] ||
  [ "$("$checkov_venv/bin/checkov" --version 2>/dev/null)" != "$checkov_version" ]; then
  echo "installing checkov $checkov_version into $checkov_venv"
  rm -rf "$checkov_venv"
  python3 -m venv "$checkov_venv"
  timeout 600 "$checkov_venv/bin/pip" install --quiet --disable-pip-version-check \
    "checkov==$checkov_version" >"$work/pip.log" 2>&1 || { cat "$work/pip.log"; exit 1; }
fi
# Every skip is in the code as #checkov:skip=<id>:<reason>. checkov's own 10 s limit per file
# trips on a busy machine and then silently leaves the file out; the outer timeout bounds the
# run instead, and a parsing error fails it.
if ! HCL_PARSE_TIMEOUT_SEC=0 timeout 600 "$checkov_venv/bin/checkov" -d "$tf_root" \
  --skip-download --quiet --compact 2>&1 | tee "$work/checkov.log"; then
  echo "checkov failed" >&2
  exit 1
fi
if grep -q 'Parsing errors: [1-9]' "$work/checkov.log"; then
  echo "checkov could not parse every file" >&2
  exit 1
fi

echo
echo "terraform checks: all passed in ${SECONDS}s"
