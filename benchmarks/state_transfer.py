"""State transfer: what moving state between functions costs, per mode (store, direct, payload, shm), light and heavy.

Usage (from the repository root; Ray needs mlwf[ray], Knative mlwf[knative]):

    python benchmarks/state_transfer.py [--backends local,ray,knative] [--repeats 5]
        [--workflows ml-training,ml-inference] [--fashion DIR] [--out benchmarks/results/state_transfer]
    python benchmarks/state_transfer.py --at-60k [--repeats 3]   # the local study at 60k images

The study of docs/transfer.md. Data: the 2,000 Fashion-MNIST training images
and the first 1,000 test images as PNG objects in the local store
``common.prepare()`` builds. Workloads: ml-training ``2 8`` (default settings,
publishing the model) and ml-inference ``16`` functions with that model.

It runs ``mlwf bench`` once per backend and workflow, each time with both
state variants, into one folder (``mlwf bench`` keeps the rows of other
configurations already there), so the study's files are the ones
``mlwf bench`` writes: ``summary.csv``, ``breakdown.csv``, ``transfer.png``:

* local: ``--transfer store,direct,payload,shm --state light,heavy``;
* Ray (a local instance): ``--transfer store,direct``: Ray's ``direct`` is
  its object store, which maps NumPy arrays from shared memory on one node;
* Knative (``--backend knative`` against one loopback ``mlwf serve`` with
  two workers, ``--max-body 256MiB --max-memory 2GiB`` for the payload
  calls): ``--transfer store,payload``.

Every configuration must give the same model digest (training) and the same
predictions summary (inference) as local · store · light; the script checks
the accuracy column and stops if two differ. Prints, per workflow and state,
the modes ranked by median with their state-transfer time and peak memory.
Writes ``state_transfer.json`` (the table and the commands) into ``--out``.
"""

from __future__ import annotations

import csv
import os
import secrets
import subprocess
import sys

from common import (BUCKET, TEST1K, TEST10K, TRAIN, TRAIN60K, Server, arguments, command, load_average, machine,
                    now, prepare, side_env, write)

TRANSFERS = {"local": "store,direct,payload,shm", "ray": "store,direct", "knative": "store,payload"}
WORKFLOW_ARGS = {"ml-training": [TRAIN, "2", "8"], "ml-inference": ["ml-inference/model", TEST1K, "16"]}


def bench(workflow: str, backend: str, store: str, out, repeats: int, extra: list[str], env,
          args: list[str] | None = None, transfers: str | None = None, states: str = "light,heavy") -> list[str]:
    argv = ["mlwf", "bench", workflow, *(args or WORKFLOW_ARGS[workflow]), "--store", store, "--bucket", BUCKET,
            "--backend", backend, "--transfer", transfers or TRANSFERS[backend], "--state", states,
            "--repeats", str(repeats), "--out", str(out), *extra]
    shown = [os.path.relpath(a) if a in (store, str(out)) else a for a in argv]
    print("$", " ".join(shown), flush=True)
    done = subprocess.run([sys.executable, "-m", "mlwf.cli", *argv[1:]], env=env)
    if done.returncode:
        sys.exit(f"mlwf bench {workflow} on {backend} failed (exit {done.returncode})")
    return shown


def table(out) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["backend"] != "baseline" and r["mode"] == "warm"]
    for workflow in sorted({r["workflow"] for r in rows}, key=lambda w: w != "ml-training"):
        accuracies = {r["accuracy"] for r in rows if r["workflow"] == workflow}
        if len(accuracies) != 1:
            sys.exit(f"{workflow}: the configurations disagree on accuracy ({sorted(accuracies)}): a transfer "
                     "or state changed what was computed")
        for state in ("light", "heavy"):
            mine = [r for r in rows if r["workflow"] == workflow and r["state"] == state]
            if not mine:
                continue
            store = next((float(r["median_ms"]) for r in mine if (r["backend"], r["transfer"]) == ("local", "store")),
                         None)
            print(f"\n{workflow} · {state} state (accuracy {next(iter(accuracies))})")
            print("| backend · transfer | median | × local store | state transfer | state bytes | peak PSS |")
            print("|---|---|---|---|---|---|")
            for r in sorted(mine, key=lambda r: float(r["median_ms"])):
                ratio = f"{float(r['median_ms']) / store:.2f}" if store else ""
                print(f"| {r['backend']} · {r['transfer']} | {float(r['median_ms']):,.0f} ms | {ratio} | "
                      f"{float(r['median_state_transfer_ms']):,.1f} ms | {int(r['state_bytes']) / 1e6:,.1f} MB | "
                      f"{r['peak_pss_mb']} MB |")
    return rows


