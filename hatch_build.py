"""Build the C data plane, ``relayd/_fastpath.c``, into ``relayd/_fastpath.so``.

The one place that holds the compile command and its flags. Used three ways:

- ``python hatch_build.py [--output PATH]``: compile in place (what ``make`` runs when the
  source changed), or into PATH. Runs without hatchling.
- the wheel build (``pip wheel``, ``make dist``): a hatchling build hook compiles into the
  build's scratch directory and ships the result as ``relayd/_fastpath.so`` in a wheel tagged
  ``py3-none-<platform>``. The library is loaded with ctypes and uses no Python headers, so one
  wheel serves every Python 3 on the platform.
- the editable install (``pip install -e``, ``make venv``): the hook compiles into the source
  tree, in ``relayd/`` next to the ``relayd/fastpath/`` package, which loads it from there.

Without a C compiler the build prints one warning and goes on without the library: relayd
then runs its Python data path (``relayd/pyplane/``). ``RELAYD_REQUIRE_FASTPATH=1`` turns
that warning into an error. A compiler that fails on the source is always an error.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
SOURCE = Path("relayd", "_fastpath.c")
LIBRARY = Path("relayd", "_fastpath.so")

# Warnings: any of them fails `.ci/lint-system.sh`, which adds -Werror. No -march: the wheel
# must run on any x86-64 machine, not only on the one that built it. No -fvisibility=hidden:
# ctypes finds the rd_* functions by their exported names.
WARNINGS = ("-Wall", "-Wextra", "-Wconversion", "-Wshadow")
CFLAGS = (
    "-O2",
    "-std=c11",
    "-fPIC",
    *WARNINGS,
    "-D_FORTIFY_SOURCE=2",
    "-fstack-protector-strong",
)
# -z defs: an unresolved symbol fails the link here instead of the dlopen on a server.
LDFLAGS = ("-shared", "-Wl,-z,defs", "-Wl,-z,relro", "-Wl,-z,now", "-Wl,-z,noexecstack")

REQUIRE_ENV = "RELAYD_REQUIRE_FASTPATH"


class BuildError(Exception):
    """The library could not be built and the build must stop."""


def compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (which may carry arguments), else cc or gcc."""
    env = os.environ.get("CC", "").strip()
    if env:
        cmd = shlex.split(env)
        return cmd if shutil.which(cmd[0]) else None
    for name in ("cc", "gcc"):
        path = shutil.which(name)
        if path is not None:
            return [path]
    return None


def compile_command(
    cc: list[str], source: Path, output: Path, extra: tuple[str, ...] = ()
) -> list[str]:
    """The full command line that turns ``source`` into the shared library ``output``."""
    return [*cc, *CFLAGS, *extra, *LDFLAGS, "-o", str(output), str(source)]


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip() not in ("", "0")


def warn_no_compiler() -> None:
    cc = os.environ.get("CC", "").strip() or "cc/gcc"
    print(
        f"WARNING: relayd: no C compiler ({cc}) found: building WITHOUT the C data plane "
        f"{LIBRARY.as_posix()}; relayd will run its slower Python data path "
        f"(set {REQUIRE_ENV}=1 to make this an error)",
        file=sys.stderr,
        flush=True,
    )


def build(output: Path, *, root: Path = ROOT, extra: tuple[str, ...] = ()) -> bool:
    """Compile the library into ``output``. False (after one warning line) when there is no
    compiler; BuildError when the compiler fails, or when there is none and the environment
    requires the library. The file appears whole or not at all: the compiler writes a
    temporary file next to it, which then replaces it (a running relayd keeps the old one)."""
    cc = compiler()
    if cc is None:
        if required():
            raise BuildError(f"{REQUIRE_ENV} is set and there is no C compiler (cc, gcc or $CC)")
        warn_no_compiler()
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        cmd = compile_command(cc, root / SOURCE, tmp, extra)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            raise BuildError(
                f"compiling {SOURCE.as_posix()} failed (exit {proc.returncode}): "
                f"{shlex.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )
        if proc.stderr.strip():
            # Warnings do not stop a user's build; lint-system.sh fails on them.
            print(proc.stderr, end="", file=sys.stderr)
        tmp.chmod(0o755)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def platform_tag() -> str:
    """The wheel tag: any Python 3, no Python ABI, this platform (``py3-none-linux_x86_64``)."""
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"py3-none-{plat}"


def main(argv: list[str] | None = None) -> int:
    import argparse  # noqa: PLC0415 - only the script needs it

    parser = argparse.ArgumentParser(description=f"Compile {SOURCE.as_posix()}.")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / LIBRARY,
        help=f"where to write the library (default: {LIBRARY.as_posix()} in the checkout)",
    )
    parser.add_argument(
        "--werror", action="store_true", help="fail on any compiler warning (the lint)"
    )
    parser.add_argument(
        "--print-command", action="store_true", help="print the compile command and exit"
    )
    args = parser.parse_args(argv)
    output: Path = args.output
    extra = ("-Werror",) if args.werror else ()
    if args.print_command:
        print(shlex.join(compile_command(compiler() or ["cc"], ROOT / SOURCE, output, extra)))
        return 0
    try:
        built = build(output, extra=extra)
    except BuildError as exc:
        print(f"hatch_build.py: {exc}", file=sys.stderr)
        return 1
    if built:
        print(f"hatch_build.py: built {output}")
    elif output.exists() and output.stat().st_mtime < (ROOT / SOURCE).stat().st_mtime:
        # Older than its source and cannot be rebuilt: the Python data path is the honest
        # fallback, not a library from another version of the source.
        output.unlink()
        print(f"hatch_build.py: removed the stale {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
else:
    try:
        from hatchling.builders.config import BuilderConfig
        from hatchling.builders.hooks.plugin.interface import BuildHookInterface
    except ImportError:  # imported outside a build (hatchling is a build requirement only)
        pass
    else:

        class FastPathBuildHook(BuildHookInterface[BuilderConfig]):
            """Compile the C data plane into the wheel, or into the tree for editables."""

            PLUGIN_NAME = "custom"
            _scratch: Path | None = None

            def initialize(self, version: str, build_data: dict[str, Any]) -> None:
                root = Path(self.root)
                try:
                    if version == "editable":
                        # The editable install imports relayd from the tree: build it there.
                        build(root / LIBRARY, root=root)
                        return
                    self._scratch = Path(tempfile.mkdtemp(prefix="relayd-fastpath-"))
                    output = self._scratch / LIBRARY.name
                    if not build(output, root=root):
                        return
                except BuildError as exc:
                    raise RuntimeError(f"relayd: {exc}") from None
                build_data["force_include"][str(output)] = LIBRARY.as_posix()
                build_data["pure_python"] = False
                build_data["tag"] = platform_tag()

            def finalize(
                self, version: str, build_data: dict[str, Any], artifact_path: str
            ) -> None:
                if self._scratch is not None:
                    shutil.rmtree(self._scratch, ignore_errors=True)
                    self._scratch = None
