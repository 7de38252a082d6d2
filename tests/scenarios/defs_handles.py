"""Scenarios for the issue-3 handles codes (registered with @scenario()).

Each layer set is made by the real kernel (copy-ups through a mount, index=on / nfs_export=on
where the code needs them) and damaged offline the way the problem arises: a garbage value,
a handle copied from another object, a handle of a copied layer set (another uuid, or an
object outside the layers), an index dir or root handle of the wrong object.
"""
from __future__ import annotations

import os

from ovlfsck import handles

from .helpers import Bed, getx, kutil, mkdir, setx, write
from .registry import Scenario, scenario

OTHER_UUID = bytes.fromhex("0c3664b7ffbf408182dd84ed33ee52e0")  # no filesystem of the bed


def _handle(path, upper: bool = False) -> bytes:
    """The handle the kernel writes for `path` (its filesystem's uuid)."""
    return handles.encode_for(str(path), handles.fs_uuid(str(path)), upper=upper).encode()


def _with_uuid(raw: bytes, uuid: bytes) -> bytes:
    return raw[:5] + uuid + raw[21:]


def _copied_up_file(b: Bed):
    """zqf copied up through the mount: upper zqf carries the origin of lower zqf."""
    write(b.L(0, "zqf"), "f\n")
    mkdir(b.L(0, "zqd"))
    write(b.L(0, "zqd", "a"), "a\n")
    with b.mounted() as m:
        with open(m / "zqf", "a") as fh:
            fh.write("more\n")
    assert getx(b.U("zqf"), "origin") == _handle(b.L(0, "zqf"))


@scenario()
def _ovl501():
    def damage(b: Bed):
        setx(b.U("zqf"), "origin", bytes.fromhex("00fa1d0001"))  # bad magic (H3c)
    return Scenario("OVL501", _copied_up_file, damage, "upper", "zqf", kernel_sig=(r"invalid origin",))


@scenario()
def _ovl502():
    def damage(b: Bed):
        raw = bytearray(getx(b.U("zqf"), "origin"))
        raw[3] = 0x08  # a flag bit the kernel does not know: silently "unknown"
        setx(b.U("zqf"), "origin", bytes(raw))
    return Scenario("OVL502", _copied_up_file, damage, "upper", "zqf")


@scenario()
def _ovl503():
    def damage(b: Bed):
        setx(b.U("zqf"), "origin", _handle(b.L(0, "zqd")))  # a directory's handle on a file (H3b)
    return Scenario("OVL503", _copied_up_file, damage, "upper", "zqf", kernel_sig=(r"invalid origin",))


@scenario()
def _ovl504():
    def damage(b: Bed):
        # The object it named is gone (same filesystem): only a record could tell what it was.
        gone = write(b.fs.path("zqoutside", "zqgone"), "g\n")
        raw = _handle(gone)
        os.unlink(gone)
        setx(b.U("zqf"), "origin", raw)
    return Scenario("OVL504", _copied_up_file, damage, "upper", "zqf")


@scenario()
def _ovl520():
    def damage(b: Bed):
        # As after a copy of the layers to another filesystem: another uuid; lower zqf, of
        # the same type at the same path, is what it must name now.
        setx(b.U("zqf"), "origin", _with_uuid(getx(b.U("zqf"), "origin"), OTHER_UUID))
    return Scenario("OVL520", _copied_up_file, damage, "upper", "zqf")


def _renamed_copied_up_file(b: Bed):
    """zqf copied up and renamed to zqg through the mount: upper zqg carries the origin of
    lower zqf (whited out), and nothing of its name is beneath."""
    _copied_up_file(b)
    with b.mounted() as m:
        os.rename(m / "zqf", m / "zqg")
    assert getx(b.U("zqg"), "origin") == _handle(b.L(0, "zqf"))


@scenario()
def _ovl506():
    def damage(b: Bed):
        # As after `cp -a` of the layers within the filesystem: the handle names the original.
        outside = write(b.fs.path("zqoutside", "zqf"), "f\n")
        setx(b.U("zqg"), "origin", _handle(outside))
    return Scenario("OVL506", _renamed_copied_up_file, damage, "upper", "zqg")


def _indexed_renamed_hardlinks(b: Bed):
    """index=on: lower zqp/zqq (one inode) both copied up into the index and renamed to
    zqr/zqs: all aliases are upper, at paths with nothing beneath (nlink U-1)."""
    write(b.L(0, "zqp"), "p\n")
    os.link(b.L(0, "zqp"), b.L(0, "zqq"))
    with b.mounted() as m:
        with open(m / "zqp", "a") as fh:
            fh.write("more\n")
        os.chmod(m / "zqq", 0o600)
        os.rename(m / "zqp", m / "zqr")
        os.rename(m / "zqq", m / "zqs")
    assert os.path.samestat(os.lstat(b.U("zqr")), os.lstat(b.U("zqs")))


