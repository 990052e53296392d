"""``mlwf runs ls|show|gc``: the runs kept in the store."""

from __future__ import annotations

import json
import sys

from mlwf.cli.options import Parser, common, open_store


def add_parsers(sub) -> None:
    """``mlwf runs ls|show|gc``."""
    runs = sub.add_parser("runs", help="runs kept in the store")
    rs = runs.add_subparsers(dest="runs_command", required=True, parser_class=Parser)
    rls = rs.add_parser("ls", help="list runs with status (running, succeeded, failed, interrupted, abandoned), "
                                   "start, duration, accuracy and progress, and what they keep in the store")
    common(rls)
    rsh = rs.add_parser("show", help="one run: parameters, status, per-stage figures, accuracy, "
                                     "confusion matrix, where its outputs are")
    rsh.add_argument("run_id", metavar="RUN_ID", help="the run's id, as 'mlwf runs ls' lists it")
    common(rsh)
    rgc = rs.add_parser("gc", help="delete intermediate outputs of old finished or abandoned runs "
                                   "(never a run.json, results or a model)")
    rgc.add_argument("--keep", type=int, required=True, help="keep the N newest runs of each workflow")
    common(rgc)


def handle(args) -> int:
    from mlwf import runs
    from mlwf.engine import shm

    store = open_store(args)
    where = {"store": store.location, "bucket": store.bucket}
    try:
        store.require_bucket()
        if args.runs_command == "ls":
            found = runs.list_runs(store)
            listing = {**where, "bytes": sum(r["bytes"] for r in found),
                       "intermediate_bytes": sum(r["intermediate_bytes"] for r in found), "runs": found}
            if args.json:
                print(json.dumps(listing))
            else:
                from mlwf.terminal import print_runs

                print_runs(listing)
            return 0
        if args.runs_command == "show":
            info = runs.show_run(store, args.run_id)
            if args.json:
                print(json.dumps(info))
            else:
                from mlwf.terminal import print_run

                print_run(info)
            return 0
        # What each run keeps, read before: what the collected runs freed.
        before = {r["run_id"]: r["intermediate_bytes"] for r in runs.list_runs(store)}
        result = runs.gc_runs(store, args.keep)
        # Shared-memory segments of --transfer shm drivers that were killed: this machine's, not the store's.
        result["shm_segments"] = shm.remove_orphans()
    finally:
        store.close()
    result = {**where, **result, "keep": args.keep, "freed_bytes": sum(before.get(r, 0) for r in result["runs"])}
    if args.json:
        print(json.dumps(result))
        return 0
    for s in result["skipped"]:
        if s["reason"].startswith("unreadable"):
            print(f"mlwf: warning: left {s['workflow']}/outputs/{s['run_id']}/ alone: {s['reason']}", file=sys.stderr)
    print(gc_summary(result))
    return 0


def gc_summary(result: dict) -> str:
    """What ``mlwf runs gc`` did, in one line: what it deleted, and what it kept and why."""
    from mlwf.terminal import size

    running = sum(s["reason"] == "running" for s in result["skipped"])
    unreadable = sum(s["reason"].startswith("unreadable") for s in result["skipped"])
    others = len(result["skipped"]) - running - unreadable
    collected = len(result["runs"])
    kept = len(result["kept"])
    left = [f"{running} still running"] * bool(running) + [f"{unreadable} unreadable"] * bool(unreadable) \
        + [f"{others} left alone"] * bool(others)
    keep = result["keep"]
    kept_text = [f"kept the {keep} newest run{'s' if keep != 1 else ''} of each workflow whole "
                 f"({kept} run{'s' if kept != 1 else ''})"] if keep else []
    segments = result.get("shm_segments", 0)
    left += [f"removed {segments} shared-memory segment{'s' if segments != 1 else ''} of killed drivers"] \
        * bool(segments)
    return (f"deleted {result['deleted']} intermediate objects ({size(result['freed_bytes'])}) of {collected} "
            f"run{'s' if collected != 1 else ''}" + "".join(f"; {text}" for text in kept_text + left)
            + " (run records, results and models are never deleted)")
