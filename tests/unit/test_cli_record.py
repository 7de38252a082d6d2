"""`ovlfsck record` through the CLI."""
import json
import os
import subprocess
import sys

import pytest

from ovlfsck.fixture import build
from ovlfsck.record import load_record

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for trusted.* xattrs")

SPEC = """
[lower:0]
dir d
file d/f text=f
[upper]
xattr . impure=y
dir d
xattr d origin=@lower:0:d
xattr d impure=y
file d/f text=changed
xattr d/f origin=@lower:0:d/f
file d/g text=g
xattr d/g origin=hex:00fb1500
[work]
dir work
"""


def run(*args):
    return subprocess.run([sys.executable, "-m", "ovlfsck", *args], capture_output=True, text=True)


def test_record_writes_a_record_in_the_workdir(tmp_path):
    layers = build(SPEC, str(tmp_path))
    opts = f"lowerdir={layers['lower:0']},upperdir={layers['upper']},workdir={layers['work']}"
    r = run("record", "--json", "-o", opts)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["record"] == os.path.join(layers["work"], "ovlfsck", "record.json")
    assert doc["counts"]["resolved"] == 2 and doc["counts"]["unresolved"] == 1
    rec = load_record(doc["record"])
    targets = sorted(e.target.path for e in rec.entries.values() if e.target is not None)
    assert targets == ["d", "d/f"]
    r = run("record", "-o", opts)
    assert r.returncode == 0 and "not resolved" in r.stdout


def test_record_needs_a_workdir(tmp_path):
    (tmp_path / "l").mkdir()
    r = run("record", "--lower", str(tmp_path / "l"))
    assert r.returncode == 16 and "workdir" in r.stderr
