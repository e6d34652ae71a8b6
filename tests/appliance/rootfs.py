"""Build and cache the Debian 12 root file system the appliance boot test boots.

The rootfs is made with debootstrap from the archive this machine's apt already uses and is
cached outside the repository, keyed by everything that goes into it, so a rebuild happens only
when it is missing or its recipe changes. Run this file as a script to prebuild it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "iproute2",
    "procps",
    "man-db",  # `man relayd` (the AMI gets it from install.sh)
)
CACHE_ENV = "RELAYD_TEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/relayd-tests")
DEBOOTSTRAP_TIMEOUT = 900.0


class RootfsError(Exception):
    """The rootfs could not be built."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, str(DEFAULT_CACHE)))


def _sources_files() -> list[Path]:
    apt = Path("/etc/apt")
    files = sorted((apt / "sources.list.d").glob("*.sources"))
    files += [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    return [f for f in files if f.is_file()]


def _deb_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every `deb` source this machine's apt uses, in apt's order."""
    found: list[tuple[str, list[str]]] = []
    for path in _sources_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("uris"):
                    suites = fields.get("suites", "").split()
                    found += [(uri, suites) for uri in fields["uris"].split()]
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    at = 2 if words[1].startswith("[") else 1
                    if len(words) > at + 1:
                        found.append((words[at], [words[at + 1]]))
    return found


def archive_mirror() -> str:
    """The Debian archive this machine's apt uses: the source listing SUITE, else the first
    main-archive source of another suite (one archive serves every suite)."""
    sources = _deb_sources()
    for uri, suites in sources:
        if SUITE in suites:
            return uri
    for uri, suites in sources:
        if not any(s.endswith(("-security", "-updates", "-backports")) for s in suites):
            return uri
    raise RootfsError("no Debian archive among this machine's apt sources")


def recipe_key(mirror: str) -> str:
    recipe = "\n".join([SUITE, mirror, "minbase", *PACKAGES])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def ensure_rootfs() -> Path:
    """Return the cached rootfs, building it first when it is missing."""
    mirror = archive_mirror()
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    target = base / f"debian12-{recipe_key(mirror)}"
    with (base / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "usr/lib/systemd/systemd").exists():
            return target
        # Holding the lock, any staging directory is a build that was killed half way.
        for stale in base.glob("building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix="building-", dir=base))
        try:
            cmd = [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                f"--cache-dir={base / 'debs'}",
                SUITE,
                str(staging / "root"),
                mirror,
            ]
            (base / "debs").mkdir(exist_ok=True)
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=DEBOOTSTRAP_TIMEOUT, check=False
            )
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
                raise RootfsError(f"debootstrap failed ({proc.returncode}):\n{tail}")
            # Empty: each boot gets a transient machine id, with no first-boot presets.
            (staging / "root/etc/machine-id").write_text("")
            (staging / "root").rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure_rootfs())
    sys.exit(0)
