"""The concurrent call loop: submit, wait, time out, retry. The only place a call is attempted again.

:func:`run_concurrently` submits every call to the backend at once, waits
for them, and on each failure asks the run's
:class:`~mlwf.engine.retry.RetryPolicy`: a retryable error is submitted again
after a pause; a call past its stage's timeout, or one whose backend lost its
workers (:class:`~mlwf.errors.WorkerLost` with ``restart``), makes the backend
``cancel_all()`` and every call in flight go again. Anything else ends the
run with the error's own one-line message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any

from mlwf.engine.calls import Call, Outcome, RunContext
from mlwf.engine.retry import RetryPolicy
from mlwf.errors import MlwfError, StageError, WorkerLost


def run_concurrently(calls: list[Call], *, backend, ctx: RunContext, policy: RetryPolicy,
                     timeout_for: Callable[[str], float], on_attempt: Callable[[Call], None],
                     on_done: Callable[[Call, Outcome], None]) -> None:
    """Run ``calls`` on ``backend`` until each has an outcome (``on_done``) or one fails for good.

    ``on_attempt`` is told of every attempt that ended (done, failed or timed
    out). Raises the failing call's :class:`~mlwf.errors.MlwfError` (any other
    exception as a :class:`StageError` naming the call); calls still in flight
    are then cancelled.
    """
    pending: dict[Any, tuple[Call, int, float]] = {}  # future -> (call, attempt, deadline)

    def submit(call: Call, attempt: int, pause: bool = False) -> None:
        if pause:
            time.sleep(policy.pause(attempt))
        deadline = time.monotonic() + timeout_for(call.stage)
        pending[backend.submit(call, ctx)] = (call, attempt, deadline)

    def give_up_or_restart(call: Call, attempt: int, why: str) -> None:
        """The backend lost or stuck a worker: restart it and resubmit everything in flight."""
        if attempt + 1 >= policy.attempts:
            raise StageError(f"{call.workflow} stage {call.name} failed: {why} ({attempt + 1} attempts)")
        in_flight = [(c, a) for c, a, _ in pending.values()] + [(call, attempt)]
        for fut in pending:
            fut.cancel()
        pending.clear()
        backend.cancel_all()
        for c, a in in_flight:
            submit(c, a + 1)

    try:
        for call in calls:
            submit(call, 0)
        while pending:
            timeout = max(0.0, min(d for _, _, d in pending.values()) - time.monotonic())
            done, _ = wait(list(pending), timeout=timeout, return_when=FIRST_COMPLETED)
            if not done:
                fut, (call, attempt, _) = min(pending.items(), key=lambda kv: kv[1][2])
                on_attempt(call)
                del pending[fut]
                give_up_or_restart(call, attempt, f"timed out after {timeout_for(call.stage):g} s")
                continue
            for fut in done:
                if fut not in pending:
                    continue  # cancelled by a restart in this same batch
                call, attempt, _ = pending.pop(fut)
                on_attempt(call)
                try:
                    outcome = fut.result()
                except WorkerLost as e:
                    if not e.restart:
                        if not policy.should_retry(e, attempt):
                            raise
                        submit(call, attempt + 1, pause=True)
                        continue
                    # The backend lost its workers with this call: every call in flight goes again.
                    give_up_or_restart(call, attempt, "its worker process died")
                    break
                except Exception as e:  # noqa: BLE001 - the policy decides from the error
                    if not policy.should_retry(e, attempt):
                        if isinstance(e, MlwfError):
                            raise
                        # An engine failure, not the stage's own error.
                        raise StageError(f"{call.workflow} stage {call.name} failed: "
                                         f"{type(e).__name__}: {e}") from e
                    submit(call, attempt + 1, pause=True)
                    continue
                on_done(call, outcome)
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
