"""The problem catalog and what is generated from it."""
import json
import pathlib
import subprocess
import sys

from ovlfsck.problems import CATALOG, Severity, lookup, markdown

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_codes_and_names_are_unique_and_well_formed():
    codes = [p.code for p in CATALOG]
    names = [p.name for p in CATALOG]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)
    for p in CATALOG:
        assert p.code.startswith("OVL") and p.code[3:].isdigit()
        assert p.name == p.name.lower() and " " not in p.name
        assert p.severity in Severity
        assert p.title and p.kernel and p.doc


def test_lookup_by_code_and_name():
    assert lookup("ovl101").name == "orphan-whiteout"
    assert lookup("orphan-whiteout").code == "OVL101"
    assert lookup("nope") is None


def test_docs_problems_md_is_current():
    # Regenerate with: make docs
    assert (ROOT / "docs" / "problems.md").read_text() == markdown()


def test_explain_and_problems_commands():
    run = lambda *a: subprocess.run([sys.executable, "-m", "ovlfsck", *a], capture_output=True, text=True)
    r = run("explain", "OVL306")
    assert r.returncode == 0 and "redirect-missing-whiteout" in r.stdout and "Missing whiteout" in r.stdout
    assert run("explain", "OVL999").returncode == 16
    r = run("problems", "--json")
    assert r.returncode == 0
    assert {p["code"] for p in json.loads(r.stdout)} == {p.code for p in CATALOG}
