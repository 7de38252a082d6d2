"""verify-copy on tmp-dir layer sets: copies made with shutil variants and manual damage."""
import os
import shutil
import stat
import subprocess

import pytest
import xattr

from ovlfsck.errors import UsageError
from ovlfsck.fixture import build
from ovlfsck.stack import build_stack
from ovlfsck.verify_copy import (HARDLINK, INDEX_LINK, MISSING, MODE, OWNER, TYPE, WHITEOUT,
                                 XATTR, advice, format_text, mirror_stack, verify_copy)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for whiteouts and trusted.* xattrs")

SPEC = """
[lower:0]
dir a
file a/f text=lower
file a/gone text=x
file keep text=k
[upper]
dir a
xattr a origin=hex:00fb0401
whiteout a/gone
dir b
xattr b opaque=y
dir c
xattr c redirect=/a
file a/f text=upper copy
file hl1 text=linked
hardlink hl2 hl1
file xw
xattr xw whiteout=y
[work]
dir index
dir work
"""


@pytest.fixture
def orig(tmp_path):
    base = tmp_path / "orig"
    layers = build(SPEC, str(base))
    # upper/a/f and its index entry are one inode (§9.1)
    os.link(os.path.join(layers["upper"], "a/f"), os.path.join(layers["work"], "index/00fb0401"))
    return base


def stack(base):
    return build_stack([f"lowerdir={base}/lower0,upperdir={base}/upper,workdir={base}/work"])


def cp_a(src, dst):
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def _skip_special(fn):
    """A copy_function that skips special files (as copytree cannot copy them)."""
    def copy(src, d):
        if not stat.S_ISREG(os.lstat(src).st_mode):
            return d
        fn(src, d)
        return d
    return copy


def kinds(result):
    return sorted((x.kind, x.layer, x.path) for x in result.losses)


def test_faithful_cp_a_has_no_loss(orig, tmp_path):
    cp_a(orig, tmp_path / "copy")
    res = verify_copy(stack(orig), stack(tmp_path / "copy"), "trusted")
    assert res.losses == [], format_text(res)
    assert res.entries > 10 and res.layers == 3
    assert "kept everything" in format_text(res)


def test_mirror_stack(orig, tmp_path):
    cp_a(orig, tmp_path / "copy")
    copy = mirror_stack(stack(orig), str(orig), str(tmp_path / "copy"))
    assert copy.upper.path == str(tmp_path / "copy" / "upper")
    assert verify_copy(stack(orig), copy).ok
    with pytest.raises(UsageError):
        mirror_stack(stack(orig), str(tmp_path / "elsewhere"), str(tmp_path / "copy"))


def test_copytree_without_xattrs_or_links(orig, tmp_path):
    # shutil.copytree(copy_function=copyfile): no xattrs, no modes kept, hardlinks split,
    # whiteouts fail to copy (copyfile refuses special files) -> we skip them
    dst = tmp_path / "copy"

    shutil.copytree(orig, dst, copy_function=_skip_special(shutil.copyfile), symlinks=True)
    # copytree's copystat() copies the xattrs of directories; a non-root copy sees no
    # trusted.* at all: drop them as such a copy would
    for d, dirs, files in os.walk(dst):
        for n in dirs + files:
            for name in xattr.list(os.path.join(d, n), nofollow=True):
                if os.fsdecode(name).startswith("trusted."):
                    xattr.remove(os.path.join(d, n), name, nofollow=True)
    res = verify_copy(stack(orig), stack(dst))
    k = kinds(res)
    assert (WHITEOUT, "upper", "a/gone") in k
    assert (WHITEOUT, "upper", "xw") in k  # the xattr whiteout became a plain empty file
    assert (XATTR, "upper", "b") in k and (XATTR, "upper", "c") in k and (XATTR, "upper", "a") in k
    assert (INDEX_LINK, "work", "index/00fb0401") in k
    assert (HARDLINK, "upper", "hl2") in k
    text = format_text(res)
    assert "rsync" in text and "-X" in text and "--xattrs-include='*'" in text
    assert "separate" in advice(INDEX_LINK) and "-H" in advice(INDEX_LINK)
    assert "--devices" in advice(WHITEOUT) and "non-root" in advice(WHITEOUT)
    assert "non-root" in advice(XATTR, "trusted") and "non-root" not in advice(XATTR, "user")
    loss = next(x for x in res.losses if x.kind == XATTR and x.path == "b")
    assert loss.original == "trusted.overlay.opaque='y'" and loss.copy == "absent"


