"""The Ray backend: every stage call is a Ray task, on a local Ray instance or an existing cluster.

The task runs exactly what a local worker runs, :func:`mlwf.engine.runner.execute`,
so stage code never sees Ray. What this module adds is where calls run and how
``--transfer direct`` moves state:

* ``store``: outputs are objects in the store, as on every backend;
* ``direct``: each output goes into Ray's object store as its own object (a
  uint8 array, so a consumer on the same node reads it zero-copy), and the
  driver hands only its ObjectRef on to the consuming task. The task is a
  streaming generator that yields the outputs and then its
  :class:`~mlwf.engine.calls.Outcome`; the caller (the driver) owns what it
  yields, so outputs outlive the worker process that made them and Ray can
  rebuild them from lineage. (Ray returns values of at most 100 KB inline to
  their owner rather than through the shared-memory store; larger ones never
  touch the driver.)

A worker process that dies mid-call is retried by Ray (``max_retries``); a
stage's own error is not (the driver decides). Start-up is quiet and bounded:
no dashboard, worker output stays in Ray's log files, and an address where no
cluster answers fails within ``connect_timeout`` seconds with one line.

A local Ray instance started here goes with the driver: at :meth:`close`, and
also when the driver is killed (``kill -9``), a reaper process
(:class:`mlwf.engine.lifeline.Reaper`) kills whatever Ray processes are left,
which Ray's own agents would otherwise outlive by a minute or more.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np
import ray

from mlwf.engine import lifeline, runner
from mlwf import workflows
from mlwf.engine.calls import Call, Outcome, Ref, RunContext, is_refs, refs_in
from mlwf.engine.local import _FORWARDED_ENV
from mlwf.errors import MlwfError, StageError, UsageError

#: Seconds to wait for a cluster at ``address`` before giving up (env: MLWF_RAY_CONNECT_TIMEOUT).
CONNECT_TIMEOUT = 15.0

_lock = threading.Lock()
_users = 0  # RayBackend instances between start() and close()
_ours = False  # True when this module called ray.init (so it calls ray.shutdown)
_reaper: lifeline.Reaper | None = None  # kills what is left of the local instance we started


# --------------------------------------------------------------------------- the task (runs in a Ray worker)
_thread_limit: int | None = None


def _prepare_worker(env_names: list[str], cpus: float) -> None:
    """Match the driver's environment (runtime_env added its variables) and pin BLAS threads."""
    global _thread_limit
    keep = set(env_names)
    for name in [k for k in os.environ if k.startswith(_FORWARDED_ENV) and k not in keep]:
        del os.environ[name]
    limit = max(1, int(cpus))
    if _thread_limit != limit:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limit)
        _thread_limit = limit


def _fetch_inputs(call: Call, held: dict[str, Any]) -> tuple[Call, list[float], tuple[float, float, int] | None]:
    """Give every input the backend holds its bytes, from Ray's object store (zero-copy where Ray can).

    ``held`` maps the checksum of each such input to its ObjectRef. Returns the
    call, the get time (ms) of each input reference in the order
    :func:`runner.execute` resolves them, and the span of the gets.
    """
    order = list(refs_in(call.args.values()))
    wanted = [r for r in order if r.held_by_backend]
    if not wanted:
        return call, [0.0] * len(order), None
    t = time.time()
    values = ray.get([held[r.sha256] for r in wanted])
    t1 = time.time()
    total = sum(r.nbytes for r in wanted) or 1
    got = {id(r): v for r, v in zip(wanted, values)}
    ms = [((t1 - t) * 1e3 * r.nbytes / total) if id(r) in got else 0.0 for r in order]

    def swap(r: Ref) -> Ref:
        return replace(r, data=got[id(r)]) if id(r) in got else r

    args = {}
    for name, v in call.args.items():
        if isinstance(v, Ref):
            args[name] = swap(v)
        elif is_refs(v):
            args[name] = [swap(x) for x in v]
        else:
            args[name] = v
    return replace(call, args=args), ms, (t, t1, sum(r.nbytes for r in wanted))


