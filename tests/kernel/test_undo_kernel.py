"""Quarantine and undo, judged by the kernel: what the merged view shows after each step.

The kernel writes the layers (a whiteout made by rm through the mount, an opaque dir made
by rm -r + mkdir), the journal changes them offline, and a fresh mount shows the effect;
after undo another mount shows exactly the view the kernel had left.

Layers live on a scratch ext4 (kutil.LoopFS via make_fs); every overlay mount is a
kutil.mount_overlay context, so it is unmounted whatever happens.
"""
from __future__ import annotations

import os
import stat

import pytest
import xattr

from ovlfsck.repair import Journal, Quarantine, RemoveXattr, undo
from ovlfsck.stack import build_stack

from . import kutil

pytestmark = pytest.mark.kernel

OPTIONS = "index=on"


class Layers:
    def __init__(self, base: str, mnt) -> None:
        self.lower = os.path.join(base, "lower")
        self.upper = os.path.join(base, "upper")
        self.work = os.path.join(base, "work")
        self.mnt = mnt
        for d in (self.lower, self.upper, self.work):
            os.makedirs(d)
        self.stack = build_stack(lowers=[self.lower], upper=self.upper, work=self.work)

    def mounted(self):
        return kutil.mount_overlay([self.lower], self.upper, self.work, self.mnt, OPTIONS)

    def view(self) -> dict:
        with self.mounted() as merged:
            return kutil.merged_view(merged)


@pytest.fixture
def layers(make_fs, ovl_mnt) -> Layers:
    fs = make_fs("ext4")
    return Layers(os.fspath(fs.mnt), ovl_mnt)


def test_quarantined_whiteout_uncovers_the_lower_file_and_undo_hides_it_again(layers):
    with open(os.path.join(layers.lower, "file"), "w") as fh:
        fh.write("lower data\n")
    with open(os.path.join(layers.lower, "other"), "w") as fh:
        fh.write("stays\n")

    with layers.mounted() as merged:  # the kernel makes the whiteout
        os.unlink(os.path.join(merged, "file"))
        hidden = kutil.merged_view(merged)
    assert "file" not in hidden and "other" in hidden
    wh = os.path.join(layers.upper, "file")
    st = os.lstat(wh)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, "the kernel made no whiteout"
    original_ino = st.st_ino

    with Journal.create(layers.stack) as journal:
        journal.apply(Quarantine(layers.stack.upper, "file"))
    assert not os.path.lexists(wh)

    with layers.mounted() as merged:  # the lower file shows through again
        assert sorted(os.listdir(merged)) == ["file", "other"]
        with open(os.path.join(merged, "file")) as fh:
            assert fh.read() == "lower data\n"
    assert not os.path.lexists(wh), "the mount must not have copied anything up"
    assert os.path.exists(journal.path), "the kernel must leave <work>/ovlfsck alone"

    lines = undo(journal.path, layers.stack)
    assert not lines.refused, lines
    st = os.lstat(wh)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert st.st_ino == original_ino  # the very inode the kernel made

    after = layers.view()
    assert "file" not in after
    assert kutil.diff_views(hidden, after) == ""


def test_removed_opaque_xattr_merges_the_lower_dir_and_undo_makes_it_opaque_again(layers):
    os.makedirs(os.path.join(layers.lower, "d"))
    with open(os.path.join(layers.lower, "d", "old"), "w") as fh:
        fh.write("old\n")

    with layers.mounted() as merged:  # rm -r + mkdir: the kernel makes an opaque upper dir
        os.unlink(os.path.join(merged, "d", "old"))
        os.rmdir(os.path.join(merged, "d"))
        os.mkdir(os.path.join(merged, "d"))
        with open(os.path.join(merged, "d", "new"), "w") as fh:
            fh.write("new\n")
        opaque_view = kutil.merged_view(merged)
    d = os.path.join(layers.upper, "d")
    assert xattr.get(d, "trusted.overlay.opaque", nofollow=True) == b"y"
    assert "d/old" not in opaque_view and "d/new" in opaque_view

    with Journal.create(layers.stack) as journal:
        journal.apply(RemoveXattr(layers.stack.upper, "d", "trusted.overlay.opaque"))
    merged_view = layers.view()
    assert "d/old" in merged_view and "d/new" in merged_view

    undo(journal.path, layers.stack)
    assert xattr.get(d, "trusted.overlay.opaque", nofollow=True) == b"y"
    assert kutil.diff_views(opaque_view, layers.view()) == ""
