"""The C data plane as a build product: hatch_build.py, the wheel, and the Python fallback.

Real builds: the C compiler, ``pip wheel`` through the hatchling hook, and ctypes loading the
result; the fallback tests run relayd's loader in a child Python against a package copy
without the library.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from relayd import fastpath
from tests.appliance.machine import build_wheel

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "hatch_build.py"
NO_COMPILER = "no C compiler"
# The oldest glibc the library must load with: Amazon Linux 2023, the AMI's base, has 2.34.
GLIBC_FLOOR = (2, 34)
PLATFORM = sysconfig.get_platform().replace("-", "_").replace(".", "_")


def _script(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
        cwd=REPO,
    )


def _without(*names: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in names:
        env.pop(name, None)
    return env


def _check_library(path: Path) -> None:
    """relayd.fastpath loads it: the ABI, every struct's layout and the constants agree."""
    plane = fastpath.open_library(path)
    assert plane.name == "C"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python hatch_build.py --output DIR/_fastpath.so``: the library, or a skip without a
    C compiler (the script's own warning is the reason)."""
    out = tmp_path_factory.mktemp("fastpath") / "_fastpath.so"
    proc = _script("--output", str(out), env=_without("RELAYD_REQUIRE_FASTPATH"))
    assert proc.returncode == 0, proc.stderr
    if NO_COMPILER in proc.stderr:
        pytest.skip(proc.stderr.strip())
    assert out.is_file(), proc.stdout + proc.stderr
    return out


def test_script_builds_a_library_relayd_loads(built: Path) -> None:
    _check_library(built)
    # The build left only the library behind: its temporary file was renamed into place.
    assert sorted(p.name for p in built.parent.iterdir()) == [built.name]


def test_library_runs_on_the_appliance_glibc(built: Path) -> None:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("needs objdump (binutils) to read the library's symbol versions")
    out = subprocess.run(
        [objdump, "-T", str(built)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    versions = {tuple(int(n) for n in v.split(".")) for v in re.findall(r"GLIBC_([\d.]+)", out)}
    assert versions, out
    assert max(versions) <= GLIBC_FLOOR, f"needs glibc {max(versions)}: {out}"


def test_script_without_a_compiler_warns_and_drops_a_stale_library(tmp_path: Path) -> None:
    out = tmp_path / "_fastpath.so"
    out.write_bytes(b"an old build")
    os.utime(out, (0, 0))  # older than the source
    env = _without("RELAYD_REQUIRE_FASTPATH") | {"CC": str(tmp_path / "no-such-cc")}
    proc = _script("--output", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, proc.stderr
    assert NO_COMPILER in warnings[0]
    assert "RELAYD_REQUIRE_FASTPATH" in warnings[0]
    assert not out.exists(), "a library older than its source survived without a compiler"


def test_script_without_a_compiler_fails_when_the_library_is_required(tmp_path: Path) -> None:
    out = tmp_path / "_fastpath.so"
    env = dict(os.environ) | {"CC": str(tmp_path / "no-such-cc"), "RELAYD_REQUIRE_FASTPATH": "1"}
    proc = _script("--output", str(out), env=env)
    assert proc.returncode == 1
    assert "RELAYD_REQUIRE_FASTPATH" in proc.stderr
    assert not out.exists()


def test_script_fails_on_a_compile_error(tmp_path: Path) -> None:
    """A compiler that rejects the source is an error, not a silent pure-Python build."""
    cc = tmp_path / "failing-cc"
    cc.write_text("#!/bin/sh\necho 'fake compiler: no' >&2\nexit 3\n")
    cc.chmod(0o755)
    out = tmp_path / "_fastpath.so"
    proc = _script("--output", str(out), env=dict(os.environ) | {"CC": str(cc)})
    assert proc.returncode == 1
    assert "fake compiler: no" in proc.stderr
    assert "exit 3" in proc.stderr
    assert list(tmp_path.iterdir()) == [cc], "a failed build left files behind"


# -- the wheel, as `make dist` builds it ---------------------------------------------------------


def _wheel_files(wheel: Path) -> tuple[set[str], str]:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/WHEEL"))
        return names, zf.read(meta).decode()


def test_wheel_carries_the_library_and_a_platform_tag(built: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    wheel = build_wheel(tmp_path / "dist", REPO, env=_without("CC"))
    print(f"pip wheel: {time.monotonic() - started:.1f} s, {wheel.name}, {wheel.stat().st_size} B")
    assert wheel.name.endswith(f"-py3-none-{PLATFORM}.whl"), wheel.name
    names, meta = _wheel_files(wheel)
    assert "relayd/_fastpath.so" in names
    assert "relayd/fastpath/__init__.py" in names
    assert "Root-Is-Purelib: false" in meta
    assert f"Tag: py3-none-{PLATFORM}" in meta
    with zipfile.ZipFile(wheel) as zf:
        zf.extract("relayd/_fastpath.so", tmp_path / "unpacked")
    _check_library(tmp_path / "unpacked" / "relayd" / "_fastpath.so")
    # The build's scratch copy of the library is gone; nothing else landed in the output dir.
    assert [p.name for p in (tmp_path / "dist").iterdir()] == [wheel.name]


def test_sdist_builds_the_same_wheel(built: Path, tmp_path: Path) -> None:
    """The sdist carries the C source and the hook, not a compiled library, and a wheel built
    from it (as pip does from a source release) has the library."""
    pytest.importorskip("hatchling", reason="hatchling (a dev dependency) builds the sdist")
    proc = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "sdist", "-d", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sdist,) = tmp_path.glob("relayd-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        tf.extractall(tmp_path / "src", filter="data")
    assert {"relayd/_fastpath.c", "hatch_build.py", "pyproject.toml"} <= names
    assert "relayd/_fastpath.so" not in names
    (root,) = (tmp_path / "src").iterdir()
    wheel = build_wheel(tmp_path / "dist", root, env=_without("CC"))
    assert wheel.name.endswith(f"-py3-none-{PLATFORM}.whl"), wheel.name
    assert "relayd/_fastpath.so" in _wheel_files(wheel)[0]


def test_wheel_without_a_compiler_is_pure(tmp_path: Path) -> None:
    env = _without("RELAYD_REQUIRE_FASTPATH") | {"CC": str(tmp_path / "no-such-cc")}
    wheel = build_wheel(tmp_path / "dist", REPO, env=env)
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    names, meta = _wheel_files(wheel)
    assert "relayd/_fastpath.so" not in names
    assert "relayd/fastpath/__init__.py" in names
    assert "Root-Is-Purelib: true" in meta


# -- the Python fallback -------------------------------------------------------------------------


def test_python_datapath_does_not_load_the_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYD_DATAPATH", "python")
    assert fastpath.load() is None
    assert fastpath.describe() == "Python: RELAYD_DATAPATH=python"


@pytest.fixture
def package_without_library(tmp_path: Path) -> Path:
    """A copy of the relayd package with no ``_fastpath.so``: what a pure wheel installs."""
    dest = tmp_path / "site"
    shutil.copytree(
        REPO / "relayd",
        dest / "relayd",
        ignore=shutil.ignore_patterns("_fastpath.so", "__pycache__", "*.tmp"),
    )
    return dest


LOADER = """\
import relayd, relayd.fastpath as f
print(relayd.__file__)
try:
    lib = f.load()
except f.DataPathError as exc:
    print("DataPathError:", exc)
else:
    print("loaded" if lib is not None else "none:", f.describe())
"""


def _load_in(site: Path, datapath: str) -> list[str]:
    env = dict(os.environ) | {"PYTHONPATH": str(site), "RELAYD_DATAPATH": datapath}
    # cwd: `python -c` puts it first on sys.path, ahead of PYTHONPATH.
    proc = subprocess.run(
        [sys.executable, "-c", LOADER],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=site,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert Path(lines[0]).parent == site / "relayd", f"imported the wrong relayd: {lines[0]}"
    return lines[1:]


def test_c_datapath_without_the_library_refuses(package_without_library: Path) -> None:
    (line,) = _load_in(package_without_library, "c")
    assert line.startswith("DataPathError: RELAYD_DATAPATH=c but _fastpath.so not loadable"), line


def test_auto_datapath_without_the_library_falls_back(package_without_library: Path) -> None:
    (line,) = _load_in(package_without_library, "auto")
    assert line.startswith("none: Python: _fastpath.so not loadable"), line


def test_auto_datapath_loads_a_built_library(package_without_library: Path, built: Path) -> None:
    shutil.copy2(built, package_without_library / "relayd" / "_fastpath.so")
    assert _load_in(package_without_library, "auto") == ["loaded C"]
