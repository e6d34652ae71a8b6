"""terraform/modules/relay/files/relayd-host-check.sh against stand-ins for curl, systemctl and
the AWS CLI: the instance reports itself Unhealthy only after FAILURES checks in a row in which
relayd does not answer /healthz; a feed that is down (503) keeps the host healthy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = (
    Path(__file__).resolve().parent.parent / "terraform/modules/relay/files/relayd-host-check.sh"
)

# curl answers from files: the /healthz status, then the IMDS token, instance ID and region.
CURL = """#!/bin/bash
url=${@: -1}
case $url in
  */healthz)
    code=$(cat "$STUB/healthz")
    printf %s "$code"
    [ "$code" != 000 ] ;;
  */api/token) printf token ;;
  */instance-id) printf i-0123456789abcdef0 ;;
  */placement/region) printf eu-west-2 ;;
esac
"""
SYSTEMCTL = """#!/bin/bash
cat "$STUB/active"
[ "$(cat "$STUB/active")" = active ]
"""
AWS = """#!/bin/bash
printf '%s\\n' "$*" >>"$STUB/aws.log"
"""


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("curl", CURL), ("systemctl", SYSTEMCTL), ("aws", AWS)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return tmp_path


def check(stub: Path, healthz: str, active: str = "active") -> subprocess.CompletedProcess[str]:
    (stub / "healthz").write_text(healthz)
    (stub / "active").write_text(active)
    env = {
        **os.environ,
        "PATH": f"{stub / 'bin'}:{os.environ['PATH']}",
        "STUB": str(stub),
        "RELAYD_HOST_CHECK_STATE": str(stub / "failures"),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), "8080", "3"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def reports(stub: Path) -> list[str]:
    log = stub / "aws.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_feed_down_keeps_the_host_healthy(stub: Path) -> None:
    for _ in range(5):
        assert check(stub, "503").returncode == 0
    assert check(stub, "200").returncode == 0
    assert reports(stub) == []


def test_relayd_silent_three_times_reports_unhealthy(stub: Path) -> None:
    first, second = check(stub, "000"), check(stub, "000")
    assert (first.returncode, second.returncode) == (1, 1)
    assert "failure 2 of 3" in second.stderr
    assert reports(stub) == []
    third = check(stub, "000")
    assert third.returncode == 1
    assert reports(stub) == [
        "autoscaling set-instance-health --region eu-west-2 --instance-id i-0123456789abcdef0"
        " --health-status Unhealthy --should-respect-grace-period"
    ]


def test_an_answer_resets_the_count(stub: Path) -> None:
    check(stub, "000")
    check(stub, "000")
    assert check(stub, "503").returncode == 0
    check(stub, "000")
    check(stub, "000")
    assert reports(stub) == []


def test_relayd_stopped_counts_even_if_something_answers(stub: Path) -> None:
    for _ in range(3):
        result = check(stub, "200", active="failed")
    assert "relayd is failed" in result.stderr
    assert len(reports(stub)) == 1
