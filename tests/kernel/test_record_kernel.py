"""`ovlfsck record` on a kernel-made layer set (index=on,nfs_export=on,redirect_dir=on)."""
from __future__ import annotations

import os
import random
import shutil
import stat as st_
import subprocess

import pytest

from ovlfsck import handles
from ovlfsck.fsio import kind_of_mode
from ovlfsck.preflight import run_preflight
from ovlfsck.record import load_record, record
from ovlfsck.stack import build_stack

from . import kutil, workload

pytestmark = pytest.mark.kernel

OPTS = "index=on,nfs_export=on,redirect_dir=on"


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _lower(root):
    for d in ("d1", "d2/sub", "d3/deep", "d4", "grp"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for f in ("d1/a", "d1/hl", "d1/del", "d2/sub/x", "d3/deep/y", "d4/m", "f3", "grp/g1"):
        _write(os.path.join(root, f), f + "\n")
    os.link(os.path.join(root, "d1/hl"), os.path.join(root, "d2/hl2"))
    os.link(os.path.join(root, "f3"), os.path.join(root, "f3b"))
    os.link(os.path.join(root, "grp/g1"), os.path.join(root, "grp/g2"))
    os.mkfifo(os.path.join(root, "fifo"))


def _ops(mnt):
    m = lambda *p: os.path.join(mnt, *p)  # noqa: E731
    with open(m("d1/hl"), "a") as f:  # copy-up of an indexed hardlink
        f.write("more\n")
    os.link(m("d1/a"), m("d1/a2"))  # hardlink of a lower file
    with open(m("f3"), "a") as f:  # indexed hardlink, one alias deleted
        f.write("x\n")
    os.unlink(m("f3b"))
    os.unlink(m("grp/g1"))  # both aliases deleted: whiteout index entry
    os.unlink(m("grp/g2"))
    os.rename(m("d2"), m("d2moved"))  # renamed directories
    os.rename(m("d3/deep"), m("deep2"))
    os.unlink(m("d1/del"))  # deletions
    os.unlink(m("fifo"))
    shutil.rmtree(m("d4"))  # opaque dir
    os.mkdir(m("d4"))
    _write(m("d4/new"), "new\n")
    os.chmod(m("d3"), 0o700)


def _check_points_to(layer_root, entry):
    """The recorded path's object is the one the handle names (same fid)."""
    fh = handles.decode(entry.handle)
    path = os.path.join(layer_root, entry.target.path)
    fid_type, fid = handles.name_to_handle(path)
    assert (fid_type, fid) == (fh.fid_type, fh.fid), (entry.target, entry.kinds)
    assert os.lstat(path).st_ino == entry.target.ino


def test_record_kernel_layers_and_tar_copy(make_fs, ovl_mnt, tmp_path):
    fs = make_fs("ext4", size_mib=256)
    lower, upper, work = (str(fs.path(n)) for n in ("lower", "upper", "work"))
    _lower(lower)
    workload.build_lower(os.path.join(lower, "rnd"), random.Random(7), 150)
    for d in (upper, work):
        os.makedirs(d)
    with kutil.mount_overlay([lower], upper, work, ovl_mnt, OPTS):
        _ops(str(ovl_mnt))
        stats = workload.run_workload(os.path.join(str(ovl_mnt), "rnd"), random.Random(11), 150)
        assert not stats.unexpected, stats.summary()

    index = os.path.join(work, "index")
    names = [n for n in os.listdir(index) if not n.startswith("#")]
    kinds = {n: os.lstat(os.path.join(index, n)).st_mode for n in names}
    assert any(st_.S_ISCHR(m) for m in kinds.values()), "no whiteout index entry"
    assert any(st_.S_ISDIR(m) for m in kinds.values()), "no dir index entry"
    assert any(st_.S_ISREG(m) for m in kinds.values()), "no hardlink index entry"

    stack = build_stack(kutil.stack_args([lower], upper, work, OPTS)[1:])
    res = record(stack, run_preflight(stack, want_write=True))
    assert res.counts["unresolved"] == 0, [(e.sources[:1], e.unresolved) for e in res.unresolved]
    assert res.counts["index"] == len(names)
    assert res.counts["indexdir-upper"] == 1 and res.counts["index-upper"] >= 3
    r = load_record(res.path)
    roots = {"lower:0": lower, "upper": upper}
    for e in r.entries.values():
        _check_points_to(roots[e.target.layer], e)
    # the upper-root origin is the lower root; index dir upper is the upper root
    up_root = [e for e in r.entries.values() if "indexdir-upper" in e.kinds][0]
    assert (up_root.target.layer, up_root.target.path) == ("upper", ".")
    root_origin = [e for e in r.entries.values() if any(s.path == "." and s.layer == "upper" for s in e.sources)][0]
    assert (root_origin.target.layer, root_origin.target.path) == ("lower:0", ".")
    # the deleted hardlink group left only a whiteout index entry, and it is recorded
    g1 = r.lookup(handles.encode_for(os.path.join(lower, "grp/g1"), handles.fs_uuid(lower)).encode())
    assert g1 is not None and g1.kinds == ["index"] and g1.sources[0].type == "c"
    assert g1.target.path in ("grp/g1", "grp/g2")
    renamed = r.lookup(handles.encode_for(os.path.join(lower, "d2"), handles.fs_uuid(lower)).encode())
    assert renamed.target.path == "d2" and any(s.path == "d2moved" for s in renamed.sources)

    # tar to another filesystem; the record reads the same there
    fs2 = make_fs("ext4", size_mib=256, name="copy")
    tarball = str(tmp_path / "layers.tar")
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(fs.path()), "-cf", tarball,
                    "lower", "upper", "work"], check=True)
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "-C", str(fs2.path()), "-xpf", tarball],
                   check=True)
    copy = load_record(os.path.join(str(fs2.path("work")), "ovlfsck", "record.json"))
    assert copy.entries.keys() == r.entries.keys()
    for k, e in r.entries.items():
        c = copy.entries[k]
        assert (c.kinds, c.sources, c.target) == (e.kinds, e.sources, e.target)
    # and the recorded paths name the same kind of object in the copy
    croots = {"lower:0": str(fs2.path("lower")), "upper": str(fs2.path("upper"))}
    for e in copy.entries.values():
        assert kind_of_mode(os.lstat(os.path.join(croots[e.target.layer], e.target.path)).st_mode).value == e.target.type
