"""The benchmark suites a reader runs from the results page: each answers ``--help``, each has its section.

Nothing here measures anything (figures live in benchmarks/, never in a timed
test): every script under ``benchmarks/`` must print its usage and exit 0 on
``--help`` without touching data, within seconds; every suite the results page
lists must exist and every script must be listed there; and the page's
relative links and anchors must resolve, as the documentation's do.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.test_docs import broken_links

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))
PAGE = BENCHMARKS / "README.md"
#: What the suites share; it is not a suite, but it answers --help too.
SHARED = {"common.py"}


def _help(script: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip((s.name for s in SCRIPTS), pool.map(_help, SCRIPTS)))


def test_there_are_suites_and_no_folder_of_probes():
    assert len(SCRIPTS) > 5
    folders = [p.name for p in BENCHMARKS.iterdir() if p.is_dir() and p.name not in ("results", "data", "__pycache__")]
    assert folders == [], "benchmarks/ holds suites, one script per question, not folders of scripts"


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS])
def test_every_script_answers_help(helps, script):
    done = helps[script]
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("script", [s.name for s in SCRIPTS if s.name not in SHARED])
def test_every_suite_says_its_command_and_where_its_figures_go(helps, script):
    text = helps[script].stdout
    assert f"python benchmarks/{script}" in text, "the usage line a reader copies"
    assert "--out" in text


def test_the_results_page_lists_every_suite_and_only_those():
    page = PAGE.read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| \[(\w+\.py)\]\(#", page, re.M))
    assert listed == {s.name for s in SCRIPTS} - SHARED


def test_every_suite_on_the_page_gives_its_command():
    page = PAGE.read_text(encoding="utf-8")
    for script in sorted({s.name for s in SCRIPTS} - SHARED):
        assert f"python benchmarks/{script}" in page, f"no command for {script} on the results page"


def test_the_results_page_stays_a_page():
    assert len(PAGE.read_text(encoding="utf-8").splitlines()) <= 320


def test_the_results_page_links_and_images_resolve():
    assert broken_links(PAGE) == []