def _run_call(call: Call, ctx: RunContext, env_names: list[str], cpus: float, held: dict[str, Any]):
    """The Ray task: run one call; yield each inline output (in :meth:`Outcome.refs` order), then the Outcome."""
    _prepare_worker(env_names, cpus)
    call, get_ms, span = _fetch_inputs(call, held)
    outcome = runner.execute(call, ctx)
    if span is not None:
        t, t1, nbytes = span
        outcome.durations_ms["input_get_ms"] = outcome.durations_ms.get("input_get_ms", 0.0) + (t1 - t) * 1e3
        outcome.bytes["input_bytes"] = outcome.bytes.get("input_bytes", 0) + nbytes
        outcome.spans.insert(0, ("input_get", t, t1))
        if len(get_ms) == len(outcome.input_edges):
            for edge, ms in zip(outcome.input_edges, get_ms):
                edge["transfer_ms"] += ms
    parts = []

    def keep(ref: Ref) -> Ref:
        if ref.data is None:
            return ref
        parts.append(np.frombuffer(ref.data, dtype=np.uint8))
        return replace(ref, data=None)  # held by the backend from now on

    outcome.outputs = {name: [keep(r) for r in v] if isinstance(v, list) else keep(v)
                       for name, v in outcome.outputs.items()}
    if parts:
        # Ray serializes and stores each yielded part before it resumes us.
        t = time.time()
        for part in parts:
            yield part
        t1 = time.time()
        outcome.durations_ms["put_ms"] = outcome.durations_ms.get("put_ms", 0.0) + (t1 - t) * 1e3
        outcome.spans.append(("put", t, t1))
    yield outcome


_remote = ray.remote(_run_call)


# --------------------------------------------------------------------------- connecting
_PROBE = r"""
import sys
try:
    from ray._raylet import GcsClient
    from ray._private.services import canonicalize_bootstrap_address
except Exception:
    print("skip")
    sys.exit(0)
try:
    address = canonicalize_bootstrap_address(sys.argv[1])
    if address is None:
        raise ConnectionError("no running Ray instance found on this machine")
    GcsClient(address=address).cluster_id
except Exception as e:
    lines = str(e).strip().splitlines()
    print("error", type(e).__name__ + ":", lines[0] if lines else "")
else:
    print("ok")
"""


