"""Choreography that holds at a 1,000-way fan-out and under attack (issue 26).

Real ``python -m mlwf.cli serve --sink ...`` processes on 127.0.0.1, each in
its own process, acting on one local store (a fan-out of 1,000 calls is a
few seconds there; the choreography is the same on S3, tests/test_choreography.py).
Where a Broker matters, :class:`Broker` plays one: it answers 202 to every
event, keeps it, and delivers it later when told to.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from mlwf import bulk, datasets
from mlwf.backends.knative import events
from mlwf.cli import main
from mlwf.storage import StoreSpec
from tests.httpsink import QuietHandler
from tests.s3server import free_port
from tests.test_knative import SECRET, ServeProcess

REPO = Path(__file__).resolve().parent.parent
DIGITS = "ml-training/digits"
#: The smallest training that gives 1,000 calls: 8x8 digits, one shallow tree per call, whole PCA slices.
FAST = ["--image-size", "8", "--components", "6", "--trees", "1", "--max-depth", "4", "--train-rows", "partition"]
A_STAGES = "ml-training/partition,ml-training/pca,ml-inference/partition,ml-inference/load"
B_STAGES = "ml-training/train,ml-training/score,ml-training/validation,ml-inference/predict"
TINY = "tests.tiny_workflow"
#: /proc/net/tcp's state codes.
TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


# --------------------------------------------------------------------------- what a process holds and spends
def tcp_states(pid: int, inodes_in: str | None = None) -> Counter:
    """The TCP sockets process ``pid`` holds, counted by state (read from /proc, no tool needed); with
    ``inodes_in``, the inodes of its sockets in that state instead (each counted once)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    states: Counter = Counter()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                state = TCP_STATES.get(fields[3], fields[3])
                if inodes_in is None:
                    states[state] += 1
                elif state == inodes_in:
                    states[fields[9]] = 1
    return states


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds process ``pid`` has used (every thread of it)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SocketWatch:
    """The most sockets each process left in CLOSE-WAIT (its peer gone, itself not closing) for more
    than ``stuck_s`` at once, sampled every 50 ms while it runs.

    A socket passes through CLOSE-WAIT whenever a client closes first: a driver's pool closing 32
    idle connections at once shows as 32 for the milliseconds the server's busy loop takes to close
    them. What the old dispatcher did was different: ~230 sockets left there for good.
    """

    def __init__(self, pids: list[int], stuck_s: float = 1.0):
        self.most = {pid: 0 for pid in pids}
        self.stuck_s = stuck_s
        self._since: dict[int, dict[str, float]] = {pid: {} for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            now = time.monotonic()
            for pid in self.most:
                try:
                    waiting = tcp_states(pid, inodes_in="CLOSE_WAIT")
                except OSError:
                    continue
                since = self._since[pid] = {inode: self._since[pid].get(inode, now) for inode in waiting}
                stuck = sum(1 for t in since.values() if now - t > self.stuck_s)
                self.most[pid] = max(self.most[pid], stuck)

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.most


# --------------------------------------------------------------------------- a Broker, played
class Broker:
    """A sink that keeps events, as a Broker does (202 at once), and delivers them to ``target`` when told.

    ``events`` are the CloudEvents it holds (each as sent: signed).
    """

    def __init__(self, target: str):
        self.target = target
        self.held: list[tuple[dict, bytes]] = []
        self._lock = threading.Lock()
        broker = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.body()
                with broker._lock:
                    broker.held.append(({k: v for k, v in self.headers.items()
                                         if k.lower() not in ("host", "content-length")}, body))
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def events(self) -> list:
        with self._lock:
            return [events.from_http(h, b) for h, b in self.held]

    def release(self) -> list[int]:
        """Deliver every event held (as Knative would, once), in order; the answers' statuses."""
        with self._lock:
            held, self.held = self.held, []
        with httpx.Client(timeout=60) as client:
            return [client.post(self.target, content=body, headers=headers).status_code for headers, body in held]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    env.update({"MLWF_FUNCTION_SECRET": SECRET, "MLWF_WORKFLOW_MODULES": TINY,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))})
    env.update(extra)
    return env


