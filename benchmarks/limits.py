"""Limits: what hostile images cost a decoding process, before the work budgets and after.

Usage (from the repository root, with mlwf installed):

    python benchmarks/limits.py [--before COMMIT] [--cpu-limit 120] [--out benchmarks/results/limits]

Every crafted file of ``tests/test_image_bombs.py`` (``SKIPPED``: too many
pixels for their bytes, endless progressive scans, truncated data, formats mlwf
does not decode; made by ``tests/crafted_images.py``) is decoded once by each
side, ``mlwf.images.decode_many(…, 64)``, in a process of its own capped at
``--cpu-limit`` seconds of CPU: the ``src`` of ``--before`` (default
``6af1af2``: main with the budget module, before images were bounded, issue
24; extracted with ``git archive``) and this tree. Recorded per file and side:
CPU seconds, the peak resident memory the decode added (VmHWM above the
process's size before it), and what happened (decoded, or the reason it was
refused). No MLWF_ variable is passed on: each side runs with its defaults
(after: a 512 MiB budget). What ordinary images cost to decode before and
after is measured by ``throughput.py --measures decode``.
Writes ``limits.json`` into ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import (ROOT, arguments, before_argument, command, load_average, machine, now, short_commit, side_env,
                    source_of, write)

BEFORE = "6af1af2"

_CHILD = r"""
import json, resource, sys, time
sys.path.append(sys.argv[1])
resource.setrlimit(resource.RLIMIT_CPU, (int(sys.argv[3]), int(sys.argv[3])))
import mlwf, mlwf.images
from tests import test_image_bombs as bombs
data = bombs.SKIPPED[sys.argv[2]][0]
mlwf.images.decode_many([bombs.craft.encode(bombs.craft.noise((28, 28), "L"))], 64)
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(field))
before = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
cpu = time.process_time()
pixels, refused = mlwf.images.decode_many([data], 64)
reason = str(refused[0]) if isinstance(refused, dict) and refused else ("refused" if refused else "decoded")
print(json.dumps({"cpu_s": round(time.process_time() - cpu, 3),
                  "peak_mib": round((status("VmHWM:") - before) / 2**20, 1), "result": reason, "mlwf": mlwf.__file__}))
"""


def hostile(before_src: Path, cpu_limit: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests import test_image_bombs as bombs

    out = {}
    for name in bombs.SKIPPED:
        out[name] = {}
        for side, src in (("before", before_src), ("after", None)):
            done = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), name, str(cpu_limit)], capture_output=True,
                                  text=True, env=side_env(src), cwd=ROOT, timeout=3 * cpu_limit + 60)
            out[name][side] = json.loads(done.stdout) if done.returncode == 0 else \
                {"result": f"process ended with {done.returncode} (CPU limit: {cpu_limit} s)"}
            out[name][side].pop("mlwf", None)
        print(f"{name}: {out[name]['before']} → {out[name]['after']}", file=sys.stderr, flush=True)
    return out


def table(r: dict) -> str:
    def cell(x: dict) -> str:
        if "cpu_s" not in x:
            return x["result"]
        what = "decoded" if x["result"] == "decoded" else ("refused" if x["result"] == "refused" else "refused: "
                                                                                                        + x["result"])
        return f"{x['cpu_s']:.2f} s CPU, {x['peak_mib']:,.0f} MiB; {what}"

    lines = [f"| hostile file | before `{r['before']}` | after |", "|---|---|---|"]
    for name, sides in r["hostile"].items():
        lines.append(f"| {name} | {cell(sides['before'])} | {cell(sides['after'])} |")
    return "\n".join(lines)


def main() -> None:
    p = arguments(__doc__, "limits")
    before_argument(p, BEFORE, "main with the budget module, before images were bounded")
    p.add_argument("--cpu-limit", type=int, default=120, help="seconds of CPU a decoding process may use (default 120)")
    a = p.parse_args()
    result = {"machine": machine(), "date": now(), "command": command(), "before": short_commit(a.before),
              "load_average": {"start": load_average()}}
    with source_of(a.before) as before_src:
        result["hostile"] = hostile(before_src, a.cpu_limit)
    result["load_average"]["end"] = load_average()
    write(a.out, "limits.json", result)
    print(table(result))


if __name__ == "__main__":
    main()
