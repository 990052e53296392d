"""State transfer: what moving state between functions costs, per mode (store, direct, payload, shm), light and heavy.

Usage (from the repository root; Ray needs mlwf[ray], Knative mlwf[knative]):

    python benchmarks/state_transfer.py [--backends local,ray,knative] [--repeats 5]
        [--workflows ml-training,ml-inference] [--fashion DIR] [--out benchmarks/results/state_transfer]
    python benchmarks/state_transfer.py --at-60k [--repeats 3] [--backends ...]   # the study at 60k images

The study of docs/transfer.md. Data: the 2,000 Fashion-MNIST training images
and the first 1,000 test images as PNG objects in the local store
``common.prepare()`` builds. Workloads: ml-training ``2 8`` (default settings,
publishing the model) and ml-inference ``16`` functions with that model.
``--at-60k``: all 60,000 training images, and the 10,000 test images, into
``--out``'s ``60k/`` folder.

It runs ``mlwf bench`` once per backend and workflow, each time with both
state variants, into one folder (``mlwf bench`` keeps the rows of other
configurations already there), so the study's files are the ones
``mlwf bench`` writes: ``summary.csv``, ``breakdown.csv``, ``transfer.png``:

* local: ``--transfer store,direct,payload,shm --state light,heavy``;
* Ray (a local instance): ``--transfer store,direct``: Ray's ``direct`` is
  its object store, which maps NumPy arrays from shared memory on one node;
* Knative (``--backend knative`` against one loopback ``mlwf serve`` with
  two workers, ``--max-body 256MiB --max-memory 2GiB`` for the payload
  calls, ``2GiB`` and ``6GiB`` at 60k): ``--transfer store,payload``.

Every configuration must give the same model digest (training) and the same
predictions summary (inference) as local · store · light; the script checks
the accuracy column and stops if two differ. Prints, per workflow and state,
the modes ranked by median with their state-transfer time and peak memory.
Writes ``state_transfer.json`` into the folder: the table, and the commands of
every invocation that wrote into it (one per backend is fine: each keeps the
other backends' rows).
"""

from __future__ import annotations

import csv
import json
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


#: The function server the Knative runs call, per study: payload calls carry the state, so the body limit and
#: the memory budget are raised to match (a heavy partition's reply holds every decoded image: 32 MB at 2k,
#: 983 MB at 60k).
SERVER_LIMITS = {"2k": ["--max-body", "256MiB", "--max-memory", "2GiB"],
                 "60k": ["--max-body", "2GiB", "--max-memory", "6GiB"]}
#: The workloads at 60k: all 60,000 training images; the 10,000 test images with the model that training published.
WORKFLOW_ARGS_60K = {"ml-training": [TRAIN60K, "2", "8"], "ml-inference": ["ml-inference/model", TEST10K, "16"]}


def earlier_invocations(path) -> list[dict]:
    """The invocations an earlier record at ``path`` holds (read before the work: an unreadable one stops it)."""
    if not path.exists():
        return []
    try:
        previous = json.loads(path.read_text())
        if not isinstance(previous, dict):
            raise ValueError("not a JSON object")
        invocations = previous.get("invocations")
        if invocations is not None and not (isinstance(invocations, list)
                                            and all(isinstance(i, dict) for i in invocations)):
            raise ValueError("'invocations' is not a list of objects")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        sys.exit(f"{path}: cannot read the earlier record ({e}): move it away, or --out another folder")
    # A record from before invocations were kept holds one at its top level.
    return invocations or [{k: previous.get(k) for k in ("command", "date", "load_average", "commands")}]


def study(a, store: str, out, backends: list[str], workflows: list[str], size: str) -> None:
    """``mlwf bench`` per backend and workflow (both states) into ``out``; the table; ``state_transfer.json``."""
    out.mkdir(parents=True, exist_ok=True)
    earlier = earlier_invocations(out / "state_transfer.json")
    args = WORKFLOW_ARGS if size == "2k" else WORKFLOW_ARGS_60K
    # The driver and the function server share the secret that signs the calls.
    env = {**side_env(None), "MLWF_FUNCTION_SECRET": secrets.token_hex(32)}
    load_before = load_average()
    started = now()
    commands = []
    if "ml-inference" in workflows and "ml-training" not in workflows:
        # The inference runs need a published model: one training run makes it.
        subprocess.run([sys.executable, "-m", "mlwf.cli", "run", "ml-training", *args["ml-training"], "--store",
                        store, "--bucket", BUCKET], env=env, check=True, stdout=subprocess.DEVNULL)
    server = None
    try:
        for backend in backends:
            extra: list[str] = []
            if backend == "knative":
                server = Server(["serve", "--store", store, "--bucket", BUCKET, "--workers", "2",
                                 *SERVER_LIMITS[size]], ready="/readyz", env=env,
                                log=a.data / "state_transfer-serve.log")
                extra = ["--endpoint", server.url]
            for workflow in workflows:
                commands.append(" ".join(bench(workflow, backend, store, out, a.repeats, extra, env,
                                               args=args[workflow])))
            if server is not None:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
    rows = table(out)
    # Rows of other backends may come from an earlier invocation into the same folder (mlwf bench keeps
    # them): the record keeps every invocation's commands, the newest last.
    this = {"command": command(), "date": started, "load_average": {"before": load_before, "after": load_average()},
            "commands": commands}
    write(out, "state_transfer.json", {"machine": machine(), "invocations": [*earlier, this], "rows": rows})
    print(f"\nfigures: {os.path.relpath(out / 'transfer.png')}")


def main() -> None:
    p = arguments(__doc__, "state_transfer", repeats=5)
    p.add_argument("--backends", default="local,ray,knative", help="backends to measure (default local,ray,knative)")
    p.add_argument("--workflows", default="ml-training,ml-inference", help="workflows (default both)")
    p.add_argument("--at-60k", action="store_true",
                   help="the study at 60k instead: ml-training 2 8 on all 60,000 training images (about 1 GB on "
                        "the partition -> pca edge), then ml-inference on the 10,000 test images; into --out's "
                        "60k/ folder")
    a = p.parse_args()
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    workflows = [w.strip() for w in a.workflows.split(",") if w.strip()]
    if not backends or not workflows:
        sys.exit("--backends and --workflows each name at least one (e.g. --backends local --workflows ml-training)")
    for b in backends:
        if b not in TRANSFERS:
            sys.exit(f"unknown backend {b!r}: choose from {', '.join(TRANSFERS)}")
    for w in workflows:
        if w not in WORKFLOW_ARGS:
            sys.exit(f"unknown workflow {w!r}: choose from {', '.join(WORKFLOW_ARGS)}")
    if a.at_60k:
        store = prepare(a.fashion, a.data, extra=[(TRAIN60K, "train", 60000, 0)])
        study(a, store, a.out / "60k", backends, workflows, "60k")
    else:
        study(a, prepare(a.fashion, a.data), a.out, backends, workflows, "2k")


if __name__ == "__main__":
    main()
