"""``mlwf invoke``: start a choreographed run with one signed event, and follow it through the store.

The counterpart of the reference's ``curl_cmd.sh``: one CloudEvent of type
``dev.mlwf.<workflow>.start`` (kind ``start``, signed as every call is),
POSTed to the service (or the Broker) that takes it. Its data::

    {"run_id": <new run id>, "started_at": <now>,
     "invocation": {"args": [the workflow's arguments], "options": {...}},
     "context": {run id, workflow, store, bucket, run folder}}

The service checks the arguments exactly as ``mlwf run`` does and answers 202
once the run is recorded and its first stages are on their way, or 400 with
the same one-line error. :func:`wait` then follows the run's record
(``run.json``) in the store until it ends.
"""

from __future__ import annotations

import time
from typing import Any

from mlwf.backends.knative import events
from mlwf.backends.knative.backend import check_url
from mlwf.errors import MlwfError, NotFoundError, StageError, UsageError, one_line
from mlwf.storage import StoreSpec, join_key

DEFAULT_WAIT_S = 3600.0
#: Times a start is sent at most (the same run id each time).
START_ATTEMPTS = 3
_POLL_S = 0.2
_ERROR_CLASSES = {"UsageError": UsageError, "NotFoundError": NotFoundError}


def start_event(workflow: str, run_id: str, invocation: dict[str, Any], spec: StoreSpec, secret: str | None):
    """The signed start event of run ``run_id`` on the store ``spec``."""
    from mlwf.runs import now_utc, timestamp

    canonical = spec.canonical()  # named as a server compares it
    context = {"run_id": run_id, "workflow": workflow, "store_url": canonical.url, "bucket": canonical.bucket,
               "outputs_prefix": join_key(workflow, "outputs", run_id), "transfer": "store"}
    data = {"run_id": run_id, "started_at": timestamp(now_utc()), "invocation": invocation, "context": context}
    event_id, stamp = events.new_event_id(), events.now_stamp()
    attrs: dict[str, Any] = {"type": events.event_type(workflow, "start"), "source": "/mlwf/invoke", "id": event_id,
                             "datacontenttype": events.JSON_TYPE, "subject": run_id, events.TIME_ATTR: stamp,
                             events.KIND_ATTR: "start"}
    if secret is not None:
        attrs[events.SIGNATURE_ATTR] = events.sign(secret, "start", workflow, "start", run_id, data, event_id, stamp)
    return events.make_event(attrs, data)


def invoke(workflow: str, invocation: dict[str, Any], endpoint: str, spec: StoreSpec, *,
           secret: str | None = None, timeout: float = 60.0, attempts: int = START_ATTEMPTS, client=None) -> str:
    """Start a run of ``workflow`` at ``endpoint``; return its run id.

    A start that gets no answer, or a 429/502/503/504, is sent again (up to
    ``attempts`` times in all, with backoff) under the same run id: a service
    that started the run already finds its record with the same invocation and
    starts nothing twice. ``secret``: the shared secret (default
    ``MLWF_FUNCTION_SECRET`` from this process's settings). ``client``: an
    ``httpx.Client`` to send with (reused across starts), else a new one.

    Raises
    ------
    UsageError
        For a bad endpoint, or arguments the service refused (the service's
        line), or a service that refuses the event (its status and reason).
    StageError
        If the service cannot be reached or keeps failing.
    """
    import httpx

    from mlwf.engine.layout import new_run_id

    if not isinstance(endpoint, str) or not endpoint.strip():
        raise UsageError("mlwf invoke needs --endpoint URL: the service (or Broker) that takes start events")
    endpoint = check_url(endpoint.strip(), endpoint)
    if secret is None:
        from mlwf.settings import Settings

        secret = Settings.resolve().function_secret
    secret = events.read_secret(secret, who="mlwf invoke")
    run_id = new_run_id()
    last = "no attempt"
    for attempt in range(attempts):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        headers, body = events.to_http(start_event(workflow, run_id, invocation, spec, secret))
        try:
            post = httpx.post if client is None else client.post
            resp = post(endpoint, content=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {one_line(e, 300) or 'no answer'}"
            continue
        if 200 <= resp.status_code < 300:
            return run_id
        try:
            err = resp.json()
        except ValueError:
            err = {}
        text = err["error"] if isinstance(err, dict) and isinstance(err.get("error"), str) else \
            (one_line(resp.text, 300) or resp.reason_phrase)
        if resp.status_code in (429, 502, 503, 504):
            last = f"{resp.status_code}: {text}"
            continue
        if resp.status_code == 400 and isinstance(err, dict) and err.get("type"):
            raise _ERROR_CLASSES.get(str(err["type"]), MlwfError)(text)
        if resp.status_code >= 500:
            raise StageError(f"{endpoint} could not start the run ({resp.status_code}): {text}")
        hint = {401: "; the service and this machine must share the same MLWF_FUNCTION_SECRET",
                404: "; is --endpoint a service started with --sink, serving this workflow?"}.get(resp.status_code, "")
        raise UsageError(f"{endpoint} refused the start of {workflow} ({resp.status_code}: {text}){hint}")
    raise StageError(f"cannot start {workflow} at {endpoint} after {attempts} attempts: {last}")


def wait(store, workflow: str, run_id: str, *, timeout: float = DEFAULT_WAIT_S, poll: float = _POLL_S) -> dict[str, Any]:
    """Follow run ``run_id`` through its record until it ends; return its report.

    A choreographed run that nothing keeps alive for a while (every server
    down, say) is not given up here before its deadline: a server's resumer
    takes it up again when one starts.

    Raises
    ------
    StageError
        If the run failed (its stage and reason), was abandoned (past its
        deadline, for a choreographed run), or is still running after
        ``timeout`` seconds.
    """
    from mlwf.runs import effective_status, read_record

    deadline = time.monotonic() + timeout
    while True:
        try:
            record = read_record(store, workflow, run_id)
        except NotFoundError:
            record = None
        except ValueError as e:
            raise StageError(f"run {run_id}'s record is unreadable ({e})") from None
        if record is not None:
            status = effective_status(record)
            if status == "succeeded" and isinstance(record.get("report"), dict):
                return record["report"]
            if status == "failed":
                stage = record.get("failed_stage")
                raise StageError(f"run {run_id} failed" + (f" at {stage}" if stage else "")
                                 + f": {record.get('error') or 'no reason recorded'}")
            if status == "abandoned" and _given_up(record):
                raise StageError(f"run {run_id} was abandoned: nothing renewed its lease in {record.get('lease_s')} s"
                                 + (f" and its deadline ({record['deadline_at']}) has passed"
                                    if record.get("deadline_at") else ""))
        if time.monotonic() > deadline:
            raise StageError(f"run {run_id} is still {'not started' if record is None else 'running'} after "
                             f"{timeout:g} s: follow it with 'mlwf runs show {run_id}'")
        time.sleep(poll)


def _given_up(record: dict[str, Any]) -> bool:
    """Whether an abandoned run is beyond recovery: a driver's at once, a choreographed one past its deadline."""
    if record.get("mode") != "choreography":
        return True
    from mlwf.choreography.steps import deadline_of

    return time.time() > deadline_of(record)
