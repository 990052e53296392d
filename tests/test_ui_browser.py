"""mlwf ui in a real browser: the system's headless Chromium, driven by Playwright, against the real server.

One ``mlwf ui`` process and one browser serve the whole module; the store is
filled by real small runs on the bundled digits. Every page a test opens
records the URLs it requested: none may leave the dashboard's own address.

With ``MLWF_UI_SCREENSHOTS=1`` the tests also save the main pages into
``docs/images/ui-*.png`` (docs/ui.md shows them).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from playwright import sync_api

from mlwf import bulk
from mlwf.engine.driver import Engine
from mlwf.errors import DataError
from mlwf.model.registry import publish, read_manifest
from mlwf.runs import list_runs
from mlwf.storage import StoreSpec
from tests.conftest import BATCH_PREFIX, FAST, TRAIN_PREFIX
from tests.s3server import free_port
from tests.serverprocess import ServerProcess
from tests.test_ui import write_synthetic_runs

REPO = Path(__file__).resolve().parent.parent
#: Browsers cannot be downloaded here: the system's Chromium (Debian: apt-get install chromium).
CHROMIUM = os.environ.get("MLWF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOTS = os.environ.get("MLWF_UI_SCREENSHOTS") == "1"
MODEL = "ml-inference/model"
TIMEOUT_MS = 30_000


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLWF_")}
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env["PYTHONPATH"]]) if env.get("PYTHONPATH") else src
    return env


def _start_ui(store_url: str, log: Path, *extra: str) -> ServerProcess:
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "mlwf.cli", "ui", "--store", store_url, "--port", str(port), *extra],
                           _env(), log, port, ready_path="/healthz", name="mlwf ui")
    return server.wait_ready()


@pytest.fixture(scope="module")
def filled(tmp_path_factory, digits_dir):
    """A store with two training runs (so the model has a history) and an inference run, made by the engine."""
    root = tmp_path_factory.mktemp("ui")
    url = str(root / "store")
    store = StoreSpec(url, "tless").open()
    bulk.upload_dir(store, digits_dir / "train", TRAIN_PREFIX, create_bucket=True)
    bulk.upload_dir(store, digits_dir / "batch", BATCH_PREFIX)
    with Engine(url, "tless") as engine:
        # Two seeds, two models: the model at MODEL has a version to roll back to.
        trainings = [engine.run_training(TRAIN_PREFIX, 2, 4, config=replace(FAST, seed=seed)) for seed in (0, 1)]
        inference = engine.run_inference(MODEL, BATCH_PREFIX, 3)
    bench = root / "bench"
    bench.mkdir()
    _write_bench(bench)
    yield {"url": url, "store": store, "trainings": trainings, "inference": inference, "root": root, "bench": bench}
    store.close()


def _write_bench(folder: Path) -> None:
    import csv

    from mlwf.bench.files import BREAKDOWN_COLUMNS, SUMMARY_COLUMNS

    configs = [("local", "store", 850.0), ("local", "direct", 910.0)]
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for backend, transfer, median in configs:
            w.writerow({"backend": backend, "transfer": transfer, "workflow": "ml-training", "mode": "warm",
                        "state": "light", "runs": 3, "median_ms": median, "min_ms": median - 20,
                        "max_ms": median + 30, "accuracy": 0.91})
    with open(folder / "breakdown.csv", "w", newline="") as f:
        w = csv.DictWriter(f, BREAKDOWN_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for backend, transfer, _ in configs:
            w.writerow({"backend": backend, "transfer": transfer, "workflow": "ml-training", "mode": "warm",
                        "state": "light", "run": 0, "kind": "edge", "from": "pca", "to": "train", "bytes": 52000,
                        "serialize_ms": 0.4, "transfer_ms": 1.2, "deserialize_ms": 0.5})


@pytest.fixture(scope="module")
def server(filled):
    server = _start_ui(filled["url"], filled["root"] / "ui.log", "--bench", str(filled["bench"]))
    yield server
    assert server.stop() == 0, server.log()  # SIGTERM: a clean exit


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A browser page on the dashboard at ``base`` that records every URL it requests."""

    def __init__(self, browser, base: str, width: int = 1280, height: int = 800):
        self.base = base
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requested.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def goto(self, path: str):
        return self.page.goto(self.base + path)

    def close(self) -> None:
        self.context.close()
        elsewhere = [u for u in self.requested if not (u.startswith(self.base + "/") or u.startswith("data:"))]
        assert not elsewhere, f"requests left the dashboard: {elsewhere}"
        assert not self.errors, self.errors


@pytest.fixture
def page(browser, server):
    opened = Page(browser, server.url)
    yield opened
    opened.close()


