"""``mlwf serve``: every stage of both workflows as an HTTP CloudEvents function.

One ASGI app (Starlette on uvicorn) that follows the Knative Serving runtime
contract: it listens on ``$PORT`` (default 8080), answers ``GET /healthz``
(alive) and ``GET /readyz`` (ready for calls; 503 while starting or
draining), logs one line per invocation to stdout, and on SIGTERM stops
accepting connections, lets the calls in flight finish (up to ``--grace``
seconds) and exits with status 0.

``POST /`` takes a CloudEvent in binary or structured mode (see
:mod:`mlwf.backends.knative.events`), checks it, and runs the call with
:func:`mlwf.engine.runner.execute` in a worker thread, or with ``--workers N``
in one of N worker processes (the local backend's pool): with threads, the
GIL serialises CPU-bound stages, and ml-training 2k ``2 8`` through two
servers took 2.04× the local backend's time; with a worker per core, 0.98×
(2026-11-26, ``benchmarks/knative.py``).

A server acts on one store only, the one it was started with (``--store``/``--bucket``, else
``MLWF_STORE``/``MLWF_BUCKET``, as every command), opened with *this*
process's credentials (they never travel with a call): a call naming any
other store or bucket is refused, and a call writes only under its own run's
folder ``<workflow>/outputs/<run id>/``. The reply is a signed CloudEvent
``dev.mlwf.<workflow>.<stage>.done`` in the request's mode, with
``Outcome.to_json()`` as its data.

``--transfer payload``: a call carries its inputs inline and the reply its
outputs, framed after the JSON in binary mode
(:mod:`mlwf.backends.knative.frames`), base64 in the JSON in structured
mode; nothing of the state is put in the store. Such a request is as big as
the state, so ``--max-body`` (1 MiB by default, ample for store-mode calls,
which carry keys) goes up to 2 GiB (:data:`mlwf.backends.knative.events.MAX_BODY`),
and ``GET /healthz`` says what it is (``max_body``), so that a driver refuses
a call over it before sending it.

Choreography. Started with ``--sink`` (or ``K_SINK``), a server also takes
choreographed events, those carrying ``mlwfkind`` (a run's start event, or a
stage event whose server emits what comes next), and ``POST /dead-letter``;
:mod:`mlwf.choreography.service` answers them. They are checked as calls
are, except for the replay ledger below: a choreographed event may be
redelivered after a crash and must then run, and the store's claims and done
records keep it from running anything twice.

Replays. Before a call runs, the server records its event id in that store
with a create-if-absent write (:meth:`~mlwf.storage.Store.put_if_absent`:
S3 ``If-None-Match: *``, a hard link on a directory) at
``.mlwf/serve/seen/<slot>/<sha256 of the id>``, where ``<slot>`` is the signing
time (``mlwftime``, covered by the signature) in whole minutes. The call runs
only if this server's write created the object; an event seen before, by this
process (a fast in-memory check) or by any server sharing the store, also
across restarts, is refused with 403. A record of an event signed at ``t``
lives at least until ``t + --max-age + 60`` s (the 60 s are the clock
difference the servers already tolerate): after that no server accepts the
event anyway. Each server deletes such records from the whole store at most
once a minute, as calls arrive (:meth:`ReplayLedger.clean`). So a captured
event runs at most once on all the servers of one store, provided their
clocks agree within 60 s and they share the same ``--max-age``. If the store
cannot be written, the call is refused with a retryable 503 rather than run
unrecorded. The record is one more store request per call: 0.10 ms on a
directory store (median of 2,000), 3.6 ms on moto's S3 server (where a plain
200-byte PUT takes 2.5 ms), against calls of 5–500 ms. ``benchmarks/knative.py``
on the code before and after it, alternately, saw nothing beyond the spread
of a shared machine: 200 concurrent invocations, 139 and 168 requests/s
before, 165 and 167 after (2026-11-28).

Connections: every request must arrive whole within ``--request-timeout``
seconds, request heads are at most 16 KiB, and connections are limited in
number, per server and per client address, without ever locking out a health
check (see :mod:`mlwf.httpguard`).

Memory: what a request makes the process hold is taken from one budget per
process (``--max-memory``, ``MLWF_MAX_MEMORY``; :mod:`mlwf.budget`) before
it is held, and given back when the request ends: its body as it arrives (a
gzip or deflate body inflated and counted piece by piece), and the parse of
its JSON with the canonical copy its signature check makes, bounded from the
text before parsing (:func:`mlwf.httpserver.json_cost`). Numbers are checked
before they are converted (``call.index`` is a whole number 0..2**31-1).

Refusals are an HTTP status and ``{"error": "...", "retryable": bool}``; the
server stays up and nothing runs:

====  ==========================================================
400   not a CloudEvent, not JSON, or not ``{call, context}``; a
      ``call.index`` that is not a whole number 0..2**31-1; corrupt or
      truncated gzip/deflate data
400   also: a context that writes outside its run's folder, a transfer
      other than ``store`` or ``payload``, a framed payload call
      (:mod:`mlwf.backends.knative.frames`) whose inline bytes do not
      match the digests its signed JSON names, or a choreographed event
      sent framed
401   no signature, or a signature that does not match
403   signing time too old/too far ahead; an event id seen before (here or
      by a server sharing the store); a store or bucket other than this
      server's (the JSON then also has ``store`` and ``bucket``: this
      server's)
404   unknown workflow or stage, or one this server does not serve
408   the request did not arrive whole within ``--request-timeout``
413   body over ``--max-body`` (counted while reading, and again as a
      compressed body inflates), or a request that alone needs more
      memory than ``--max-memory`` (a payload call's inline inputs, and
      the outputs its reply carries, count too)
415   a ``Content-Encoding`` other than gzip or deflate
500   the stage raised: ``type`` names the error class; ``retryable`` is
      false for bad input (DataError, ModelError, UsageError,
      NotFoundError), true otherwise
503   too many invocations in the replay window, the replay record could
      not be written, too many connections, other requests holding the
      memory budget, or shutting down
====  ==========================================================
"""

from mlwf.backends.knative.server.app import App, ServeConfig
from mlwf.backends.knative.server.auth import REPLAY_PREFIX, REPLAY_SLOT_S, ReplayGuard, ReplayLedger
from mlwf.backends.knative.server.serve import parse_stages, preload, serve
from mlwf.httpserver import Refusal, parse_size

__all__ = ["App", "REPLAY_PREFIX", "REPLAY_SLOT_S", "Refusal", "ReplayGuard", "ReplayLedger", "ServeConfig",
           "parse_size", "parse_stages", "preload", "serve"]
