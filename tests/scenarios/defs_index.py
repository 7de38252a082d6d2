"""Scenarios for the issue-3 index codes (registered with @scenario()).

Every layer set is made by the kernel with index=on (or index=on,nfs_export=on), damaged
offline the way overlay-format.md §9.4/§9.5 and the measurements in problems_index.py
describe, and must then be found, fixed, undone and mounted cleanly (test_codes.py).

Index entry names are file handles, known only once the kernel made the entry, so each
scenario sets its `path` when it builds or damages the layers.
"""
from __future__ import annotations

import hashlib
import os
import shutil

from ovlfsck import handles

from .helpers import Bed, getx, rmx, setx, write
from .registry import Scenario, drop_under, scenario

NFS = "index=on,nfs_export=on"


def index_name(path) -> str:
    """The index entry name of the (lower) object at `path`: hex of its origin handle."""
    path = os.fspath(path)
    uuid = handles.fs_uuid(os.path.dirname(path)) or handles.NULL_UUID  # fs_uuid needs a dir
    return handles.encode_for(path, uuid).index_name()


def upper_fh(path) -> bytes:
    """The PATH_UPPER handle the kernel stores in a directory index entry's `upper`."""
    path = os.fspath(path)
    uuid = handles.fs_uuid(os.path.dirname(path)) or handles.NULL_UUID
    return handles.encode_for(path, uuid, upper=True).encode()


def lower_file_view(text: str, mode: int = 0o644) -> tuple:
    """The merged_view entry of a root-owned regular file with content `text`."""
    data = text.encode()
    return ("f", mode, 0, 0, len(data), hashlib.sha256(data).hexdigest(), None)


def _copied_up_file(b: Bed) -> str:
    """nfs_export: lower zqk (one link) copied up by a chmod: an index entry linked to
    upper zqk. Returns the entry's name."""
    write(b.L(0, "zqk"), "k\n")
    write(b.L(0, "zqo"), "other\n")
    with b.mounted() as m:
        os.chmod(m / "zqk", 0o600)
    name = index_name(b.L(0, "zqk"))
    assert os.path.samestat(os.lstat(b.W("index", name)), os.lstat(b.U("zqk")))
    return name


def _copied_up_dir(b: Bed) -> str:
    """nfs_export: lower zqd copied up (a new file in it): a directory index entry whose
    `upper` names upper zqd. Returns the entry's name."""
    write(b.L(0, "zqd", "f"), "f\n")
    with b.mounted() as m:
        write(m / "zqd" / "zqn", "n\n")
    name = index_name(b.L(0, "zqd"))
    assert os.path.isdir(b.W("index", name)) and getx(b.W("index", name), "upper")
    return name


def _indexed_hardlinks(b: Bed) -> str:
    """index=on: lower zqp and zqq are one inode; appending to zqp copies it up into the
    index (upper zqp + entry, nlink U+0); zqq shows the same data through the entry."""
    write(b.L(0, "zqp"), "p\n")
    os.link(b.L(0, "zqp"), b.L(0, "zqq"))
    with b.mounted() as m:
        with open(m / "zqp", "a") as fh:
            fh.write("more\n")
        assert (m / "zqq").read_text() == "p\nmore\n"
    name = index_name(b.L(0, "zqp"))
    assert getx(b.W("index", name), "nlink") == b"U+0"
    return name


# =========================================================================== scenarios


def _ovl620():
    def build(b: Bed):
        _indexed_hardlinks(b)
    def damage(b: Bed):
        # A copy to another filesystem: the upper file's origin and the entry's name carry
        # another uuid; upper zqp's lower file at the same path says what they must name.
        old = getx(b.U("zqp"), "origin")
        new = old[:5] + OTHER_UUID + old[21:]
        setx(b.U("zqp"), "origin", new)
        os.rename(b.W("index", old.hex()), b.W("index", new.hex()))
        sc.path = "index/" + new.hex()
    sc = Scenario("OVL620", build, damage, "work", "", options="index=on")
    return sc


OTHER_UUID = bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")  # no filesystem of the bed


def _ovl602():
    def build(b: Bed):
        _copied_up_file(b)
        sc.path = "index/" + index_name(b.L(0, "zqo"))
    def damage(b: Bed):
        # The entry of zqk renamed to the name of another lower file: name != origin.
        os.rename(b.W("index", index_name(b.L(0, "zqk"))), b.W(sc.path))
    sc = Scenario("OVL602", build, damage, "work", "", options=NFS,
                  kernel_sig=(r"failed to verify index",))
    return sc


def _ovl603():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_file(b)
    def damage(b: Bed):
        rmx(b.W(sc.path), "origin")  # also gone from upper zqk: one inode (H4)
    sc = Scenario("OVL603", build, damage, "work", "", options=NFS,
                  kernel_sig=(r"failed to verify index", r"failed index dir cleanup"))
    return sc


def _ovl604():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_file(b)
    def damage(b: Bed):
        # What `cp -a` of upper and work in two runs does: the entry becomes a separate
        # copy (same content, mode and xattrs) of the upper file (G6).
        entry = b.W(sc.path)
        tmp = b.W("zqcopy")
        shutil.copy2(entry, tmp)
        for suffix in ("origin", "nlink"):
            setx(tmp, suffix, getx(entry, suffix))
        os.rename(tmp, entry)
        assert not os.path.samestat(os.lstat(entry), os.lstat(b.U("zqk")))
    sc = Scenario("OVL604", build, damage, "work", "", options=NFS,
                  kernel_sig=(r"orphan index entry", r"bad index found"))
    return sc