@pytest.fixture
def tiny_store(monkeypatch, tmp_path):
    """A fresh local store; the tiny workflow named here and in every server; the secret set."""
    monkeypatch.setenv("MLWF_WORKFLOW_MODULES", TINY)
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    url = str(tmp_path / "store")
    StoreSpec(url, "tless").open().create_bucket()
    return url


def _tiny(url: str, endpoint: str, n: int) -> str:
    from mlwf.choreography.invoke import invoke

    return invoke("tiny-squares", {"args": [list(range(1, n + 1)), n]}, endpoint, StoreSpec(url, "tless"),
                  secret=SECRET)


def _wait(url: str, run_id: str, timeout: float = 60) -> dict:
    from mlwf.choreography.invoke import wait

    store = StoreSpec(url, "tless").open()
    try:
        return wait(store, "tiny-squares", run_id, timeout=timeout)
    finally:
        store.close()


def _record(url: str, run_id: str, workflow: str = "tiny-squares") -> dict:
    return json.loads(StoreSpec(url, "tless").open().get(f"{workflow}/outputs/{run_id}/run.json"))


# --------------------------------------------------------------------------- 1,000-way fan-outs
@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """A local store with 1,300 digits (1,040 left to train on after the 20 % hold-out)."""
    root = tmp_path_factory.mktemp("scale")
    datasets.write_digits(root / "digits", n=1300)
    url = str(root / "store")
    store = StoreSpec(url, "tless").open()
    bulk.upload_dir(store, root / "digits", DIGITS, create_bucket=True)
    store.close()
    return url


def test_a_1000_way_fan_out_of_each_workflow_matches_the_driver_with_bounded_sockets_and_idle_servers(
        digits_store, tmp_path, monkeypatch, capsys):
    """Server A (partition, pca, load) and server B (train, score, validation, predict): a thousand train
    calls, then a thousand predict calls, run by their events alone as by the driver, each event sent once."""
    monkeypatch.setenv("MLWF_FUNCTION_SECRET", SECRET)
    port_a, port_b = free_port(), free_port()
    url_a, url_b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"
    sinks = [x for stage in A_STAGES.split(",") for x in ("--sink", f"{stage}={url_a}")]
    sinks += [x for stage in B_STAGES.split(",") for x in ("--sink", f"{stage}={url_b}")]
    endpoints = ["--endpoint" if x == "--sink" else x for x in sinks]
    common = ["--store", digits_store, "--bucket", "tless", "--claim-lease", "2", *sinks]
    a = ServeProcess(_env(), tmp_path / "a.log", "--stages", A_STAGES, *common, port=port_a)
    b = ServeProcess(_env(), tmp_path / "b.log", "--stages", B_STAGES, *common, port=port_b)
    a.wait_ready(), b.wait_ready()
    store = ["--store", digits_store, "--bucket", "tless", "--json"]

    def run(*argv: str) -> dict:
        code = main([*argv, *store])
        out = capsys.readouterr()
        assert code == 0, out.err + a.log()[-3000:] + b.log()[-3000:]
        return json.loads(out.out)

    watch = SocketWatch([a.proc.pid, b.proc.pid])
    try:
        training = ["ml-training", DIGITS, "2", "1000", *FAST, "--no-publish"]
        driven = run("run", *training, "--backend", "knative", *endpoints)
        choreographed = run("invoke", *training, "--endpoint", url_a, "--wait", "--timeout", "120")
        assert choreographed["choreography"] is True and choreographed["stages"]["train"]["calls"] == 1000
        assert choreographed["model_digest"] == driven["model_digest"]
        assert choreographed["validation_accuracy"] == driven["validation_accuracy"]

        run("run", "ml-training", DIGITS, "2", "4", *FAST, "--backend", "knative", *endpoints)  # the model to use
        inference = ["ml-inference", "ml-inference/model", DIGITS, "1000"]
        # The reference is the local backend's (the servers already took a 1,000-way driven run above; through
        # them this one took four times as long, and the local backend's results are the same, test_knative.py).
        driven = run("run", *inference)
        choreographed = run("invoke", *inference, "--endpoint", url_a, "--wait", "--timeout", "120")
        assert choreographed["num_funcs"] == 1000 and choreographed["num_predicted"] == 1300
        assert choreographed["accuracy"] == driven["accuracy"]
        opened = StoreSpec(digits_store, "tless").open()
        assert opened.get(choreographed["results_key"]) == opened.get(driven["results_key"])
        opened.close()
    finally:
        most = watch.stop()
        logs = a.log() + b.log()
    # Each event was delivered once: none was sent again while it waited (nothing skipped as a duplicate).
    assert logs.count("call=ml-training/train[") == 1000 and "skipped" not in logs
    assert max(most.values()) <= 4, most  # the old dispatcher left ~230 sockets in CLOSE-WAIT
    # Idle: every connection the servers opened is closed (within 3 s: their sinks close after IDLE_CLOSE_S = 2),
    # and they spend no CPU.
    deadline = time.monotonic() + 3
    try:
        while True:
            states = [tcp_states(server.proc.pid) for server in (a, b)]
            if all(s["CLOSE_WAIT"] == 0 and s["ESTABLISHED"] == 0 for s in states) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        for server_states in states:
            assert server_states["CLOSE_WAIT"] == 0 and server_states["ESTABLISHED"] == 0, server_states
        before = {s.proc.pid: cpu_seconds(s.proc.pid) for s in (a, b)}
        time.sleep(2)
        spent = {pid: cpu_seconds(pid) - used for pid, used in before.items()}
        assert all(seconds <= 0.04 for seconds in spent.values()), spent  # ~0 % (a tick is 10 ms)
    finally:
        assert a.stop() == 0 and b.stop() == 0