def _split_address(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _local_ips() -> set[str]:
    ips = {"127.0.0.1", "::1", "0.0.0.0", "localhost", socket.gethostname()}
    try:
        ips.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    try:
        ips.add(ray.util.get_node_ip_address())
    except Exception:  # noqa: BLE001 - best effort
        pass
    return ips


def _is_local_address(address: str | None) -> bool:
    if address in (None, "", "local", "auto"):
        return True
    parsed = _split_address(address)
    if parsed is None:
        return False
    host = parsed[0]
    return host.startswith("127.") or host in _local_ips()


def probe(address: str, timeout: float) -> None:
    """Make sure a Ray cluster answers at ``address`` within ``timeout`` seconds.

    Raises :class:`UsageError` (one line) otherwise. Ray's own client retries
    for minutes and logs every attempt, so the check runs first: a TCP connect,
    then Ray's GCS client in a child process that is killed at the deadline.
    """
    deadline = time.monotonic() + timeout
    where = f"no Ray cluster answers at {address}"
    hint = ("check --ray-address / RAY_ADDRESS (the head node's GCS address, HOST:6379), "
            "or leave it unset to start a local Ray instance")
    parsed = _split_address(address) if address != "auto" else None
    if parsed is not None:
        try:
            with socket.create_connection(parsed, timeout=max(0.1, timeout)):
                pass
        except TimeoutError:
            raise UsageError(f"{where} (no answer within {timeout:g} s): {hint}") from None
        except OSError as e:
            raise UsageError(f"{where} ({e.strerror or e}): {hint}") from None
    left = max(0.5, deadline - time.monotonic())
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                             timeout=left, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{where} (nothing that speaks Ray's protocol answered within {timeout:g} s): "
                         f"{hint}") from None
    result = (out.stdout.strip().splitlines() or ["error no answer"])[-1]
    if result in ("ok", "skip"):
        return
    detail = result.removeprefix("error ").strip()
    if detail.startswith("AuthenticationError"):
        raise UsageError(f"the Ray cluster at {address} requires an authentication token: set "
                         "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) as for the cluster; see "
                         "https://docs.ray.io/en/latest/ray-security/token-auth.html")
    raise UsageError(f"{where} ({detail[:200]}): {hint}")


# --------------------------------------------------------------------------- the backend
class RayBackend:
    """Runs calls as Ray tasks.

    Parameters
    ----------
    address : the cluster to join (``HOST:PORT`` of the head's GCS, or ``auto``);
        default ``$RAY_ADDRESS``, else a local Ray instance started for this
        backend and shut down by :meth:`close`. If Ray is already initialised
        in this process, that connection is used (and left open).
    stage_resources : per-stage requests, e.g. ``{"train": {"num_cpus": 2,
        "memory": 512 * 2**20}}`` (memory in bytes); other stages take 1 CPU.
    max_retries : times Ray reruns a call whose worker process died.
    shared_store : the local-directory store is a shared file system mounted at
        the same path on every node; without it a directory store is refused
        on a cluster with nodes on other hosts.
    store_url : the run's store, if known now (the command line passes it), so
        that rule is checked before connecting; otherwise at the first call.
    connect_timeout : seconds to wait for the cluster at ``address``.
    """

    name = "ray"
    #: ``direct`` passes outputs task to task through Ray's object store.
    transfers = ("store", "direct")

    def __init__(self, address: str | None = None, *, stage_resources: dict[str, dict[str, Any]] | None = None,
                 max_retries: int = 3, shared_store: bool = False, store_url: str | None = None,
                 connect_timeout: float | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address and self.address.startswith("ray://"):
            raise UsageError(f"--ray-address {self.address}: Ray Client (ray://) addresses are not supported; give "
                             "the head's GCS address HOST:6379, or run mlwf on the cluster "
                             "(ray job submit -- mlwf run …)")
        if self.address not in (None, "auto", "local") and _split_address(self.address) is None:
            raise UsageError(f"--ray-address {self.address!r} is not HOST:PORT (the head's GCS address, "
                             "e.g. 10.0.0.5:6379) or 'auto'")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise UsageError(f"max_retries must be 0 or more, got {max_retries!r}")
        self.max_retries = max_retries
        self.shared_store = shared_store
        self.store_url = store_url
        if connect_timeout is None:
            try:
                connect_timeout = float(os.environ.get("MLWF_RAY_CONNECT_TIMEOUT", CONNECT_TIMEOUT))
            except ValueError:
                connect_timeout = float("nan")
        if not (isinstance(connect_timeout, (int, float)) and 0 < connect_timeout <= 3600):
            raise UsageError(f"MLWF_RAY_CONNECT_TIMEOUT must be a number of seconds between 0 and 3600, got "
                             f"{os.environ.get('MLWF_RAY_CONNECT_TIMEOUT', connect_timeout)!r}")
        self.connect_timeout = connect_timeout
        self.resources = self._check_requests(stage_resources or {})
        self._joined = False
        self._collector: ThreadPoolExecutor | None = None
        self._checked_stores: set[str] = set()
        self._options: dict[tuple, Any] = {}
        self._in_flight: dict[int, Any] = {}  # id(future) -> the task's ObjectRefGenerator
        #: Outputs held in Ray's object store (direct transfer): run id -> checksum -> ObjectRef.
        self._held: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_requests(requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for stage, req in requests.items():
            stages = workflows.stage_order()
            if stage not in stages:
                raise UsageError(f"unknown stage {stage!r} in the per-stage resources: stages are "
                                 f"{', '.join(stages)}")
            unknown = set(req) - {"num_cpus", "memory"}
            if unknown:
                raise UsageError(f"stage {stage}: unknown resource {sorted(unknown)[0]!r}: use num_cpus or memory")
            cpus = req.get("num_cpus", 1)
            memory = req.get("memory")
            if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not cpus > 0:
                raise UsageError(f"stage {stage}: CPUs must be a positive number, got {cpus!r}")
            if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
                raise UsageError(f"stage {stage}: memory must be a positive number of bytes, got {memory!r}")
            out[stage] = {"num_cpus": cpus, **({"memory": memory} if memory else {})}
        return out

    def _request(self, stage: str) -> dict[str, Any]:
        return self.resources.get(stage, {"num_cpus": 1})

    def start(self) -> None:
        """Join (or start) Ray, then check the store rule and that every request fits a node."""
        global _users, _ours
        if self._joined:
            return
        if self.store_url is not None:
            self._check_store_before_connecting(self.store_url)
        with _lock:
            if not ray.is_initialized():
                self._init()
                _ours = True
            _users += 1
            self._joined = True
        try:
            self._check_resources()
            if self.store_url is not None:
                self._check_store(self.store_url)
        except BaseException:
            self.close()
            raise
        self._collector = ThreadPoolExecutor(1, thread_name_prefix="mlwf-ray")

    def _init(self) -> None:
        global _reaper
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if self.address is None or self.address == "local":
            before = lifeline.children(os.getpid())
            try:
                ray.init(address="local", **quiet)
            except Exception as e:  # noqa: BLE001 - Ray raises many kinds; say what happened in one line
                raise UsageError(f"could not start a local Ray instance: {_first_line(e)}") from None
            # The processes ray.init just started are the instance's (gcs_server, raylet, ...).
            _reaper = lifeline.Reaper(lifeline.children(os.getpid()) - before)
            return
        probe(self.address, self.connect_timeout)
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.ERROR)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"could not join the Ray cluster at {self.address}: {_first_line(e)}") from None

    def _check_resources(self) -> None:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        biggest = (max((n.get("CPU", 0) for n in nodes), default=0),
                   max((n.get("memory", 0) for n in nodes), default=0))
        for stage in [*self.resources, "*"]:
            req = self._request(stage) if stage != "*" else {"num_cpus": 1}
            cpus, memory = req["num_cpus"], req.get("memory", 0)
            if any(n.get("CPU", 0) >= cpus and n.get("memory", 0) >= memory for n in nodes):
                continue
            what = "every stage" if stage == "*" else f"stage {stage}"
            asks = f"{cpus:g} CPU" + ("s" if cpus != 1 else "") + (f" and {memory / 2**20:.0f} MB" if memory else "")
            raise UsageError(
                f"{what} asks for {asks} per call, but no node of the Ray cluster has that much (largest node: "
                f"{biggest[0]:g} CPUs, {biggest[1] / 2**20:.0f} MB; cluster: {total.get('CPU', 0):g} CPUs on "
                f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}): lower --stage-cpus/--stage-memory or add nodes")

    def _store_rule(self, store_url: str, where: str) -> UsageError:
        return UsageError(
            f"the store {store_url} is a directory on this machine, but {where}: use an S3 store "
            "(--store s3://), or pass --shared-store if that directory is a shared file system mounted at the "
            "same path on every node")

    def _check_store_before_connecting(self, store_url: str) -> None:
        if self.shared_store or store_url.startswith("s3://") or _is_local_address(self.address):
            return
        raise self._store_rule(store_url, f"the Ray cluster at {self.address} is on another host")

    def _check_store(self, store_url: str) -> None:
        """Refuse a directory store when some node of the cluster is on another host."""
        if store_url in self._checked_stores:
            return
        if not (self.shared_store or store_url.startswith("s3://")):
            here = _local_ips()
            remote = sorted({n.get("NodeManagerAddress", "") for n in ray.nodes()
                             if n.get("Alive") and n.get("NodeManagerAddress") not in here})
            if remote:
                raise self._store_rule(store_url, f"the Ray cluster has nodes on other hosts ({', '.join(remote[:3])})")
        self._checked_stores.add(store_url)

    # ------------------------------------------------------------------ calls
    def submit(self, call: Call, ctx: RunContext) -> Future[Outcome]:
        if not self._joined:
            self.start()
        self._check_store(ctx.store_url)
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
        req = self._request(call.stage)
        key = (call.workflow, call.stage, tuple(sorted(env.items())))
        task = self._options.get(key)
        if task is None:
            options = dict(num_cpus=req["num_cpus"], max_retries=self.max_retries, retry_exceptions=False,
                           num_returns="streaming", name=f"mlwf {call.workflow}/{call.stage}")
            if "memory" in req:
                options["memory"] = req["memory"]
            if env:
                options["runtime_env"] = {"env_vars": env}
            if len(self._options) > 64:
                self._options.clear()
            task = self._options[key] = _remote.options(**options)
        held = self._held.get(ctx.run_id, {})
        inputs = {r.sha256: held[r.sha256] for r in refs_in(call.args.values()) if r.held_by_backend}
        gen = task.remote(call, ctx, sorted(env), req["num_cpus"], inputs)
        out: Future[Outcome] = Future()
        self._in_flight[id(out)] = gen
        collector = self._collector

        def finished(done: Future) -> None:
            try:
                collector.submit(self._collect, done, gen, call, out, self._held.setdefault(ctx.run_id, {}))
            except RuntimeError:  # closed meanwhile
                out.cancel()

        gen.completed().future().add_done_callback(finished)
        out.add_done_callback(lambda f: (self._in_flight.pop(id(f), None), f.cancelled() and _cancel(gen)))
        return out

    @staticmethod
    def _collect(done: Future, gen, call: Call, out: Future, held: dict[str, Any]) -> None:
        """Turn a finished task into its Outcome, keeping its output parts in ``held`` (off Ray's callback thread)."""
        if out.cancelled():
            return
        try:
            exc = done.exception()
            if exc is not None:
                raise exc
            refs = list(gen)
            outcome: Outcome = ray.get(refs[-1])
            parts = refs[:-1]
            for ref, part in zip([r for r in outcome.refs() if r.held_by_backend], parts):
                held[ref.sha256] = part
            result, error = outcome, None
        except BaseException as e:  # noqa: BLE001 - becomes the Future's exception
            result, error = None, _error(e, call)
        try:
            if error is None:
                out.set_result(result)
            else:
                out.set_exception(error)
        except InvalidStateError:
            pass  # cancelled meanwhile

    def read(self, ref: Ref) -> bytes:
        """The bytes of an output held in Ray's object store (the driver reading a final result)."""
        for held in self._held.values():
            if ref.sha256 in held:
                return bytes(ray.get(held[ref.sha256]))
        raise StageError(f"the output of {ref.producer} (SHA-256 {ref.sha256}) is no longer in Ray's object store")

    def end_run(self, run_id: str) -> None:
        """Let Ray free what the run's calls handed on (direct transfer)."""
        self._held.pop(run_id, None)

    def reset(self) -> None:
        """Stop every call still running (the driver gave up on them: stuck or timed out).

        Ray replaces dead workers by itself; a stuck call's worker is killed
        (``ray.cancel(force=True)``), as the local backend kills its pool.
        """
        for key, gen in list(self._in_flight.items()):
            _cancel(gen, force=True)
            self._in_flight.pop(key, None)

    def close(self) -> None:
        global _users, _ours, _reaper
        if self._collector is not None:
            self._collector.shutdown(wait=False, cancel_futures=True)
            self._collector = None
        with _lock:
            if not self._joined:
                return
            self._joined = False
            _users -= 1
            if _users == 0 and _ours:
                _ours = False
                ray.shutdown()
                if _reaper is not None:
                    _reaper.close()
                    _reaper = None


def _cancel(gen, force: bool = False) -> None:
    try:
        ray.cancel(gen, force=force)
    except Exception:  # noqa: BLE001 - already finished or gone
        pass


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _error(e: BaseException, call: Call) -> BaseException:
    """A Ray failure as the one-line error the driver acts on."""
    from ray import exceptions as rx

    if isinstance(e, rx.RayTaskError):
        cause = e.cause
        if isinstance(cause, MlwfError):
            return cause
        return StageError(f"{call.workflow} stage {call.name} failed on Ray: {_first_line(cause or e)}")
    if isinstance(e, (rx.WorkerCrashedError, rx.NodeDiedError, rx.LocalRayletDiedError)):
        return StageError(f"{call.workflow} stage {call.name} failed: its Ray worker died (Ray retried it; "
                          f"see the worker logs under /tmp/ray/session_latest/logs)")
    if isinstance(e, rx.RuntimeEnvSetupError):
        return StageError(f"{call.workflow} stage {call.name} failed: Ray could not set up its environment: "
                          f"{_first_line(e)}")
    if isinstance(e, MlwfError):
        return e
    return StageError(f"{call.workflow} stage {call.name} failed on Ray: {_first_line(e)}")
