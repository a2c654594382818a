"""check_once: a check that outlives its interval fails, and takes its children with it."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from discovery.node.health import check_once
from discovery.procs import pid_alive


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return not pid_alive(pid)


def test_a_timed_out_check_is_killed_with_its_whole_process_group(tmp_path):
    pid_file = tmp_path / "background.pid"
    argv = ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; sleep 300"]
    background = None
    try:
        started = time.monotonic()
        assert asyncio.run(check_once(argv, 1.0)) is False, "a check that outlives the interval fails"
        assert time.monotonic() - started < 5, "the check was stopped at the interval"
        background = int(pid_file.read_text())
        assert _wait_gone(background, 1.0), "the check's background child was killed with the shell"
    finally:
        # whatever the outcome, leave no sleep behind: kill the check's process group
        if background is None and pid_file.exists():
            try:
                background = int(pid_file.read_text())
            except ValueError:
                pass
        if background is not None and pid_alive(background):
            try:
                os.killpg(os.getpgid(background), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_passing_and_a_failing_check_report_their_exit_status():
    assert asyncio.run(check_once(["true"], 1.0)) is True
    assert asyncio.run(check_once(["false"], 1.0)) is False


def test_a_check_gets_its_own_time_limit_or_the_interval():
    from discovery.errors import ValidationError
    from discovery.state.model import HealthSpec

    assert HealthSpec("true", interval=0.5).time_limit() == 1.0, "the interval, at least 1 s"
    assert HealthSpec("true", interval=5).time_limit() == 5
    assert HealthSpec("true", interval=0.5, timeout=30).time_limit() == 30, "slow checks (Docker's --health-timeout)"
    with pytest.raises(ValidationError, match="--health-timeout"):
        HealthSpec("true", timeout=0)