def test_copytree_copy2_keeps_xattrs_but_splits_links(orig, tmp_path):
    # shutil.copy2 copies xattrs (as root) and modes; copytree never keeps hardlinks
    dst = tmp_path / "copy"
    shutil.copytree(orig, dst, symlinks=True, copy_function=_skip_special(shutil.copy2))
    res = verify_copy(stack(orig), stack(dst))
    k = {x[0] for x in kinds(res)}
    assert XATTR not in k
    assert INDEX_LINK in k and HARDLINK in k


def test_upper_and_work_copied_separately(orig, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    for part in ("lower0", "upper", "work"):
        cp_a(orig / part, dst / part)
    res = verify_copy(stack(orig), stack(dst))
    assert kinds(res) == [(INDEX_LINK, "work", "index/00fb0401")]
    assert res.losses[0].original == "same inode as upper:a/f"


def test_manual_damage(orig, tmp_path):
    dst = tmp_path / "copy"
    cp_a(orig, dst)
    up = dst / "upper"
    os.unlink(up / "a/gone")
    os.mknod(up / "a/gone", 0o020000, os.makedev(1, 3))  # another device number
    xattr.set(str(up / "c"), "trusted.overlay.redirect", b"/elsewhere")
    os.chown(up / "hl1", 1000, 1000)
    os.chmod(up / "b", 0o700)
    shutil.rmtree(dst / "lower0" / "a")
    os.unlink(dst / "lower0" / "keep")
    os.symlink("keep", dst / "lower0" / "keep")
    res = verify_copy(stack(orig), stack(dst))
    k = kinds(res)
    assert (WHITEOUT, "upper", "a/gone") in k
    assert (XATTR, "upper", "c") in k
    assert (OWNER, "upper", "hl1") in k and (OWNER, "upper", "hl2") in k
    assert (MODE, "upper", "b") in k
    assert (MISSING, "lower:0", "a") in k
    assert not any(p.startswith("a/") for _, layer, p in k if layer == "lower:0")
    assert (TYPE, "lower:0", "keep") in k
    gone = next(x for x in res.losses if x.path == "a/gone")
    assert gone.original == "whiteout (char 0:0)" and gone.copy == "char device 1:3"
    redirect = next(x for x in res.losses if x.path == "c")
    assert redirect.copy == "trusted.overlay.redirect='/elsewhere'"


def test_whiteout_missing_and_as_file(orig, tmp_path):
    dst = tmp_path / "copy"
    cp_a(orig, dst)
    os.unlink(dst / "upper/a/gone")
    res = verify_copy(stack(orig), stack(dst))
    assert kinds(res) == [(WHITEOUT, "upper", "a/gone")]
    assert res.losses[0].copy == "nothing"
    open(dst / "upper/a/gone", "w").close()
    res = verify_copy(stack(orig), stack(dst))
    assert res.losses[0].copy.startswith("regular file")


def test_shared_whiteout_split_is_a_note(tmp_path):
    base = tmp_path / "orig"
    layers = build("[lower:0]\nfile x\nfile y\n[upper]\nwhiteout x\n[work]\ndir index\n", str(base))
    os.link(os.path.join(layers["upper"], "x"), os.path.join(layers["upper"], "y"))
    dst = tmp_path / "copy"
    subprocess.run(["rsync", "-aX", f"{base}/", f"{dst}/"], check=True) if shutil.which("rsync") \
        else shutil.copytree(base, dst, symlinks=True)
    res = verify_copy(stack(base), stack(dst))
    assert res.ok, format_text(res)
    assert "shared whiteout" in format_text(res)


def test_deterministic_and_dict(orig, tmp_path):
    dst = tmp_path / "copy"
    dst.mkdir()
    for part in ("lower0", "upper", "work"):
        cp_a(orig / part, dst / part)
    xattr.remove(str(dst / "upper/b"), "trusted.overlay.opaque")
    r1 = verify_copy(stack(orig), stack(dst))
    r2 = verify_copy(stack(orig), stack(dst))
    assert r1.losses == r2.losses
    d = r1.as_dict()
    assert d["counts"] == {XATTR: 1, INDEX_LINK: 1}
    assert set(d["advice"]) == {XATTR, INDEX_LINK}


def test_shape_mismatch_and_same_dir(orig, tmp_path):
    other = build_stack([f"lowerdir={orig}/lower0"])
    with pytest.raises(UsageError):
        verify_copy(stack(orig), other)
    with pytest.raises(UsageError):
        verify_copy(stack(orig), stack(orig))
