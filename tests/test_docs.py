"""The README a newcomer reads: short, one command for the tests (the one CI runs), and every page it links to there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 400
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else len(text)]


def _local_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(path.read_text(encoding="utf-8")) if "://" not in target]


def test_the_readme_is_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= MAX_README_LINES


def test_the_test_section_is_the_one_command_ci_runs():
    commands = [line.strip() for line in _section(README.read_text(encoding="utf-8"), "The tests").splitlines() if line.startswith("    ")]
    assert commands[0] == "bash .ci/run"
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^python -m pytest .*\"\$@\"$", script, re.M), "the script runs pytest with the caller's arguments"
    for step in ("python3 -m venv .venv", "npm ci", "chromium"):
        assert step in script, f".ci/run does not set up {step}"


def test_every_page_the_readme_links_exists_and_links_only_to_files_that_exist():
    pages = [README] + [(README.parent / target).resolve() for target in _local_links(README)]
    missing = [str(page) for page in pages if not page.exists()]
    assert not missing, missing
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in pages if page.suffix == ".md"
              for target in _local_links(page) if not (page.parent / target).exists()]
    assert not broken, broken


def test_the_moved_sections_are_reachable_from_the_readme():
    linked = {(ROOT / target).resolve() for target in _local_links(README)}
    for page in ("export/README.md", "runtime/README.md", "runtime/serving/README.md", "runtime/tools/README.md",
                 "examples/README.md", "benchmarks/README.md", "benchmarks/results/coverage.md", "tests/FAULTS.md",
                 "graphs/README.md"):
        assert (ROOT / page).resolve() in linked, f"README.md does not link {page}"


def test_the_layout_names_every_runtime_folder():
    layout = _section(README.read_text(encoding="utf-8"), "The layout")
    for folder in sorted(p.name for p in (ROOT / "runtime").iterdir() if (p / "__init__.py").is_file()):
        assert f"{folder}/" in layout, f"the README's layout does not name runtime/{folder}/"
