"""The helper process runs tasks in order and, however it dies, never leaves anyone waiting:
killed mid-result, killed between tasks, or shut down with work queued."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import sys
import time
from concurrent.futures import CancelledError
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType

import pytest

from sync.helper import PIPE_BYTES, HelperProcess, _serve, helper_pool

WAIT = 60  # seconds: a hang fails the test instead of stalling the suite


def _echo(value: object) -> object:
    return value


def _fail(message: str) -> None:
    raise ValueError(message)


def _sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _unsendable() -> object:
    return lambda: None  # a lambda does not pickle


def _die_mid_result() -> None:
    """In the helper: start a result message of 1 MB, write 7 bytes of it, and die."""
    frame: FrameType | None = sys._getframe()
    while frame is not None and frame.f_code is not _serve.__code__:
        frame = frame.f_back
    assert frame is not None
    results: Connection = frame.f_locals["results"]
    os.write(results.fileno(), struct.pack("!i", 1 << 20) + b"partial")
    os.kill(os.getpid(), signal.SIGKILL)


def test_tasks_run_in_order_and_their_errors_come_back():
    helper, ready = helper_pool()
    with helper:
        assert ready.result(timeout=WAIT) is True
        futures = [helper.submit(_echo, i) for i in range(50)]
        failing = helper.submit(_fail, "bad contact 7")
        unsendable = helper.submit(_unsendable)
        after = helper.submit(_echo, "after")
        assert [f.result(timeout=WAIT) for f in futures] == list(range(50))
        with pytest.raises(ValueError, match="bad contact 7"):
            failing.result(timeout=WAIT)
        with pytest.raises(RuntimeError, match="result not sendable"):
            unsendable.result(timeout=WAIT)
        assert after.result(timeout=WAIT) == "after"  # errors do not end the helper


@pytest.mark.skipif(sys.platform != "linux", reason="pipe sizes are set on Linux only")
def test_big_tasks_and_results_cross_pipes_widened_to_a_megabyte():
    """A batch's chunk (a few MB each way) crosses in a few reads and writes, not dozens,
    each of which would wait for the GIL while this process computes."""
    import fcntl

    # Unprivileged processes get at most the system's pipe-max-size (1 MiB by default).
    ceiling = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    expected = PIPE_BYTES if os.geteuid() == 0 else min(PIPE_BYTES, ceiling)
    with HelperProcess() as helper:
        for end in (helper._tasks, helper._results):
            assert fcntl.fcntl(end.fileno(), fcntl.F_GETPIPE_SZ) == expected
        big = os.urandom(3 << 20)
        assert helper.submit(_echo, big).result(timeout=WAIT) == big


async def test_it_serves_an_event_loop():
    with HelperProcess() as helper:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(helper, _echo, {"page": 1}) == {"page": 1}


def test_a_helper_killed_while_sending_a_result_fails_every_waiting_task():
    helper = HelperProcess()
    try:
        before = helper.submit(_echo, "done before")
        dying = helper.submit(_die_mid_result)
        queued = [helper.submit(_echo, i) for i in range(3)]
        assert before.result(timeout=WAIT) == "done before"
        for future in [dying, *queued]:
            with pytest.raises(BrokenProcessPool):
                future.result(timeout=WAIT)
        with pytest.raises(BrokenProcessPool):
            helper.submit(_echo, "later")
    finally:
        started = time.monotonic()
        helper.shutdown(wait=True)
        assert time.monotonic() - started < WAIT


def test_a_helper_killed_between_tasks_fails_the_next_one():
    helper = HelperProcess()
    try:
        assert helper.submit(_echo, 1).result(timeout=WAIT) == 1
        assert helper._process.pid is not None
        os.kill(helper._process.pid, signal.SIGKILL)
        helper._process.join(WAIT)
        with pytest.raises(BrokenProcessPool):
            # the submit itself may see the end first, else the future does
            helper.submit(_echo, 2).result(timeout=WAIT)
    finally:
        helper.shutdown(wait=True)


def test_shutdown_cancels_queued_tasks_and_ends_the_helper():
    helper = HelperProcess()
    assert helper.submit(_echo, 0).result(timeout=WAIT) == 0  # started
    running = helper.submit(_sleep, 1.0)
    queued = [helper.submit(_sleep, 3) for _ in range(5)]
    time.sleep(0.3)
    started = time.monotonic()
    helper.shutdown(wait=True, cancel_futures=True)
    # It waits for the running task and the one sent with it, not for all 16 s.
    assert time.monotonic() - started < 8
    assert running.result(timeout=0) == 1.0
    assert sum(f.cancelled() for f in queued) >= len(queued) - 1
    for future in queued:
        if future.cancelled():
            with pytest.raises(CancelledError):
                future.result(timeout=0)
    assert helper._process.exitcode == 0
    with pytest.raises(RuntimeError, match="after shutdown"):
        helper.submit(_echo, 1)


def test_ctrl_c_is_left_to_the_process_that_started_it():
    with HelperProcess() as helper:
        assert helper.submit(_echo, "up").result(timeout=WAIT) == "up"
        running = helper.submit(_sleep, 0.5)
        assert helper._process.pid is not None
        os.kill(helper._process.pid, signal.SIGINT)
        assert running.result(timeout=WAIT) == 0.5
        assert helper.submit(_echo, "still here").result(timeout=WAIT) == "still here"
