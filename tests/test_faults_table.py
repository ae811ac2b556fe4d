"""The table of bad inputs and faults (tests/FAULTS.md, linked from the README) stays in step with the tests that try them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAULT_FILES = ("test_untrusted.py", "test_reliability.py")  # every test in these must be in the table
FAULT_NAME = re.compile(r"def (test_\w*(?:bad|refuse|invalid|corrupt|interrupt|newer|mismatch)\w*)\(")


def _table() -> str:
    return (ROOT / "tests" / "FAULTS.md").read_text(encoding="utf-8")


def test_every_test_the_table_names_exists():
    references = re.findall(r"`(test_\w+\.py)::(test_\w+)`", _table())
    assert len(references) >= 30
    for file, name in references:
        source = (ROOT / "tests" / file).read_text(encoding="utf-8")
        assert re.search(rf"^def {name}\(", source, re.M), f"FAULTS.md names {file}::{name}, which does not exist"


def test_every_fault_test_is_in_the_table():
    table = _table()
    missing = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        names = re.findall(r"^def (test_\w+)\(", source, re.M) if path.name in FAULT_FILES else FAULT_NAME.findall(source)
        missing += [f"{path.name}::{name}" for name in names if f"`{path.name}::{name}`" not in table]
    assert missing == [], f"fault tests missing from tests/FAULTS.md: {missing}"