# --------------------------------------------------------------------------- restarts: new work first
def test_a_restarted_server_with_stale_runs_finishes_a_new_run_first(tiny_store, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    nowhere = f"http://127.0.0.1:{free_port()}"
    common = ["--store", tiny_store, "--bucket", "tless", "--claim-lease", "1"]
    # Three runs whose 120 square events wait in the first server's memory (their sink does not answer)...
    first = ServeProcess(_env(), tmp_path / "first.log", *common, "--sink", url, "--sink",
                         f"tiny-squares/square={nowhere}", "--delivery-retries", "100", port=port).wait_ready()
    store = StoreSpec(tiny_store, "tless").open()
    try:
        stale = [_tiny(tiny_store, url, 120) for _ in range(3)]
        for run in stale:
            deadline = time.monotonic() + 30
            while not store.exists(f"tiny-squares/outputs/{run}/choreography/batches/square.json"):
                assert time.monotonic() < deadline, first.log()
                time.sleep(0.05)
    finally:
        first.proc.send_signal(signal.SIGKILL)  # ...when it dies
        first.stop()
    time.sleep(4.5)  # nothing keeps them alive for their lease (four claim leases): they are stale
    second = ServeProcess(_env(), tmp_path / "second.log", *common, "--sink", url, "--threads", "2",
                          port=port).wait_ready()
    try:
        new = _tiny(tiny_store, url, 50)
        assert _wait(tiny_store, new)["sum"] == sum(n * n for n in range(1, 51))
        for run in stale:
            assert _wait(tiny_store, run)["sum"] == sum(n * n for n in range(1, 121))
    finally:
        assert second.stop() == 0
    finished = {run: _record(tiny_store, run)["updated_at"] for run in [new, *stale]}
    assert finished[new] < min(finished[run] for run in stale), finished
    log = second.log()
    assert "found 3 running choreographed runs" in log and all(f"run {run}: resuming it" in log for run in stale)


# --------------------------------------------------------------------------- dead letters
def _dead_letter(event, **attrs: str):
    """``event`` as a dead letter: with the error attributes ``attrs`` (as Knative adds them, unsigned)."""
    merged = {**event.get_attributes(), **attrs}
    return events.make_event(merged, event.get_data())


def _post(url: str, event) -> httpx.Response:
    headers, body = events.to_http(event)
    return httpx.post(url + "/dead-letter", content=body, headers=headers, timeout=30)


def test_a_replayed_modified_or_unsigned_dead_letter_changes_nothing(tiny_store, tmp_path, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    broker = Broker(url)
    server = ServeProcess(_env(MLWF_FAULTS="square:1:raise:1000"), tmp_path / "s.log", "--store", tiny_store,
                          "--bucket", "tless", "--sink", url, "--sink", f"tiny-squares/square={broker.url}",
                          "--retries", "0", port=port).wait_ready()
    attack = "ATTACKER-TEXT: run abandoned by operator"
    attack_data = base64.b64encode(attack.encode()).decode()
    try:
        run = _tiny(tiny_store, url, 4)
        deadline = time.monotonic() + 30
        while len(broker.events) < 4:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        captured = [e for e in broker.events if e.get_data()["context"]["run_id"] == run]
        square0 = next(e for e in captured if e.get_data()["call"]["index"] == 0)

        # A captured stage event, replayed as Knative's dead letter with made-up error attributes: the store
        # shows no failed delivery of it, so nothing is believed (this ended the run before).
        knative = _dead_letter(square0, knativeerrorcode="500", knativeerrordest="http://x",
                               knativeerrordata=attack_data)
        resp = _post(url, knative)
        assert resp.status_code == 409 and "cannot verify" in resp.json()["error"], resp.text
        # Unsigned, the same: refused before anything is read.
        attrs = {k: v for k, v in knative.get_attributes().items() if k != events.SIGNATURE_ATTR}
        resp = _post(url, events.make_event(attrs, knative.get_data()))
        assert resp.status_code == 401
        # Signed whole (as mlwf's dispatcher signs its own), then changed: its signature no longer holds.
        whole = dict(knative.get_attributes())
        whole[events.DEAD_SIGNATURE_ATTR] = events.sign_dead_letter(SECRET, "event", "tiny-squares", "square", run,
                                                                    whole, knative.get_data())
        changed = {**whole, "knativeerrordata": base64.b64encode(b"something else").decode()}
        resp = _post(url, events.make_event(changed, knative.get_data()))
        assert resp.status_code == 401 and events.DEAD_SIGNATURE_ATTR in resp.json()["error"]
        # A run the store does not have: 404, nothing recorded.
        ghost_run = "20261201T000000.000000Z-000000"
        ghost_ctx = {**square0.get_data()["context"], "run_id": ghost_run,
                     "outputs_prefix": f"tiny-squares/outputs/{ghost_run}"}
        ghost = events.call_event(square0.get_data()["call"], ghost_ctx, SECRET, kind="event")
        assert _post(url, _dead_letter(ghost, knativeerrordata=attack_data)).status_code == 404
        assert not StoreSpec(tiny_store, "tless").open().exists(f"tiny-squares/outputs/{ghost_run}/run.json")

        assert main(["runs", "show", run, "--store", tiny_store, "--bucket", "tless", "--json"]) == 0
        shown = capsys.readouterr().out
        assert json.loads(shown)["status"] == "running" and "ATTACKER" not in shown

        # A delivery that truly failed: square[1] fails on the server (noted in the store), and Knative's dead
        # letter of that very event ends the run, in the server's words, not the dead letter's.
        square1 = next(e for e in captured if e.get_data()["call"]["index"] == 1)
        headers, body = events.to_http(square1)
        assert httpx.post(url, content=body, headers=headers, timeout=30).status_code == 500
        real = _dead_letter(square1, knativeerrorcode="500", knativeerrordest=url, knativeerrordata=attack_data)
        resp = _post(url, real)
        assert resp.status_code == 200 and resp.json()["status"] == "failed", resp.text
        assert _post(url, real).status_code == 403  # acted on once: a replay is refused
        assert main(["runs", "show", run, "--store", tiny_store, "--bucket", "tless", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["status"] == "failed" and "InjectedFault: injected fault in square[1]" in shown["error"]
        assert "ATTACKER" not in json.dumps(shown)
    finally:
        broker.stop()
        assert server.stop() == 0
    assert "not acted on" in server.log()  # the operator sees what was refused, and why


# --------------------------------------------------------------------------- garbage collection
def test_runs_gc_long_after_the_lease_keeps_a_run_whose_events_wait_in_a_broker(tiny_store, tmp_path, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    broker = Broker(url)
    server = ServeProcess(_env(), tmp_path / "s.log", "--store", tiny_store, "--bucket", "tless", "--claim-lease",
                          "1", "--sink", url, "--sink", f"tiny-squares/square={broker.url}", port=port).wait_ready()
    try:
        run = _tiny(tiny_store, url, 8)
        store = StoreSpec(tiny_store, "tless").open()
        folder = f"tiny-squares/outputs/{run}/"
        deadline = time.monotonic() + 30
        while len(broker.events) < 8:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        time.sleep(2 * 4 + 1)  # over two leases (four claim leases each) with nothing of the run on any server
        kept = sorted(store.list_keys(folder))
        assert main(["runs", "gc", "--keep", "0", "--store", tiny_store, "--bucket", "tless", "--json"]) == 0
        collected = json.loads(capsys.readouterr().out)
        assert run not in collected["runs"] and sorted(store.list_keys(folder)) == kept
        assert {"run_id": run, "workflow": "tiny-squares", "reason": "running"} in collected["skipped"]
        assert all(status == 200 for status in broker.release())  # the Broker delivers them at last
        assert _wait(tiny_store, run)["sum"] == sum(n * n for n in range(1, 9))
        store.close()
    finally:
        broker.stop()
        assert server.stop() == 0


def test_a_stale_run_collected_emptied_or_past_its_deadline_fails_saying_so_instead_of_starting_again(
        tiny_store, tmp_path, capsys):
    """Every server is killed with three runs half done; then one is collected by mlwf runs gc, one loses its
    intermediates by hand, one passes its deadline. The restarted server recomputes none of them from nothing."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    common = ["--store", tiny_store, "--bucket", "tless", "--claim-lease", "1"]
    first = ServeProcess(_env(), tmp_path / "first.log", *common, "--sink", url, "--sink",
                         f"tiny-squares/square=http://127.0.0.1:{free_port()}", "--delivery-retries", "100",
                         port=port).wait_ready()
    store = StoreSpec(tiny_store, "tless").open()
    try:
        collected, emptied, late = runs = [_tiny(tiny_store, url, 4) for _ in range(3)]  # oldest first
        for run in runs:
            deadline = time.monotonic() + 30
            while not store.exists(f"tiny-squares/outputs/{run}/choreography/batches/square.json"):
                assert time.monotonic() < deadline, first.log()
                time.sleep(0.05)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.stop()
    time.sleep(4.5)  # stale: nothing keeps them alive
    assert main(["runs", "gc", "--keep", "2", "--store", tiny_store, "--bucket", "tless", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == [collected]
    store.delete_many(store.list_keys(f"tiny-squares/outputs/{emptied}/split/"))  # by hand
    record = json.loads(store.get(f"tiny-squares/outputs/{late}/run.json"))
    store.put(f"tiny-squares/outputs/{late}/run.json",
              json.dumps({**record, "deadline_at": "2026-01-01T00:00:00.000+00:00"}).encode())
    second = ServeProcess(_env(), tmp_path / "second.log", *common, "--sink", url, port=port).wait_ready()
    try:
        deadline = time.monotonic() + 30
        while any(_record(tiny_store, run)["status"] == "running" for run in runs):
            assert time.monotonic() < deadline, second.log()
            time.sleep(0.1)
    finally:
        assert second.stop() == 0
    errors = {run: _record(tiny_store, run) for run in runs}
    assert all(r["status"] == "failed" for r in errors.values()), errors
    assert "its intermediates were collected by mlwf runs gc" in errors[collected]["error"]
    assert errors[emptied]["error"].startswith("the intermediates of its split stage are gone") and \
        "though it went on to square" in errors[emptied]["error"]
    assert errors[late]["error"].startswith("given up: no server or event advanced it since") and \
        "its deadline (2026-01-01T00:00:00.000+00:00, --run-deadline after its start) has passed" in errors[late]["error"]
    assert " ran\n" not in second.log()  # no call run again


# --------------------------------------------------------------------------- claims under a slow store
class CopyingProxy:
    """Forwards each event to ``first`` and answers with its answer; ``delay`` seconds later, sends a copy to
    ``second`` (an at-least-once channel delivering twice, the second time late)."""

    def __init__(self, first: str, second: str, delay: float):
        proxy = self

        class Handler(QuietHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.body()
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                threading.Timer(delay, proxy._send, (second, headers, body)).start()
                resp = proxy._send(first, headers, body)
                self.send_response(resp.status_code)
                self.send_header("content-length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @staticmethod
    def _send(url: str, headers: dict, body: bytes) -> httpx.Response:
        try:
            return httpx.post(url, content=body, headers=headers, timeout=120)
        except httpx.HTTPError:
            return httpx.Response(502)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_under_a_store_slower_than_the_lease_one_claim_records_each_call_and_the_store_says_which(
        tiny_store, tmp_path):
    """Server X's every store operation takes 1.2 s, longer than its 1 s claim lease: its claims expire while
    it runs, and Y, sent each square event again 3.5 s later, takes them over. Both may run a call; one records it."""
    port_x, port_y = free_port(), free_port()
    x_url, y_url = f"http://127.0.0.1:{port_x}", f"http://127.0.0.1:{port_y}"
    proxy = CopyingProxy(x_url, y_url, delay=3.5)
    common = ["--store", tiny_store, "--bucket", "tless", "--claim-lease", "1", "--sink", y_url,
              "--sink", f"tiny-squares/square={proxy.url}"]
    x = ServeProcess(_env(MLWF_STORE_FAULTS="latency_ms:1200"), tmp_path / "x.log", *common, "--stages",
                     "tiny-squares/square", port=port_x)
    y = ServeProcess(_env(), tmp_path / "y.log", *common, port=port_y)
    x.wait_ready(), y.wait_ready()
    try:
        run = _tiny(tiny_store, y_url, 4)
        assert _wait(tiny_store, run, timeout=90)["sum"] == 1 + 4 + 9 + 16
        deadline = time.monotonic() + 30  # X's runs of the calls Y took over end, and are discarded
        while sum(x.log().count(f"run={run} call=tiny-squares/square[{i}] ") for i in range(4)) < 4:
            assert time.monotonic() < deadline, x.log()
            time.sleep(0.2)
    finally:
        proxy.stop()
        assert x.stop() == 0 and y.stop() == 0
    logs = x.log() + y.log()
    store = StoreSpec(tiny_store, "tless").open()
    for i in range(4):
        assert logs.count(f"run={run} call=tiny-squares/square[{i}] ran") == 1, logs
        done = json.loads(store.get(f"tiny-squares/outputs/{run}/square/{i}.done.json"))
        claim = json.loads(store.get(f"tiny-squares/outputs/{run}/choreography/claims/square-{i}.json"))
        # The done record names the claim whose run it is: who held it, which take-over of it, its nonce.
        assert set(done["claim"]) == {"owner", "generation", "nonce"} and done["claim"]["owner"] == claim["owner"]
        assert done["claim"]["generation"] == claim["generation"]
    assert f"run={run} call=tiny-squares/square[" in logs and "discarded: its claim (generation 0) was taken over" \
        in x.log()


# --------------------------------------------------------------------------- the dispatcher, against a real sink
class SlowSink:
    """An HTTP sink that answers each event after ``pause`` seconds, and the first delivery of every 25th call
    429 with ``Retry-After: 1``; it notes every request (event id, when, on which connection) and how many were
    in flight at once, in all and per event."""

    def __init__(self, pause: float = 0.05):
        self.requests: list[tuple[str, float, int, int]] = []  # (event id, arrived, answered status, client port)
        self.most = 0
        self.most_per_event = 0
        self.open_connections = 0
        self._active: Counter = Counter()
        self._lock = threading.Lock()
        sink = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()
                with sink._lock:
                    sink.open_connections += 1

            def finish(self) -> None:
                super().finish()
                with sink._lock:
                    sink.open_connections -= 1

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("content-length", 0)))
                event_id, arrived = self.headers["ce-id"], time.monotonic()
                index = int(self.headers["ce-subject"].split("[")[1].rstrip("]"))
                with sink._lock:
                    first = all(r[0] != event_id for r in sink.requests)
                    sink._active[None] += 1
                    sink._active[event_id] += 1
                    sink.most = max(sink.most, sink._active[None])
                    sink.most_per_event = max(sink.most_per_event, sink._active[event_id])
                time.sleep(pause)
                status = 429 if first and index % 25 == 0 else 200
                body = b'{"error": "slow down"}' if status == 429 else b'{"status": "done", "detail": "x"}'
                with sink._lock:
                    sink._active[None] -= 1
                    sink._active[event_id] -= 1
                    sink.requests.append((event_id, arrived, status, self.client_address[1]))
                self.send_response(status)
                if status == 429:
                    self.send_header("retry-after", "1")
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_the_dispatcher_streams_a_fan_out_through_a_bounded_window_honours_retry_after_and_closes_what_it_opens():
    from mlwf.choreography.sinks import IDLE_CLOSE_S, Dispatcher, Sinks
    from mlwf.engine.calls import Call, RunContext

    sink = SlowSink()
    given_up = []
    dispatcher = Dispatcher(Sinks(sink.url), SECRET, "/test", lambda *a: given_up.append(a), connections=8)
    ctx = RunContext("20261201T000000.000000Z-000001", "tiny-squares", "/tmp/x", "tless",
                     "tiny-squares/outputs/20261201T000000.000000Z-000001", "store")
    calls = [Call("tiny-squares", "square", i, {"chunk": i}) for i in range(200)]
    try:
        dispatcher.send(calls, ctx)
        assert dispatcher.pending(ctx.workflow, ctx.run_id) == {c.name for c in calls}
        deadline = time.monotonic() + 30
        while dispatcher.in_flight():
            assert time.monotonic() < deadline, dispatcher.in_flight()
            time.sleep(0.05)
        assert not given_up and not dispatcher.runs()
        delivered = Counter(r[0] for r in sink.requests if r[2] == 200)
        assert len(delivered) == 200 and set(delivered.values()) == {1}  # each event delivered once
        assert sink.most <= 8 and sink.most_per_event == 1  # the window; never two attempts of one event at once
        assert len({r[3] for r in sink.requests}) <= 8  # its connections, kept alive and reused
        for event_id in {r[0] for r in sink.requests if r[2] == 429}:  # Retry-After: 1 waited out
            first, again = sorted(r[1] for r in sink.requests if r[0] == event_id)
            assert again - first >= 1.0
        time.sleep(IDLE_CLOSE_S + 1)
        assert sink.open_connections == 0  # an idle dispatcher holds no connection
    finally:
        dispatcher.close()
        sink.stop()