def _screenshot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        path = REPO / "docs" / "images" / f"ui-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        page.page.screenshot(path=str(path))


def _fits(page: Page) -> bool:
    """No horizontal scroll bar on the page as a whole (wide tables scroll inside their own box)."""
    return page.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


# --------------------------------------------------------------------------- the runs list
def test_the_runs_list_is_what_the_store_holds(page, filled):
    page.goto("/")
    expected = list_runs(filled["store"])
    rows = page.page.locator("#runs-body tr[data-run-id]")
    sync_api.expect(rows).to_have_count(len(expected))
    shown = rows.evaluate_all("rows => rows.map(r => [r.dataset.runId, r.dataset.workflow, r.dataset.status])")
    assert shown == [[r["run_id"], r["workflow"], r["status"]] for r in expected]
    accuracies = page.page.locator("#runs-body td[data-accuracy]").evaluate_all(
        "cells => cells.map(c => c.dataset.accuracy)")
    assert [float(a) for a in accuracies] == [r["accuracy"] for r in expected]
    assert _fits(page)
    # At 1280×800 every column shows whole: the table needs no scrolling of its own either.
    assert page.page.evaluate("[...document.querySelectorAll('.table-wrap')].every("
                              "w => w.scrollWidth <= w.clientWidth + 1)")
    _screenshot(page, "runs")
    page.page.fill("#filter-q", "ml-inference")
    sync_api.expect(rows).to_have_count(sum(r["workflow"] == "ml-inference" for r in expected))


def test_a_run_started_from_a_terminal_appears_and_succeeds_without_a_reload(page, filled):
    page.goto("/")
    rows = page.page.locator("#runs-body tr[data-run-id]")
    sync_api.expect(rows).to_have_count(len(list_runs(filled["store"])))
    before = set(rows.evaluate_all("rows => rows.map(r => r.dataset.runId)"))
    page.page.evaluate("window.notReloaded = true")
    run = subprocess.run([sys.executable, "-m", "mlwf.cli", "run", "ml-inference", MODEL, BATCH_PREFIX, "2",
                          "--store", filled["url"], "--json"], env=_env(), capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-2000:]
    run_id = json.loads(run.stdout)["run_id"]
    assert run_id not in before
    row = page.page.locator(f'#runs-body tr[data-run-id="{run_id}"]')
    sync_api.expect(row).to_have_attribute("data-status", "succeeded")
    assert page.page.evaluate("window.notReloaded") is True


