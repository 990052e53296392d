"""The documentation a newcomer follows: links that resolve, shell blocks that parse, one install spelling.

Every relative link of README.md, ARCHITECTURE.md and docs/ must name a file
or folder of the checkout, and every ``#anchor`` a heading of the page it
points to, as GitHub renders the page (its heading ids). Every ``bash`` block
must at least parse (``bash -n``). Every ``pip install`` of mlwf is either the
first install from the checkout or ``pip install 'mlwf[EXTRA]'`` with extras
that exist; and every install hint the code prints names an extra that holds
the package it is about.
"""

from __future__ import annotations

import ast
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "ARCHITECTURE.md", *(ROOT / "docs").rglob("*.md")])

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def _without_code(text: str) -> str:
    """The page with fenced blocks and inline code spans blanked (links inside code are not links)."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return _INLINE_CODE.sub("code", text)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text lowercased, punctuation dropped, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading id of a Markdown page, with GitHub's -1, -2, … for repeated headings."""
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    ids = set()
    for match in _HEADING.finditer(text):
        base = github_anchor(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.add(base if n == 0 else f"{base}-{n}")
    return ids


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` that name no file of ``root``, or no heading of the page they name."""
    problems = []
    for match in _LINK.finditer(_without_code(page.read_text(encoding="utf-8"))):
        target = match.group(1)
        if not target or re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        where = (page.parent / path).resolve() if path else page
        if not where.exists() or not where.is_relative_to(root.resolve()):
            problems.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and (where.suffix != ".md" or anchor not in anchors(where)):
            problems.append(f"{page.relative_to(root)}: {target} (no heading #{anchor} in {where.name})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_every_docs_page_is_reached_from_the_table_of_contents():
    toc = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    listed = {m.group(1).partition("#")[0] for m in _LINK.finditer(_without_code(toc))}
    assert {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"} <= listed


def test_the_link_check_finds_a_broken_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Time bounds: `MLWF_S3_TIMEOUT`\n")
    page = tmp_path / "README.md"
    page.write_text("# Top\n\n[ok](docs/a.md) [ok](docs/a.md#time-bounds-mlwf_s3_timeout) [ok](#top)\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#time-bounds) [bad here](#bottom)\n"
                    "`[in code](nowhere.md)`\n\n```\n[in a block](nowhere.md)\n```\n")
    assert broken_links(page, tmp_path) == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#time-bounds (no heading #time-bounds in a.md)",
        "README.md: #bottom (no heading #bottom in README.md)",
    ]


@pytest.mark.parametrize("heading, anchor", [
    ("Quick start (embedded default: worker processes on this machine, a directory as the store)",
     "quick-start-embedded-default-worker-processes-on-this-machine-a-directory-as-the-store"),
    ("`--preset accurate`: what was tried", "--preset-accurate-what-was-tried"),
    ("Functions over HTTP: `mlwf serve` and `--backend knative`",
     "functions-over-http-mlwf-serve-and---backend-knative"),
    ("The reference's commands and ours", "the-references-commands-and-ours"),
    ("Cold start: what is left is scikit-learn's (2026-11-28, 19:04 UTC)",
     "cold-start-what-is-left-is-scikit-learns-2026-11-28-1904-utc"),
])
def test_anchors_are_githubs(heading, anchor):
    assert github_anchor(heading) == anchor


def _blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for block in re.findall(rf"^```{language}\n(.*?)^```$", page.read_text(encoding="utf-8"), re.S | re.M):
            found.append((str(page.relative_to(ROOT)), block))
    return found


@pytest.mark.parametrize("page, block", _blocks("bash"), ids=lambda v: v if v.endswith(".md") else "")
def test_every_bash_block_parses(page, block):
    proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
    assert proc.returncode == 0, f"{page}:\n{block}\n{proc.stderr}"


# --------------------------------------------------------------------------- install spelling
def _extras() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def _distribution(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def extra_holds(extra: str, distribution: str) -> bool:
    """Whether ``pip install 'mlwf[extra]'`` installs ``distribution`` (through other extras too)."""
    for requirement in _extras()[extra]:
        name = _distribution(requirement)
        if name == distribution:
            return True
        nested = re.match(r"mlwf\[([^\]]+)\]", requirement)
        if nested and any(extra_holds(e.strip(), distribution) for e in nested.group(1).split(",")):
            return True
    return False


_MLWF_INSTALL = re.compile(r"pip install (?:-e )?(['\"]?)(\.|mlwf)(?:\[([^\]]*)\])?\1(?=[\s`)]|$)")


