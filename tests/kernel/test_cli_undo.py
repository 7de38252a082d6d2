"""`ovlfsck undo` through the CLI: refuses while the layers are mounted, restores the
damaged state exactly, refuses a second undo, and never exits 0 when a step was refused."""
import json
import os

import pytest

from . import kutil
from ovlfsck.fixture import build


def snap(layers):
    """Layer state without ctime (set by the kernel on any change) and directory mtimes
    (entries come and go in them); everything else must come back exactly."""
    out = {}
    for name, path in layers.items():
        if name == "work":
            continue
        for rel, t in kutil.layer_snapshot(path).items():
            out[(name, rel)] = t[:8] + ((None if t[0] == "d" else t[8]),) + t[10:]
    return out


def repair(stack):
    r = kutil.run_ovlfsck("check", "-y", "--json", *stack)
    return r.returncode, json.loads(r.stdout)

pytestmark = pytest.mark.kernel

SPEC = """
[lower:0]
file keep text=k
dir d
file d/x text=x
[upper]
xattr . impure=y
whiteout nosuch
dir d
xattr d opaque=y
whiteout d/zzz
[work]
dir work
"""


def test_undo_refuses_mounted_layers_then_restores(tmp_path):
    layers = build(SPEC, str(tmp_path / "layers"))
    stack = kutil.stack_args([layers["lower:0"]], layers["upper"], layers["work"])
    damaged = snap(layers)
    rc, doc = repair(stack)
    assert rc == 1 and doc["journal"]
    journal = doc["journal"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with kutil.mount_overlay([layers["lower:0"]], layers["upper"], layers["work"], mnt):
        r = kutil.run_ovlfsck("undo", journal)
        assert r.returncode == 8, r.stderr
        assert "mounted on" in r.stderr
    r = kutil.run_ovlfsck("undo", "--dry-run", journal)
    assert r.returncode == 0 and "nosuch" in r.stdout
    r = kutil.run_ovlfsck("undo", journal)
    assert r.returncode == 0, r.stdout + r.stderr
    assert snap(layers) == damaged
    r = kutil.run_ovlfsck("undo", journal)
    assert r.returncode == 8 and "undone" in (r.stdout + r.stderr)


def test_undo_exits_nonzero_when_a_step_is_refused(tmp_path):
    layers = build(SPEC, str(tmp_path / "layers"))
    stack = kutil.stack_args([layers["lower:0"]], layers["upper"], layers["work"])
    rc, doc = repair(stack)
    assert rc == 1
    # Someone puts a regular file where a quarantined whiteout must come back.
    with open(os.path.join(layers["upper"], "nosuch"), "w") as fh:
        fh.write("new data\n")
    r = kutil.run_ovlfsck("undo", doc["journal"])
    assert r.returncode == 8
    assert "could not be reverted" in r.stderr
    with open(os.path.join(layers["upper"], "nosuch")) as fh:
        assert fh.read() == "new data\n"  # never overwritten
