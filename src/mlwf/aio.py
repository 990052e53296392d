"""The process's background event loop: async I/O (S3 bulk requests, Knative calls) from plain threads.

One daemon thread per process runs one asyncio loop, created on first use (and
again in a child after ``fork``, which does not copy threads). Callers in any
other thread submit coroutines and wait for them; nothing is created per call.
The S3 store (:mod:`mlwf.storage.s3`) and the Knative backend's HTTP client
share it.

Why not anyio's blocking portal: ``anyio.from_thread.start_blocking_portal``
is a context manager whose loop lives as long as the ``with`` block, and
``BlockingPortalProvider`` stops its loop when its last user leaves, so
either would start a loop thread per operation or need an owner that keeps
one open for the life of the process. What is needed here is exactly that
process-lifetime loop, started lazily, never holding up interpreter exit,
and started afresh in a child after ``fork`` (local workers, ``mlwf serve
--workers``): the 40 lines below. anyio would also become a dependency of
every install (today only the Knative extra brings it, through httpx).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """A daemon thread running an asyncio loop; see the module docstring."""

    def __init__(self, name: str = "mlwf-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _after_fork(self) -> None:
        # The loop thread does not survive a fork; start afresh on next use.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started now if needed)."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and self._pid == os.getpid() and thread.is_alive():
            return loop
        with self._lock:
            if self._loop is None or self._pid != os.getpid() or not self._thread or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            return self._loop

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        """Schedule ``coro`` on the loop; cancelling the returned future cancels it."""
        loop = self.loop()
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("a blocking call was made from the background event loop's own thread")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (cancelled if the wait is interrupted)."""
        fut = self.submit(coro)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise


#: The one background loop of this process.
BACKGROUND = LoopThread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=BACKGROUND._after_fork)
