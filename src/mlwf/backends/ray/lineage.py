"""The Ray backend's own lineage: an output Ray lost with a node is made again by the call that made it.

Ray's own task retries are off (``max_retries=0``: the driver's budget is the
only one), so Ray cannot rebuild a ``direct`` output it lost with a node (its
lineage reconstruction reruns a task only within that task's Ray retries).
:class:`~mlwf.backends.ray.backend.RayBackend` keeps its own lineage instead:
which call made each output it holds. A call that fails because an input was
lost fails with a retryable :class:`InputLost`; before the driver's retry runs
it, the calls that made its lost inputs run again (their outputs have fixed
bytes, so they come back under the same checksums), and the run's report names
them in a warning. Any further loss that retry finds is made again within it
(Ray reports lost objects one at a time); a final output the driver finds lost
is made again the same way.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future, InvalidStateError

from mlwf.engine.calls import Call, Outcome, Ref, RunContext, refs_in
from mlwf.errors import StageError, WorkerLost


class Lineage:
    """The part of :class:`~mlwf.backends.ray.backend.RayBackend` that makes lost outputs again.

    It reads the backend's ``_held`` (run id -> checksum -> ObjectRef) and runs calls with its ``submit``.
    """

    def __init__(self) -> None:
        #: Our own lineage of what is held: run id -> checksum -> the call that made it, and its run.
        self._made_by: dict[str, dict[str, tuple[Call, RunContext]]] = {}
        #: Calls run again to make lost outputs: run id -> call name -> the call and its future (shared by every
        #: call waiting for it).
        self._remade: dict[str, dict[str, tuple[Call, Future]]] = {}
        self._lineage_lock = threading.Lock()
        #: Objects Ray lost, once forgotten: run id -> object id (hex) -> the output it held.
        self._forgotten: dict[str, dict[str, str]] = {}
        #: Calls that have failed an attempt on a lost input: run id -> call names.
        self._met_loss: dict[str, set[str]] = {}

    def _forget_lost(self, call: Call, ctx: RunContext, object_hex: str) -> InputLost | None:
        """``call`` could not read an input Ray lost: forget it (every held input of the call, if Ray did not say
        which), so that the next submit makes it again; the error the driver's retry policy sees. (Another call
        may have reported the same object first: then it is forgotten already.) None if another call has
        already made that input again, so that ``call``, submitted again at once, reads the new one: two calls
        reading one lost input race, and the slower one must not spend its retry, or fail, on a loss already
        mended."""
        held = self._held.get(ctx.run_id, {})
        inputs = [r for r in refs_in(call.args.values()) if r.held_by_backend]
        with self._lineage_lock:
            if object_hex:
                lost = [r for r in inputs if r.sha256 not in held or held[r.sha256].hex() == object_hex]
            else:
                lost = inputs
            forgotten = self._forgotten.setdefault(ctx.run_id, {})
            if forgotten.get(object_hex, "") in held:
                return None
            for r in lost:
                gone = held.pop(r.sha256, None)
                if gone is not None:
                    forgotten[gone.hex()] = r.sha256
        made_by = self._made_by.get(ctx.run_id, {})
        names = ", ".join(dict.fromkeys(made_by[r.sha256][0].name if r.sha256 in made_by else r.producer
                                        for r in lost)) or "an input"
        return InputLost(f"{call.workflow} stage {call.name} failed: Ray lost the output of {names} it needs "
                         "(with a node that died?); it is made again if the call is retried",
                         forgot=[r.sha256 for r in lost])

    def _after_remaking(self, call: Call, ctx: RunContext, lost: list[Ref]) -> Future[Outcome]:
        """``call``, submitted once the calls that made ``lost`` have made them again; ``call``'s future.

        Ray reports lost inputs one at a time (a call's read stops at the first), and a node takes all it held:
        should ``call`` find another input lost, that one is made again too and ``call`` submitted once more,
        within this same attempt, as long as each round finds a new loss (or finds that the input it lost was
        made again meanwhile by another call waiting for it).
        """
        out: Future[Outcome] = Future()
        ready = self._make_again(lost, ctx, f"{call.workflow} stage {call.name}")
        def finished(f: Future) -> None:
            error = None if out.cancelled() or f.cancelled() else f.exception()
            if isinstance(error, InputLost) and self._missing(call, ctx):
                submit()  # _forget_lost dropped the next lost input: submit makes it again first
            elif isinstance(error, InputLost) and error.forgot and self._held_again(ctx, error.forgot):
                submit()  # another call waiting for the same input made it again first: read it at once
            else:
                chain(f, out)

        def submit() -> None:
            try:
                inner = self.submit(call, ctx)
            except BaseException as e:  # noqa: BLE001 - in a callback: it must reach the driver
                with contextlib.suppress(InvalidStateError):
                    out.set_exception(e)
                return
            inner.add_done_callback(finished)
            out.add_done_callback(lambda f: f.cancelled() and inner.cancel())

        def then(f: Future) -> None:
            if f.cancelled() or f.exception() is not None:
                with contextlib.suppress(InvalidStateError):
                    out.set_exception(f.exception() if not f.cancelled() else StageError(
                        f"{call.workflow} stage {call.name} failed: an input Ray lost did not come back"))
            else:
                submit()

        ready.add_done_callback(lambda f: out.cancelled() or then(f))
        out.add_done_callback(lambda f: f.cancelled() and ready.cancel())
        return out

    def _lost_again(self, call: Call, ctx: RunContext, error: BaseException) -> bool:
        """Whether ``error`` is ``call`` finding an input lost after an earlier attempt of it already did: the
        first loss costs the call an attempt (its retry makes the input again), later ones are mended within
        the attempt, so that a node taking many outputs at once costs one retry, not one per output."""
        if not isinstance(error, InputLost) or not error.forgot:
            return False
        with self._lineage_lock:
            met = self._met_loss.setdefault(ctx.run_id, set())
            again = call.name in met
            met.add(call.name)
        return again and bool(self._missing(call, ctx))

    def _held_again(self, ctx: RunContext, checksums: list[str]) -> bool:
        """Whether every one of these forgotten outputs is held again (made again by some call)."""
        held = self._held.get(ctx.run_id, {})
        return all(sha in held for sha in checksums)

    def _missing(self, call: Call, ctx: RunContext) -> list[Ref]:
        """The inputs of ``call`` that should be in Ray's object store and that this backend no longer holds."""
        held = self._held.get(ctx.run_id, {})
        return [r for r in refs_in(call.args.values()) if r.held_by_backend and r.sha256 not in held]

    def _make_again(self, lost: list[Ref], ctx: RunContext, who: str) -> Future[None]:
        """Run again the calls that made ``lost`` (forgotten outputs); done when every one of them is held again,
        else failed with the reason, which names ``who`` needed them."""
        ready: Future[None] = Future()
        made_by = self._made_by.get(ctx.run_id, {})
        makers: dict[str, Call] = {}
        for r in lost:
            if r.sha256 not in made_by:
                ready.set_exception(StageError(
                    f"{who} failed: the output of {r.producer} it needs is no longer in Ray's object store and this "
                    "driver does not know the call that made it: run again, or with --transfer store"))
                return ready
            maker = made_by[r.sha256][0]
            makers[maker.name] = maker
        remakes = [self._remake(maker, ctx) for maker in makers.values()]
        left = [len(remakes)]
        lock = threading.Lock()

        def one_done(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            failed = next((f for f in remakes if f.cancelled() or f.exception() is not None), None)
            held = self._held.get(ctx.run_id, {})
            if failed is not None:
                error = failed.exception() if not failed.cancelled() else \
                    StageError(f"{who} failed: {', '.join(makers)} did not run again")
            elif not all(r.sha256 in held for r in lost):
                error = StageError(f"{who} failed: {', '.join(makers)} ran again to make an output Ray lost, but "
                                   "did not make the same bytes")
            else:
                error = None
            with contextlib.suppress(InvalidStateError):
                if error is None:
                    ready.set_result(None)
                else:
                    ready.set_exception(error)

        for f in remakes:
            f.add_done_callback(one_done)
        ready.add_done_callback(lambda f: f.cancelled() and [r.cancel() for r in remakes])
        return ready

    def _remake(self, maker: Call, ctx: RunContext) -> Future[Outcome]:
        """``maker`` run again (once, however many calls wait for its outputs); noted for the run's report.

        If Ray lost one of ``maker``'s own inputs too, it runs once more, after the call that made that input.
        """
        with self._lineage_lock:
            remade = self._remade.setdefault(ctx.run_id, {})
            running = remade.get(maker.name)
            if running is not None and not running[1].done():
                return running[1]
            fut: Future[Outcome] = Future()
            remade[maker.name] = (maker, fut)

        def first_done(first: Future) -> None:
            if not first.cancelled() and isinstance(first.exception(), InputLost):
                try:
                    chain(self.submit(maker, ctx), fut)
                except BaseException as e:  # noqa: BLE001 - in a callback: it must reach the waiting calls
                    with contextlib.suppress(InvalidStateError):
                        fut.set_exception(e)
            else:
                chain(first, fut)

        self.submit(maker, ctx).add_done_callback(first_done)
        return fut


class InputLost(WorkerLost):
    """A call could not read an input Ray lost (with a node); retried, it first makes the input again."""

    def __init__(self, message: str, forgot: list[str] = ()):
        super().__init__(message, restart=False)
        #: The checksums of the outputs the call found lost (forgotten, to be made again).
        self.forgot = list(forgot)


def chain(inner: Future, out: Future) -> None:
    """``out`` gets ``inner``'s result or exception; cancelling ``out`` cancels ``inner``."""
    def copy(f: Future) -> None:
        with contextlib.suppress(InvalidStateError):
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

    inner.add_done_callback(copy)
    out.add_done_callback(lambda f: f.cancelled() and inner.cancel())