@scenario()
def _ovl505():
    def damage(b: Bed):
        # A copy to another filesystem without a record: the origin and the index entry's
        # name carry another uuid, and no lower file is at the aliases' paths.
        old = getx(b.U("zqr"), "origin")
        new = _with_uuid(old, OTHER_UUID)
        setx(b.U("zqr"), "origin", new)
        os.rename(b.W("index", old.hex()), b.W("index", new.hex()))
    return Scenario("OVL505", _indexed_renamed_hardlinks, damage, "upper", "zqr", options="index=on")


def _merged_dir(b: Bed):
    write(b.L(0, "zqd", "a"), "a\n")
    mkdir(b.L(0, "zqd", "sub"))
    mkdir(b.L(0, "zqe"))
    with b.mounted() as m:
        write(m / "zqd" / "zqnew", "n\n")  # copies zqd up: merged, origin = lower zqd
    assert getx(b.U("zqd"), "origin") == _handle(b.L(0, "zqd"))


@scenario()
def _ovl507():
    def damage(b: Bed):
        # The handle of the original of a copy: with nfs_export zqd stops merging (G3).
        setx(b.U("zqd"), "origin", _handle(mkdir(b.fs.path("zqoutside", "zqd"))))
    return Scenario("OVL507", _merged_dir, damage, "upper", "zqd", options="index=on,nfs_export=on",
                    kernel_sig=(r"failed to verify origin", r"failed to verify index"))


@scenario()
def _ovl508():
    def damage(b: Bed):
        setx(b.U("zqd"), "origin", _handle(b.L(0, "zqe")))  # another lower directory's handle
    return Scenario("OVL508", _merged_dir, damage, "upper", "zqd", options="index=on")


@scenario()
def _ovl509():
    def damage(b: Bed):
        root = getx(b.U(), "origin")
        assert root == _handle(b.lowers[0])
        setx(b.U(), "origin", _with_uuid(root, OTHER_UUID))  # the layers "came from" elsewhere
    return Scenario("OVL509", _copied_up_file, damage, "upper", "", options="index=on",
                    kernel_sig=(r"failed to verify upper root origin",))


@scenario()
def _ovl510():
    def build(b: Bed):
        # lower:0 is a former upper over lower:1 (stack A), reused as a lower (stack B).
        write(b.L(1, "zqf"), "f\n")
        write(b.L(1, "keep"), "k\n")
        work_a = mkdir(b.fs.path("zqworkA"))
        with kutil.mount_overlay([b.lowers[1]], b.lowers[0], work_a, b.mnt, "") as m:
            with open(os.path.join(m, "zqf"), "a") as fh:
                fh.write("more\n")
        assert getx(b.L(0, "zqf"), "origin") == _handle(b.L(1, "zqf"))
        with b.mounted() as m:
            write(m / "zqnew", "n\n")
    def damage(b: Bed):
        setx(b.L(0, "zqf"), "origin", _with_uuid(getx(b.L(0, "zqf"), "origin"), OTHER_UUID))
    return Scenario("OVL510", build, damage, "lower:0", "zqf", nlowers=2, fix_args=("--repair-lowers",))


@scenario()
def _ovl511():
    def build(b: Bed):
        _copied_up_file(b)
        with b.mounted() as m:
            mkdir(m / "zqnewdir")
        assert getx(b.W("index"), "upper") == _handle(b.upper, upper=True)
    def damage(b: Bed):
        # As if the workdir had been used with another upper directory.
        setx(b.W("index"), "upper", _handle(b.U("zqnewdir"), upper=True))
    return Scenario("OVL511", build, damage, "work", "index", options="index=on",
                    kernel_sig=(r"failed to verify index dir 'upper' xattr", r"failed to verify upper"))


@scenario()
def _ovl512():
    def build(b: Bed):
        _copied_up_file(b)
        # uuid=auto on a new overlay stored a uuid; the copy-up made the root impure.
        assert len(getx(b.U(), "uuid") or b"") == 16 and getx(b.U(), "impure") == b"y"
    def damage(b: Bed):
        setx(b.U(), "uuid", b"zq")  # H28
    return Scenario("OVL512", build, damage, "upper", "", kernel_sig=(r"failed to get uuid",))


@scenario()
def _ovl514():
    def build(b: Bed):
        write(b.L(0, "zqa"), "a\n")
        write(b.L(0, "zqb"), "b\n")
        with b.mounted() as m:
            for n in ("zqa", "zqb"):
                with open(m / n, "a") as fh:
                    fh.write("more\n")
    def damage(b: Bed):
        # zqb's origin overwritten with zqa's: both map to one overlay inode, and the second
        # lookup fails ESTALE.
        setx(b.U("zqb"), "origin", getx(b.U("zqa"), "origin"))
    return Scenario("OVL514", build, damage, "upper", "zqb", kernel_sig=(r"failed to get inode",))
