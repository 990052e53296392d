"""What every benchmark suite shares: the data, the machine, the code before a change, the figures' form.

Not a suite itself (``python benchmarks/common.py --help`` says so). The suites
import it as ``common``:

* ``arguments(doc, suite)``: the options every suite takes (``--fashion``,
  ``--data``, ``--repeats``, ``--out``), the output folder defaulting to
  ``benchmarks/results/<suite>/``, where the results page reads it;
* ``prepare(fashion, data)``: the Fashion-MNIST image sets as PNG objects in a
  local store under ``benchmarks/data/`` (git-ignored), written once;
* ``source_of(commit)``: the ``src`` folder of an earlier commit, extracted
  with ``git archive``, for a same-run comparison against it (put first on
  ``PYTHONPATH`` by ``side_env``);
* ``Server``: an ``mlwf serve`` or ``mlwf model serve`` process on 127.0.0.1;
* ``warm()``, ``stats()``, ``machine()``, ``now()``, ``load_average()``,
  ``write()``: what every results file records the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

TRAIN = "ml-training/fashion-2k"
TRAIN60K = "ml-training/fashion-60k"
TEST1K = "ml-inference/images-inference-1k"
TEST10K = "ml-inference/fashion-test-10k"
BUCKET = "tless"


def default_fashion() -> Path:
    """``$MLWF_FASHION``, else the first ``shared/datasets/fashion-mnist`` found above the checkout."""
    if os.environ.get("MLWF_FASHION"):
        return Path(os.environ["MLWF_FASHION"])
    for parent in ROOT.parents:
        candidate = parent / "shared/datasets/fashion-mnist"
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared/datasets/fashion-mnist"


def arguments(doc: str, suite: str, repeats: int = 5) -> argparse.ArgumentParser:
    """The options every suite takes: where the data is and goes, how often to run, where the figures go."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion", type=Path, default=default_fashion(),
                   help="folder with the Fashion-MNIST IDX files (default: $MLWF_FASHION, else "
                        "shared/datasets/fashion-mnist above the checkout)")
    p.add_argument("--data", type=Path, default=HERE / "data",
                   help="where the PNG store is built (default benchmarks/data, git-ignored)")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per measure (default {repeats})")
    p.add_argument("--out", type=Path, default=RESULTS / suite,
                   help=f"folder for the figures (default benchmarks/results/{suite})")
    return p


def before_argument(p: argparse.ArgumentParser, default: str | None = None, what: str = "") -> None:
    """``--before COMMIT``: the code to compare the working tree with, in the same run."""
    p.add_argument("--before", default=default, metavar="COMMIT",
                   help=f"compare with the src/ of this commit, alternating in the same run"
                        f"{f' (default {default}: {what})' if default else ''}")


def prepare(fashion: Path, data: Path, extra: list[tuple[str, str, int, int]] = ()) -> str:
    """Write the image sets (and ``extra`` ones: ``(prefix, "train"|"t10k", n, offset)``) into the store.

    The sets: 2,000 training images (``TRAIN``), the first 1,000 and all 10,000
    test images. Returns the store's URL (a local folder).
    """
    from mlwf import bulk, datasets
    from mlwf.storage import StoreSpec

    if not (fashion / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"no Fashion-MNIST IDX files in {fashion}: give the folder with --fashion DIR")
    store_url = str((data / "store").resolve())
    store = StoreSpec(store_url, BUCKET).open()
    sets = [(TRAIN, "train", 2000, 0), (TEST1K, "t10k", 1000, 0), (TEST10K, "t10k", 10000, 0), *extra]
    for prefix, kind, n, offset in sets:
        folder = data / prefix.replace("/", "_")
        if not folder.exists():
            datasets.write_idx(fashion / f"{kind}-images-idx3-ubyte.gz", fashion / f"{kind}-labels-idx1-ubyte.gz",
                               folder, n=n, offset=offset)
        bulk.upload_dir(store, folder, prefix, create_bucket=True)
    return store_url


@contextlib.contextmanager
def source_of(commit: str) -> Iterator[Path]:
    """The ``src`` folder of ``commit``, extracted with ``git archive`` into a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="mlwf-before-") as tmp:
        archive = subprocess.run(["git", "archive", commit, "src"], cwd=ROOT, capture_output=True)
        if archive.returncode:
            sys.exit(f"--before {commit}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp) / "src"


def short_commit(commit: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def version() -> str:
    """This checkout's commit (``-dirty`` with uncommitted changes)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def side_env(src: Path | None, base: dict | None = None) -> dict[str, str]:
    """The environment of a process that runs ``src`` (None: the working tree), without any MLWF_ setting."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith("MLWF_")}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    else:
        env["PYTHONPATH"] = str(ROOT / "src")
    return env


def stats(values: list[float], digits: int = 1) -> dict:
    """Median, min, max and every value, rounded to ``digits`` (0: whole numbers)."""
    def r(v: float) -> float | int:
        return round(v, digits) if digits else round(v)

    return {"median": r(statistics.median(values)), "min": r(min(values)), "max": r(max(values)),
            "runs": [r(v) for v in values]}


def warm(fn, repeats: int) -> dict:
    """Call ``fn`` once untimed, then ``repeats`` times timed: the wall times and the last report."""
    fn()
    times, reports = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        reports.append(fn())
        times.append((time.perf_counter() - t) * 1e3)
    return {"wall_ms": stats(times), "last": reports[-1]}


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    """The CPU, cores, memory and the versions that move the figures (``mlwf bench``'s record, and mlwf's
    version)."""
    from mlwf.bench.files import machine as bench_machine

    record = bench_machine()
    record.pop("load_average_at_end", None)  # each suite records the load where it measures
    return {**record, "mlwf": version()}


def write(out: Path, name: str, result: dict) -> Path:
    """Write ``result`` as ``out/name`` (JSON, replacing it whole) and return the path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    # Whole or not at all: a suite killed while writing leaves the record it had, not half of a new one.
    part = path.with_name(f".{name}.{os.getpid()}.part")
    try:
        part.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)  # a write that failed (a full disk) leaves no aside copy either
    return path


def command() -> str:
    """The command line that ran this suite, as the results page gives it."""
    return " ".join(["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds so far of ``pid`` (default: this process) and every process below it (workers, fork server)."""
    pid = pid or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu_seconds(p)
        todo += children.get(p, [])
    return total


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An ``mlwf`` server (``serve`` or ``model serve``) in its own process on 127.0.0.1, ready when this returns.

    ``args`` follow ``mlwf``: e.g. ``["serve", "--store", URL]``; ``--host`` and
    ``--port`` are added (the code before issue 24 listened on 0.0.0.0 unless
    told). ``ready`` is the path that answers 200 once the server is up.
    ``stop()`` sends SIGTERM and returns the exit code; a server that does not
    drain within ``grace`` seconds is killed.
    """

    def __init__(self, args: list[str], *, ready: str, env: dict[str, str], log: Path, port: int | None = None,
                 timeout: float = 120.0):
        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlwf.cli", *args, "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._log.close()
                raise SystemExit(f"mlwf {args[0]} exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + ready, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"mlwf {args[0]} not ready after {timeout:.0f} s: see {log}")
            time.sleep(0.05)

    def stop(self, grace: float = 60.0) -> int | str:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | str = self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = f"killed: did not drain within {grace:.0f} s"
        self._log.close()
        return code

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    sys.exit("common.py is what the suites share, not a suite: run one of the other scripts (see benchmarks/README.md)")
