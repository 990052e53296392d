"""The runs the dashboard lists, read from the store and kept between requests.

:func:`mlwf.runs.list_runs` reads every ``run.json`` each time it is called:
about a millisecond a run on a local store, a request each on S3. The
dashboard polls the list every 1.5 s, so it keeps what it read:

* the store is listed at most once per :data:`LIST_INTERVAL_S` whatever the
  number of pages open (every page shares one listing);
* a record is read again only when its size or ETag changed, or when the
  run it describes was not over when it was read (a running run's record
  changes every heartbeat without changing size). A run that ended is
  started again only by ``--resume``, which changes its status, and with it
  its record's size;
* a reply holds one page of rows (:data:`PER_PAGE`, at most :data:`MAX_PER_PAGE`),
  filtered and sorted here, never the whole list.

So with 1,000 finished runs a poll costs one listing and no record read.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

from mlwf import runs, workflows
from mlwf.engine.layout import RECORD, RUN_ID, runs_folder
from mlwf.errors import MlwfError

#: Seconds one listing of the store serves every request.
LIST_INTERVAL_S = 1.0
#: Rows a page of the runs list holds unless asked for another number, and at most.
PER_PAGE = 50
MAX_PER_PAGE = 200
#: Statuses a driver writes last: a record saying one of these changes only with its size.
_FINAL = ("succeeded", "failed", "interrupted")


def backend_of(record: dict[str, Any]) -> str | None:
    """Where a run's calls ran: its record's backend (its report's, for runs recorded before the record
    said), or ``knative (choreography)`` for a run with no driver."""
    if record.get("mode") == "choreography":
        return "knative (choreography)"
    report = record.get("report") if isinstance(record.get("report"), dict) else {}
    backend = record.get("backend") or report.get("backend")
    return backend if isinstance(backend, str) else None


class RunIndex:
    """Every run of the store, as :func:`mlwf.runs.list_runs` lists them, kept up to date cheaply."""

    def __init__(self, store, list_interval_s: float = LIST_INTERVAL_S):
        self.store = store
        self.list_interval_s = list_interval_s
        self._lock = threading.Lock()
        self._listed_at = float("-inf")
        self._folders: dict[tuple[str, str], tuple[list[tuple[str, int]], tuple]] = {}
        #: (workflow, run id) -> (the record's size and tag when read, record or None, error or None)
        self._records: dict[tuple[str, str], tuple[tuple, dict | None, str | None]] = {}
        #: run.json objects read from the store since the server started (what the cache saves).
        self.records_read = 0
        self.listings = 0
        self._rows: list[dict[str, Any]] | None = None

    def _list(self) -> None:
        folders: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
        signatures: dict[tuple[str, str], tuple] = {}
        for workflow in workflows.names():
            root = runs_folder(workflow)
            for obj in self.store.list(root):
                folder, sep, rest = obj.key[len(root):].partition("/")
                if not sep:
                    continue
                folders[workflow, folder].append((rest, obj.size))
                if rest == RECORD:
                    signatures[workflow, folder] = (obj.size, obj.etag)
        self._folders = {k: (v, signatures.get(k, ())) for k, v in folders.items()}
        self._records = {k: v for k, v in self._records.items() if k in self._folders}
        self._listed_at = time.monotonic()
        self.listings += 1

    def _record(self, key: tuple[str, str], signature: tuple) -> tuple[dict | None, str | None]:
        cached = self._records.get(key)
        if cached is not None and cached[0] == signature and signature:
            _, record, error = cached
            if record is None or runs.effective_status(record) in _FINAL:
                return record, error
        workflow, run_id = key
        try:
            record, error = runs.read_record(self.store, workflow, run_id), None
        except (MlwfError, ValueError) as e:
            record, error = None, str(e)
        self.records_read += 1
        self._records[key] = (signature, record, error)
        return record, error

    def rows(self) -> list[dict[str, Any]]:
        """Every run, newest first: :func:`mlwf.runs.list_runs`'s fields, and ``backend``, ``transfer``
        and ``model_prefix`` (where a training run published)."""
        with self._lock:
            if time.monotonic() - self._listed_at < self.list_interval_s and self._rows is not None:
                return self._rows  # made from the listing every request of this interval shares
            self._list()
            now = runs.now_utc()
            out = []
            for (workflow, run_id), (keys, signature) in self._folders.items():
                record, error = self._record((workflow, run_id), signature)
                row = runs.summarize(workflow, run_id, keys, record, error, now)
                record = record or {}
                report = record.get("report") if isinstance(record.get("report"), dict) else {}
                row["backend"] = backend_of(record)
                row["transfer"] = record.get("transfer") if isinstance(record.get("transfer"), str) else None
                row["model_prefix"] = report.get("model_prefix")
                out.append(row)
            out.sort(key=lambda r: r["run_id"], reverse=True)
            self._rows = out
        return out

    def page(self, *, q: str = "", workflow: str = "", status: str = "", backend: str = "",
             page: int = 1, per_page: int = PER_PAGE) -> dict[str, Any]:
        """One page of the runs that match: ``q`` (in the id, workflow, backend, transfer or status),
        and ``workflow``, ``status``, ``backend`` exactly; ``total`` counts every match."""
        per_page = max(1, min(int(per_page), MAX_PER_PAGE))
        found = self.rows()
        q = q.strip().lower()
        matching = [r for r in found
                    if (not workflow or r["workflow"] == workflow) and (not status or r["status"] == status)
                    and (not backend or r["backend"] == backend)
                    and (not q or any(q in str(r.get(k) or "").lower()
                                      for k in ("run_id", "workflow", "backend", "transfer", "status")))]
        pages = max(1, -(-len(matching) // per_page))
        page = max(1, min(int(page), pages))
        return {"total": len(matching), "all": len(found), "page": page, "pages": pages, "per_page": per_page,
                "runs": matching[(page - 1) * per_page: page * per_page],
                "workflows": sorted({r["workflow"] for r in found}),
                "backends": sorted({r["backend"] for r in found if r["backend"]}),
                "statuses": sorted({r["status"] for r in found}),
                "records_read": self.records_read, "listings": self.listings}

    def model_prefixes(self) -> list[str]:
        """Every prefix a training run of the store published at (the newest first), and the default."""
        from mlwf.presets import DEFAULT_MODEL_PREFIX

        prefixes = [r["model_prefix"] for r in self.rows() if r["workflow"] == "ml-training" and r["model_prefix"]]
        return list(dict.fromkeys([*prefixes, DEFAULT_MODEL_PREFIX]))


def is_run_id(text: str) -> bool:
    """Whether ``text`` is shaped like a run id mlwf makes (anything else is never looked up)."""
    return isinstance(text, str) and RUN_ID.fullmatch(text) is not None