def test_the_docs_install_mlwf_one_way():
    """The first install comes from the checkout (``.``); every extra after it is ``'mlwf[EXTRA]'``."""
    extras = _extras()
    first_installs = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        assert not re.search(r"pip install\s+-e\s+\.\[|pip install\s+\.\[|pip install\s+mlwf\[", text), \
            f"{page.name}: write extras as pip install 'mlwf[EXTRA]' (quoted) after installing from the checkout"
        for quote, what, names in _MLWF_INSTALL.findall(text):
            for name in filter(None, (n.strip() for n in (names or "").split(","))):
                if name == "EXTRA":  # the placeholder of the rule itself
                    continue
                assert name in extras, f"{page.name}: no extra {name!r} in pyproject.toml"
            if what == ".":
                first_installs.append((page.name, names))
    # The README's two set-up paths, and nothing else installs from the checkout.
    assert set(first_installs) == {("README.md", ""), ("README.md", "test")}


def _install_hints() -> list[tuple[str, int, str, set[str]]]:
    """Every ``pip install 'mlwf[…]'`` in src/: (file, line, extra, the modules its ``try`` imports)."""
    hints = []
    for path in sorted((ROOT / "src").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded: dict[int, set[str]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                modules = {alias.name.split(".")[0] for stmt in node.body for n in ast.walk(stmt)
                           if isinstance(n, (ast.Import, ast.ImportFrom)) for alias in
                           (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
                for handler in node.handlers:
                    for n in ast.walk(handler):
                        guarded[getattr(n, "lineno", -1)] = modules
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for extra in re.findall(r"pip install '?mlwf\[([^\]]+)\]", node.value):
                    hints.append((str(path.relative_to(ROOT)), node.lineno, extra, guarded.get(node.lineno, set())))
    return hints


_MODULE_TO_DISTRIBUTION = {"yaml": "pyyaml"}


def test_every_install_hint_names_an_extra_that_holds_its_package():
    extras = _extras()
    hints = _install_hints()
    assert len(hints) >= 8
    for path, line, extra, modules in hints:
        for name in extra.split(","):
            assert name in extras, f"{path}:{line}: no extra {name!r} in pyproject.toml"
        for module in modules:
            distribution = _MODULE_TO_DISTRIBUTION.get(module, module)
            assert any(extra_holds(name, distribution) for name in extra.split(",")), \
                f"{path}:{line}: the hint names mlwf[{extra}], which does not install {distribution}"
    # The backends' hints are a table: each names the extra holding the libraries it lists.
    from mlwf.backends import _INSTALL_HINTS

    for backend, (libraries, hint) in _INSTALL_HINTS.items():
        [extra] = re.findall(r"mlwf\[([^\]]+)\]", hint)
        assert all(extra_holds(extra, library) for library in libraries), hint
    # The command line's table for a library missing wherever it is imported: the same rule.
    from mlwf.cli import _EXTRA_OF, missing_extra

    for module, extra in _EXTRA_OF.items():
        assert extra_holds(extra, _MODULE_TO_DISTRIBUTION.get(module, module)), (module, extra)
    for module in ("uvicorn", "starlette"):
        assert extra_holds(missing_extra(module, ["model", "serve"]), module)


def test_every_install_hint_is_spelled_as_the_docs_spell_it():
    for path in (ROOT / "src").rglob("*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "pip install" in line:
                assert re.search(r"pip install 'mlwf\[([a-z,]+|\{extra\})\]'", line), \
                    f"{path.relative_to(ROOT)}: {line.strip()}"


def test_each_extra_installs_what_its_hint_promises_in_this_environment():
    """The test environment has every extra: each library a hint is about is really installed."""
    for _, _, _, modules in _install_hints():
        for module in modules:
            metadata.distribution(_MODULE_TO_DISTRIBUTION.get(module, module))
