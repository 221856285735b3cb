"""One helper process for bulk work, as a `concurrent.futures.Executor` that cannot hang.

`ProcessPoolExecutor` (CPython 3.11) hangs for good when its worker is killed (SIGKILL, the
out-of-memory killer) while writing a result: its manager thread has read part of the message
and waits for the rest, and the pipe never reaches end of file because this process holds
its write end too. Here the helper's ends of both pipes are closed in this process, so a
helper that dies anywhere, mid-message included, is an end of file: every waiting future
fails with `BrokenProcessPool` and the caller goes on without it.

Tasks run one at a time, in the order submitted. A sender thread writes them (`IN_FLIGHT` at
a time), so `submit` never waits for the helper; a receiver thread reads the results.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

from sync.collector import tune_for_bulk

__all__ = ["HelperProcess", "helper_pool"]

Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]
# Tasks sent to the helper at once: one running, one waiting in the pipe so that it never
# idles between tasks. The rest wait here, where `shutdown(cancel_futures=True)` can cancel them.
IN_FLIGHT = 2
# Bytes a pipe holds (Linux's default 64 KiB; 1 MiB is what an unprivileged process may ask).
# A task or result of a few MB crosses a narrow pipe in dozens of reads or writes, and the
# thread doing them takes the GIL back after each one, waiting up to the switch interval
# (5 ms) while this process's main thread computes. With 64 KiB pipes a batch's preparing
# helper ran at 0.7 of a core; with 1 MiB, at 0.92 (docs/benchmarks.md, twelfth stop).
PIPE_BYTES = 1 << 20


class HelperProcess(Executor):
    """A spawned helper process (spawn: a forked copy of a process with threads and open
    connections is unsafe). It ends with this process, or at `shutdown`."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        task_out, task_in = context.Pipe(duplex=False)  # (receiving end, sending end)
        result_out, result_in = context.Pipe(duplex=False)
        _widen(task_in)
        _widen(result_out)
        self._process = context.Process(
            target=_serve, args=(task_out, result_in, os.getpid()), daemon=True
        )
        self._process.start()
        task_out.close()  # the helper's ends: only it holds them now
        result_in.close()
        self._tasks, self._results = task_in, result_out
        self._outbox: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._waiting: deque[Future[Any]] = deque()  # sent, in order: results come so
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)  # fewer than IN_FLIGHT tasks sent
        self._holding: Future[Any] | None = None  # the task the sender waits to send
        self._broken = False
        self._closed = False
        self._sender = threading.Thread(target=self._send, name="helper-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="helper-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if kwargs:
            raise TypeError("HelperProcess.submit takes positional arguments only")
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot submit after shutdown")
            if self._broken:
                raise BrokenProcessPool("the helper process ended")
            future: Future[Any] = Future()
            self._outbox.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if cancel_futures:
            self._cancel_queued()
        self._outbox.put(None)  # after the tasks queued before it: the helper ends
        if wait:
            self._sender.join()
            self._receiver.join()
            self._process.join()
            self._results.close()

    def _cancel_queued(self) -> None:
        with self._lock:
            holding = self._holding
        if holding is not None:
            holding.cancel()
        kept: list[Task | None] = []
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                break
            if item is not None and not item[0].cancel():
                kept.append(item)
        for item in kept:
            self._outbox.put(item)

    def _send(self) -> None:
        while (item := self._outbox.get()) is not None:
            future, fn, args = item
            with self._lock:
                self._holding = future
                self._free.wait_for(lambda: len(self._waiting) < IN_FLIGHT or self._broken)
                self._holding = None
                if not future.set_running_or_notify_cancel():
                    continue
                if self._broken:
                    future.set_exception(BrokenProcessPool("the helper process ended"))
                    continue
                self._waiting.append(future)
            try:
                self._tasks.send((fn, args))
            except (OSError, ValueError):  # the helper is gone (EPIPE); _receive fails it
                break
        self._tasks.close()  # the helper reads end of file and ends

    def _receive(self) -> None:
        while True:
            try:
                ok, value = self._results.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._waiting.popleft()
                self._free.notify()
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        with self._lock:
            self._broken = True
            failed = list(self._waiting)
            self._waiting.clear()
            self._free.notify_all()
        for future in failed:
            future.set_exception(BrokenProcessPool("the helper process ended"))
        self._drain()

    def _drain(self) -> None:
        """Fail the tasks still queued (the helper is gone) so nobody waits on them."""
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._outbox.put(None)  # the sender's signal to end
                return
            if item[0].set_running_or_notify_cancel():
                item[0].set_exception(BrokenProcessPool("the helper process ended"))


def _widen(end: Connection) -> None:
    """Make the pipe behind `end` hold `PIPE_BYTES` where the system allows it."""
    setting = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only
    if setting is not None:
        with contextlib.suppress(OSError):  # above the system's pipe-max-size: keep it
            fcntl.fcntl(end.fileno(), setting, PIPE_BYTES)


def _serve(tasks: Connection, results: Connection, parent: int) -> None:
    """The helper's loop: run each task received, send back (ok, result or exception)."""
    _helper_started(parent)
    while True:
        try:
            fn, args = tasks.recv()
        except EOFError:
            return
        try:
            out: tuple[bool, Any] = (True, fn(*args))
        except Exception as exc:  # the caller's future gets it
            out = (False, exc)
        try:
            message = ForkingPickler.dumps(out)
        except Exception as exc:  # the result or its exception does not pickle
            message = ForkingPickler.dumps((False, RuntimeError(f"result not sendable: {exc!r}")))
        try:
            results.send_bytes(message)
        except OSError:  # this process's parent is gone
            return


def _helper_started(parent: int) -> None:
    """In a helper process: end with the process that started it (a SIGKILLed sync or
    worker would otherwise leave it waiting forever), and collect garbage for bulk work.
    Ctrl-C reaches the whole process group: the process that started it decides what to do
    (it ends the helper by closing the pipes), so the helper does not die with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        # PR_SET_PDEATHSIG: SIGTERM when the parent's thread that spawned us ends.
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request was in place
        os._exit(1)
    tune_for_bulk()


def _ready() -> bool:
    return True


def helper_pool() -> tuple[HelperProcess, Future[bool]]:
    """A helper process for bulk work, and a future that is done once it has started (it
    imports for a second or more; callers work on here until then)."""
    helper = HelperProcess()
    return helper, helper.submit(_ready)