def at_60k(a) -> None:
    """The study's command at 60k: both workflows, every local mode, both states, edges up to 1 GB.

    ml-training trains on all 60,000 training images (``2 8``); ml-inference then
    classifies the 10,000 test images (16 calls) with the model it published.
    """
    store = prepare(a.fashion, a.data, extra=[(TRAIN60K, "train", 60000, 0)])
    out = a.out / "60k"
    out.mkdir(parents=True, exist_ok=True)
    env = side_env(None)
    load_before = load_average()
    commands = [" ".join(bench("ml-training", "local", store, out, a.repeats, [], env, args=[TRAIN60K, "2", "8"])),
                " ".join(bench("ml-inference", "local", store, out, a.repeats, [], env,
                               args=["ml-inference/model", TEST10K, "16"]))]
    rows = table(out)
    write(out, "state_transfer.json", {"command": command(), "date": now(), "machine": machine(),
                                       "load_average": {"before": load_before, "after": load_average()},
                                       "commands": commands, "rows": rows})
    print(f"\nfigures: {os.path.relpath(out / 'transfer.png')}")


def main() -> None:
    p = arguments(__doc__, "state_transfer", repeats=5)
    p.add_argument("--backends", default="local,ray,knative", help="backends to measure (default local,ray,knative)")
    p.add_argument("--workflows", default="ml-training,ml-inference", help="workflows (default both)")
    p.add_argument("--at-60k", action="store_true",
                   help="instead: the local backend's whole study (every mode, both states) at 60k: "
                        "ml-training 2 8 on all 60,000 training images (about 1 GB on the partition -> pca "
                        "edge), then ml-inference on the 10,000 test images; into --out's 60k/ folder")
    a = p.parse_args()
    if a.at_60k:
        return at_60k(a)
    backends = [b for b in a.backends.split(",") if b]
    workflows = [w for w in a.workflows.split(",") if w]
    for b in backends:
        if b not in TRANSFERS:
            sys.exit(f"unknown backend {b!r}: choose from {', '.join(TRANSFERS)}")
    store = prepare(a.fashion, a.data)
    a.out.mkdir(parents=True, exist_ok=True)
    # The driver and the function server share the secret that signs the calls.
    env = {**side_env(None), "MLWF_FUNCTION_SECRET": secrets.token_hex(32)}
    load_before = load_average()
    commands = []
    if "ml-inference" in workflows and "ml-training" not in workflows:
        # The inference runs need a published model: one training run makes it.
        subprocess.run([sys.executable, "-m", "mlwf.cli", "run", "ml-training", TRAIN, "2", "8", "--store", store,
                        "--bucket", BUCKET], env=env, check=True, stdout=subprocess.DEVNULL)
    server = None
    try:
        for backend in backends:
            extra: list[str] = []
            if backend == "knative":
                # Payload calls carry the state: a heavy partition's reply holds every decoded image
                # (32 MB at 2k), so the body limit and the work budget are raised to match.
                server = Server(["serve", "--store", store, "--bucket", BUCKET, "--workers", "2",
                                 "--max-body", "256MiB", "--max-memory", "2GiB"], ready="/readyz",
                                env=env, log=a.data / "state_transfer-serve.log")
                extra = ["--endpoint", server.url]
            for workflow in workflows:
                commands.append(" ".join(bench(workflow, backend, store, a.out, a.repeats, extra, env)))
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
    rows = table(a.out)
    write(a.out, "state_transfer.json", {"command": command(), "date": now(), "machine": machine(),
                                          "load_average": {"before": load_before, "after": load_average()},
                                          "commands": commands, "rows": rows})
    print(f"\nfigures: {os.path.relpath(a.out / 'transfer.png')}")


if __name__ == "__main__":
    main()
