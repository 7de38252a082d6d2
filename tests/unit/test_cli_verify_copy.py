"""`ovlfsck verify-copy` through the CLI: exit 0 for a faithful copy, 4 with losses."""
import json
import os
import subprocess
import sys

import pytest

from ovlfsck.fixture import build

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for whiteouts and trusted.* xattrs")

SPEC = """
[lower:0]
file gone text=x
dir d
[upper]
whiteout gone
dir d
xattr d opaque=y
[work]
dir work
"""


def run(*args):
    return subprocess.run([sys.executable, "-m", "ovlfsck", *args], capture_output=True, text=True)


def test_faithful_and_lossy_copies(tmp_path):
    orig = tmp_path / "orig"
    layers = build(SPEC, str(orig))
    opts = f"lowerdir={layers['lower:0']},upperdir={layers['upper']},workdir={layers['work']}"
    subprocess.run(["cp", "-a", str(orig), str(tmp_path / "good")], check=True)
    r = run("verify-copy", "-o", opts, "--from", str(orig), "--to", str(tmp_path / "good"))
    assert r.returncode == 0, r.stdout + r.stderr
    # A copy that loses xattrs and turns the whiteout into nothing.
    subprocess.run(["cp", "-r", str(orig), str(tmp_path / "bad")], check=True)
    os.unlink(tmp_path / "bad" / "upper" / "gone")
    r = run("verify-copy", "--json", "-o", opts, "--from", str(orig), "--to", str(tmp_path / "bad"))
    assert r.returncode == 4, r.stderr
    kinds = {loss["kind"] for loss in json.loads(r.stdout)["losses"]}
    assert {"xattr", "missing"} <= kinds or {"xattr", "whiteout"} <= kinds, kinds


def test_the_copy_must_be_named(tmp_path):
    layers = build(SPEC, str(tmp_path / "o"))
    r = run("verify-copy", "--lower", layers["lower:0"])
    assert r.returncode == 16 and "--from" in r.stderr