def _ovl605():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_file(b)
    def damage(b: Bed):
        os.unlink(b.U("zqk"))  # the upper alias removed offline: lower zqk visible again
    def expect(view: dict) -> dict:
        return {**view, "zqk": lower_file_view("k\n")}  # the copied-up data is quarantined
    sc = Scenario("OVL605", build, damage, "work", "", options=NFS, expect=expect,
                  kernel_sig=(r"orphan index entry", r"bad index found"))
    return sc


def _ovl606():
    def build(b: Bed):
        # Lower zqs and zqt are one inode with a third link outside the lower layer; the
        # overlay link count starts at 3, so unlinking both names leaves the entry with
        # nlink U+0 (1 > 0): the kernel keeps it for ever and never shows it (measured).
        write(b.L(0, "zqs"), "s\n")
        os.link(b.L(0, "zqs"), b.L(0, "zqt"))
        os.makedirs(b.fs.mnt / "zqext", exist_ok=True)
        os.link(b.L(0, "zqs"), b.fs.mnt / "zqext" / "zqs")
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            with open(m / "zqs", "a") as fh:
                fh.write("more\n")
            os.unlink(m / "zqs")
            os.unlink(m / "zqt")
        sc.path = "index/" + index_name(b.L(0, "zqs"))
        assert os.lstat(b.W(sc.path)).st_nlink == 1
    def damage(b: Bed):
        pass  # kernel-made: a warning, run with --severity OVL606=error
    sc = Scenario("OVL606", build, damage, "work", "", options="index=on",
                  kernel_sig=(r"orphan index entry",))
    return sc


def _ovl607():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_file(b)
    def damage(b: Bed):
        os.unlink(b.U("zqk"))
        os.unlink(b.L(0, "zqk"))  # the lower object is gone: the handle does not decode
    sc = Scenario("OVL607", build, damage, "work", "", options=NFS,
                  expect=lambda v: {k: x for k, x in v.items() if k != "zqk"},
                  kernel_sig=(r"failed to verify index",))
    return sc


def _ovl609():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_dir(b)
    def damage(b: Bed):
        rmx(b.W(sc.path), "upper")
    sc = Scenario("OVL609", build, damage, "work", "", options=NFS,
                  kernel_sig=(r"failed to verify index",))
    return sc


def _ovl610():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_dir(b)
    def damage(b: Bed):
        setx(b.W(sc.path), "upper", upper_fh(b.U("zqd", "zqn")))  # a file, not a directory
    sc = Scenario("OVL610", build, damage, "work", "", options=NFS,
                  kernel_sig=(r"invalid index upper", r"failed to verify index",
                              r"failed index dir cleanup"))
    return sc


def _ovl611():
    def build(b: Bed):
        sc.path = "index/" + _copied_up_dir(b)
    def damage(b: Bed):
        shutil.rmtree(b.U("zqd"))  # the upper directory gone: lower zqd visible again
    sc = Scenario("OVL611", build, damage, "work", "", options=NFS,
                  expect=drop_under("zqd", keep=("zqd/f",)),
                  kernel_sig=(r"orphan index entry", r"bad index found"))
    return sc


def _ovl612():
    def build(b: Bed):
        write(b.L(0, "zqdel"), "deleted\n")
        write(b.L(0, "keep"), "k\n")
        with b.mounted() as m:
            os.unlink(m / "zqdel")  # nfs_export: upper whiteout + whiteout index entry
        sc.path = "index/" + index_name(b.L(0, "zqdel"))
        assert os.stat(b.W(sc.path), follow_symlinks=False).st_rdev == 0
    def damage(b: Bed):
        os.unlink(b.U("zqdel"))  # the upper whiteout removed offline (H19f)
    sc = Scenario("OVL612", build, damage, "work", "", options=NFS,
                  kernel_sig=(r"bad index found",))
    return sc


def _ovl614():
    def build(b: Bed):
        sc.path = "index/" + _indexed_hardlinks(b)
    def damage(b: Bed):
        setx(b.W(sc.path), "nlink", b"garbage")  # H9
    sc = Scenario("OVL614", build, damage, "work", "", options="index=on",
                  kernel_sig=(r"failed to get index nlink",))
    return sc


def _ovl615():
    def build(b: Bed):
        sc.path = "index/" + _indexed_hardlinks(b)
    def damage(b: Bed):
        # The upper alias removed offline (H7): lower zqp is visible again and, through the
        # entry, shows the copied-up data; nlink U+0 now counts 1 for 2 names.
        os.unlink(b.U("zqp"))
    sc = Scenario("OVL615", build, damage, "work", "", options="index=on",
                  kernel_sig=(r"failed to get index nlink", r"orphan index entry",
                              r"cleanup linked index"))
    return sc


for _fn in (_ovl620, _ovl602, _ovl603, _ovl604, _ovl605, _ovl606, _ovl607, _ovl609, _ovl610, _ovl611,
            _ovl612, _ovl614, _ovl615):
    scenario()(_fn)

