"""``mlwf runs ls|show|gc``: the runs kept in the store."""

from __future__ import annotations

import json
import sys

from mlwf.cli.options import Parser, common, open_store


def add_parsers(sub) -> None:
    """``mlwf runs ls|show|gc``."""
    runs = sub.add_parser("runs", help="runs kept in the store")
    rs = runs.add_subparsers(dest="runs_command", required=True, parser_class=Parser)
    rls = rs.add_parser("ls", help="list runs with status (running, succeeded, failed, abandoned) and stage progress")
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

    store = open_store(args)
    try:
        store.require_bucket()
        if args.runs_command == "ls":
            found = runs.list_runs(store)
            if args.json:
                print(json.dumps({"runs": found}))
            else:
                for r in found:
                    progress = "  ".join(f"{s} {p}" for s, p in r["progress"].items())
                    if r["status"] == "unreadable":
                        progress = r["error"]
                    print(f"{r['run_id']}  {r['workflow']:<12}  {r['status']:<10}  {progress}")
            return 0
        if args.runs_command == "show":
            info = runs.show_run(store, args.run_id)
            if args.json:
                print(json.dumps(info))
            else:
                from mlwf.ui import print_run

                print_run(info)
            return 0
        result = runs.gc_runs(store, args.keep)
    finally:
        store.close()
    if args.json:
        print(json.dumps(result))
        return 0
    for s in result["skipped"]:
        if s["reason"].startswith("unreadable"):
            print(f"mlwf: warning: left {s['workflow']}/outputs/{s['run_id']}/ alone: {s['reason']}", file=sys.stderr)
    running = sum(s["reason"] == "running" for s in result["skipped"])
    print(f"deleted {result['deleted']} intermediate objects of {len(result['runs'])} runs "
          f"(kept the {len(result['kept'])} newest" + (f", {running} still running" if running else "")
          + (f", {len(result['skipped']) - running} unreadable" if len(result["skipped"]) > running else "") + ")")
    return 0