def test_a_run_started_while_its_page_is_open_goes_live_to_succeeded(browser, server, filled):
    """The run's own page, opened while it runs: it ends succeeded with no reload, its retried call marked.

    One train call hangs until its 3 s timeout, then is retried: the run is
    seen running for a while, and its Gantt has a call of two attempts.
    """
    env = {**_env(), "MLWF_FAULTS": "train:0:hang:1"}
    proc = subprocess.Popen([sys.executable, "-m", "mlwf.cli", "run", "ml-training", TRAIN_PREFIX, "2", "4",
                             "--image-size", "16", "--components", "6", "--trees", "12", "--max-depth", "8",
                             "--timeout", "3", "--no-publish", "--store", filled["url"], "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    page = Page(browser, server.url)
    try:
        page.goto("/")
        newest = page.page.locator('#runs-body tr[data-status="running"] a')
        newest.first.wait_for()
        newest.first.click()
        page.page.wait_for_url("**/runs/*")
        page.page.evaluate("window.notReloaded = true")
        sync_api.expect(page.page.locator("h1 .status")).to_have_attribute("data-status", "succeeded")
        assert page.page.evaluate("window.notReloaded") is True
        done = page.page.locator("#stages .progress").evaluate_all(
            "ps => ps.map(p => [p.dataset.done, p.dataset.total])")
        assert done and all(d == t for d, t in done)
        run_id = page.page.url.rsplit("/", 1)[1]
        calls = _calls_in_trace(filled["store"], "ml-training", run_id)
        sync_api.expect(page.page.locator("#gantt .call")).to_have_count(len(calls))
        retried = page.page.locator("#gantt .call.retried")
        sync_api.expect(retried).to_have_count(1)
        assert retried.get_attribute("data-name") == "train[0]" and retried.get_attribute("data-attempts") == "2"
    finally:
        out, err = proc.communicate(timeout=120)
        page.close()
    assert proc.returncode == 0, err[-2000:]


# --------------------------------------------------------------------------- one run
def _calls_in_trace(store, workflow: str, run_id: str) -> list[dict]:
    trace = json.loads(store.get(f"{workflow}/outputs/{run_id}/trace.json"))
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "call"]


def test_a_training_run_shows_its_accuracy_confusion_matrix_and_one_bar_per_call(page, filled):
    report = filled["trainings"][-1]
    page.goto(f"/runs/{report['run_id']}")
    sync_api.expect(page.page.locator("#accuracy")).to_have_attribute("data-value", str(report["validation_accuracy"]))
    bars = page.page.locator("#gantt .call")
    calls = _calls_in_trace(filled["store"], "ml-training", report["run_id"])
    sync_api.expect(bars).to_have_count(len(calls))
    assert len(calls) == sum(s["calls"] for s in report["stages"].values())
    assert sorted(bars.evaluate_all("bs => bs.map(b => b.dataset.name)")) == sorted(c["name"] for c in calls)
    table = page.page.locator("#confusion")
    header = table.locator("thead th").all_inner_texts()[1:]
    assert header == report["classes"]
    for i, label in enumerate(report["classes"]):
        cells = table.locator(f'tbody tr[data-class="{label}"] td').all_inner_texts()
        assert [int(c) for c in cells] == report["confusion"][i]
    edges = page.page.locator("table.edges tbody tr").count()
    assert edges == len(report["edges"])
    download = page.page.locator("#trace-download")
    assert download.get_attribute("href") == f"/api/runs/{report['run_id']}/trace.json"
    assert _fits(page)
    _screenshot(page, "run")


def test_an_inference_run_shows_its_predictions_and_its_trace_downloads(page, filled):
    report = filled["inference"]
    page.goto(f"/runs/{report['run_id']}")
    sync_api.expect(page.page.locator("#predictions")).to_contain_text(str(report["num_predicted"]))
    calls = _calls_in_trace(filled["store"], "ml-inference", report["run_id"])
    sync_api.expect(page.page.locator("#gantt .call")).to_have_count(len(calls))
    with page.page.expect_download() as info:
        page.page.click("#trace-download")
    assert json.loads(Path(info.value.path()).read_text())["otherData"]["run_id"] == report["run_id"]


def test_a_failed_run_says_where_and_why(page, filled):
    with Engine(filled["url"], "tless") as engine:
        with pytest.raises(DataError):
            engine.run_inference(MODEL, "ml-inference/nothing-here", 2)
    failed = next(r for r in list_runs(filled["store"]) if r["status"] == "failed")
    page.goto(f"/runs/{failed['run_id']}")
    sync_api.expect(page.page.locator("#failure")).to_contain_text("no images under prefix")


def test_an_interrupted_run_says_the_command_that_resumes_it(page, filled):
    words = ["run", "ml-training", TRAIN_PREFIX, "2", "4", "--store", filled["url"], "--seed", "7"]
    with Engine(filled["url"], "tless", command=words) as engine:
        run = engine.start_run("ml-training", {"probe": 7})
        run.interrupted()
    page.goto(f"/runs/{run.run_id}")
    sync_api.expect(page.page.locator("h1")).to_contain_text("interrupted")
    sync_api.expect(page.page.locator("#resume")).to_have_text(
        shlex.join(["mlwf", *words, "--resume", run.run_id]))
    page.goto(f"/runs/{filled['inference']['run_id']}")  # a run that succeeded offers none
    sync_api.expect(page.page.locator("#predictions")).to_be_visible()
    assert page.page.locator("#resume").count() == 0


@pytest.mark.parametrize("path", ["/runs/not-a-run", "/runs/20261101T000000.000000Z-abcdef",
                                  "/runs/..%2F..%2Fetc%2Fpasswd", "/nowhere"])
def test_a_bad_id_is_a_404_page(page, path):
    answer = page.goto(path)
    assert answer.status == 404
    sync_api.expect(page.page.locator("h1")).to_have_text("Not found")
    sync_api.expect(page.page.locator(".message-link a")).to_be_visible()


# --------------------------------------------------------------------------- models
def _manifest(filled) -> dict:
    return read_manifest(filled["store"].get, MODEL)


def test_rollback_asks_first_then_changes_the_manifest_as_mlwf_model_rollback_would(page, filled):
    before = _manifest(filled)
    assert before["history"], "two trainings published two versions"
    page.goto("/models")
    card = page.page.locator(f'.model[data-prefix="{MODEL}"]')
    sync_api.expect(card.locator("tr.current")).to_have_attribute("data-sha256", before["sha256"])
    _screenshot(page, "models")
    card.locator("button.rollback").click()
    sync_api.expect(card.locator(".confirm")).to_be_visible()
    assert _manifest(filled)["sha256"] == before["sha256"]  # asking changed nothing
    card.locator("button.cancel").click()
    sync_api.expect(card.locator(".confirm")).to_have_count(0)
    assert _manifest(filled)["sha256"] == before["sha256"]
    card.locator("button.rollback").click()
    card.locator("button.confirm-rollback").click()
    sync_api.expect(page.page.locator("#rollback-result")).to_be_visible()
    after = _manifest(filled)
    assert after["sha256"] == before["history"][0]["sha256"]
    assert after["history"][0]["sha256"] == before["sha256"]
    assert [h["sha256"] for h in after["history"][1:]] == [h["sha256"] for h in before["history"][1:]]
    sync_api.expect(page.page.locator(f'.model[data-prefix="{MODEL}"] tr.current')).to_have_attribute(
        "data-sha256", after["sha256"])


def test_rollback_is_refused_when_a_publish_lands_between_the_look_and_the_confirm(page, filled):
    page.goto("/models")
    card = page.page.locator(f'.model[data-prefix="{MODEL}"]')
    looked = _manifest(filled)
    sync_api.expect(card.locator("tr.current")).to_have_attribute("data-sha256", looked["sha256"])
    card.locator("button.rollback").click()
    # Another publisher lands meanwhile (the older version published again).
    store = filled["store"]
    older = looked["history"][0]
    publish(store, MODEL, store.get(older["object"]), run_id=older["run_id"])
    published = _manifest(filled)
    assert published["sha256"] != looked["sha256"]
    card.locator("button.confirm-rollback").click()
    sync_api.expect(page.page.locator("#rollback-error")).to_contain_text("changed since you looked")
    assert _manifest(filled) == published  # nothing rolled back


# --------------------------------------------------------------------------- compare
def test_compare_shows_runs_and_the_bench_folder_side_by_side(page, filled):
    ids = [r["run_id"] for r in filled["trainings"]]
    page.goto("/")
    for run_id in ids:
        page.page.locator(f'#runs-body tr[data-run-id="{run_id}"] input[type=checkbox]').check()
    page.page.click("#compare-selected")
    page.page.wait_for_url("**/compare?runs=*")
    table = page.page.locator("table.compare-table")
    sync_api.expect(table.locator("thead th a")).to_have_text(ids)
    e2e = table.locator('tr[data-metric="end to end"] td').all_inner_texts()
    assert len(e2e) == 2
    edges = page.page.locator("table.compare-edges tbody tr")
    sync_api.expect(edges).to_have_count(len(filled["trainings"][0]["edges"]))
    sync_api.expect(page.page.locator("#compare svg.bars rect")).to_have_count(2)
    sync_api.expect(page.page.locator("table.bench-summary tbody tr")).to_have_count(2)
    sync_api.expect(page.page.locator("#bench svg.bars rect")).to_have_count(2)
    assert _fits(page)
    _screenshot(page, "compare")


# --------------------------------------------------------------------------- size and shape
def test_a_narrow_window_still_fits(browser, server, filled):
    page = Page(browser, server.url, width=390, height=800)
    try:
        page.goto("/")
        page.page.locator("#runs-body tr[data-run-id]").first.wait_for()
        assert _fits(page)
        page.goto(f"/runs/{filled['trainings'][0]['run_id']}")
        page.page.locator("#gantt .call").first.wait_for()
        assert _fits(page)
        if SCREENSHOTS:
            page.page.screenshot(path=str(REPO / "docs" / "images" / "ui-narrow.png"))
    finally:
        page.close()


def test_1000_runs_load_a_page_at_a_time(browser, tmp_path):
    store = StoreSpec(str(tmp_path / "store"), "tless").open()
    store.create_bucket()
    write_synthetic_runs(store, 1000)
    store.close()
    server = _start_ui(str(tmp_path / "store"), tmp_path / "ui.log")
    page = Page(browser, server.url)
    replies = []
    page.page.on("response", lambda r: replies.append(r) if "/api/runs?" in r.url else None)
    try:
        page.goto("/")
        sync_api.expect(page.page.locator("#runs-count")).to_have_text("1000 runs")
        sync_api.expect(page.page.locator("#runs-body tr[data-run-id]")).to_have_count(50)
        sync_api.expect(page.page.locator("#runs-page")).to_have_text("page 1 of 20")
        page.page.click("text=Older ›")
        sync_api.expect(page.page.locator("#runs-page")).to_have_text("page 2 of 20")
        page.page.wait_for_timeout(2000)  # a poll or two more
        bodies = [r.json() for r in replies[:]]
        assert all(len(b["runs"]) <= 50 for b in bodies) and len(bodies) >= 2
        # The server read each record once, however many polls came since.
        assert bodies[-1]["records_read"] == 1000
    finally:
        page.close()
        assert server.stop() == 0
