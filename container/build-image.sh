#!/usr/bin/env bash
# Build the relayd container image with podman (or buildah): assemble the build context (the
# source, a wheelhouse of the Python dependencies downloaded here with pip, the container
# files), then build container/Containerfile. Prints the image ID on the last line.
#
# usage: container/build-image.sh [--rootfs DIR] [--base IMAGE] [--tag TAG]
#   --rootfs DIR   import DIR (a Debian 12 root file system, e.g. the one the appliance boot
#                  test debootstraps: python3 tests/appliance/rootfs.py) as the base image first;
#                  no container registry is needed
#   --base IMAGE   base image (default localhost/relayd-base:bookworm)
#   --tag TAG      image name (default localhost/relayd:<version>)
# Environment: PYTHON (default python3; 3.11 or later, with pip) runs pip; RELAYD_BUILD_NETWORK is podman build's
# --network for the build stage's apt-get (default: podman's own default).
set -euo pipefail
cd "$(dirname "$0")/.."

base=localhost/relayd-base:bookworm
rootfs=
tag=
while [ $# -gt 0 ]; do
  case $1 in
    --rootfs) rootfs=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    *) echo "usage: $0 [--rootfs DIR] [--base IMAGE] [--tag TAG]" >&2; exit 2 ;;
  esac
done
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' relayd/__init__.py)
tag=${tag:-localhost/relayd:$version}
python=${PYTHON:-python3}
command -v podman >/dev/null || { echo "build-image: podman is not installed" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT

if [ -n "$rootfs" ]; then
  [ -x "$rootfs/usr/bin/python3" ] || { echo "build-image: $rootfs has no python3" >&2; exit 1; }
  # Documentation and locales are not needed to run relayd; the image is smaller without.
  tar -C "$rootfs" --numeric-owner --exclude=./usr/share/doc --exclude=./usr/share/man \
    --exclude=./usr/share/info --exclude=./usr/share/locale --exclude=./var/cache/apt \
    --exclude=./var/lib/apt/lists -c . |
    podman import --quiet - "$base" >/dev/null
  echo "build-image: base $base imported from $rootfs"
fi

# The source as the wheel build wants it (no build products, no caches).
mkdir -p "$ctx/src" "$ctx/container" "$ctx/wheelhouse"
cp pyproject.toml hatch_build.py README.md "$ctx/src/"
tar -c --exclude=__pycache__ --exclude='*.so' --exclude='*.pyc' relayd | tar -C "$ctx/src" -x
cp container/Containerfile container/entrypoint.sh "$ctx/container/"

# The build backend and relayd's dependencies, as wheels for the base's CPython 3.11 on
# x86-64: the build then needs no index (and no TLS trust of its own).
mapfile -t requirements < <("$python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    meta = tomllib.load(f)
print("\n".join(meta["build-system"]["requires"] + meta["project"]["dependencies"]))' pyproject.toml)
"$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 \
  --dest "$ctx/wheelhouse" "${requirements[@]}"

network=()
[ -z "${RELAYD_BUILD_NETWORK:-}" ] || network=(--network "$RELAYD_BUILD_NETWORK")
podman build --quiet --format docker --layers=false --isolation chroot "${network[@]}" \
  --build-arg BASE_IMAGE="$base" -f "$ctx/container/Containerfile" -t "$tag" "$ctx"
echo "build-image: $tag, $(podman image inspect --format '{{.Size}}' "$tag") bytes"
podman image inspect --format '{{.Id}}' "$tag"
