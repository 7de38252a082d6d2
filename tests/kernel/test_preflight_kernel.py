"""Pre-flight checks against real mounts: overlays (absolute and relative layer paths),
read-only bind mounts, bind-mounted spellings, other filesystems, nested overlays.

Every mount made here is unmounted in a `finally` (kutil.umount: retries, then lazy), and
the conftest leak check fails the test if anything is left under its tmp_path.
"""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from ovlfsck.errors import ExitCode, OperationalError
from ovlfsck.preflight import (
    detect_namespace,
    find_overlay_uses,
    overlay_mounts_using,
    parse_mountinfo,
    run_preflight,
)
from ovlfsck.stack import build_stack

from . import kutil

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(
        kutil.can_use_kernel() is not None,
        reason=f"kernel tests need: {kutil.can_use_kernel()}",
    ),
]


def mkdirs(base: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        p = base / name
        p.mkdir(parents=True, exist_ok=True)
        out.append(p)
    return out


@contextmanager
def mounted(args: list[str], target: Path, cwd: Path | None = None) -> Iterator[Path]:
    """`mount *args target` for the duration of the block; always unmounted afterwards."""
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", *args, str(target)], capture_output=True, text=True, cwd=cwd
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)} {target} failed: {proc.stderr.strip()}")
    try:
        yield target
    finally:
        kutil.umount(target)


@contextmanager
def ro_bind(source: Path, target: Path) -> Iterator[Path]:
    """A read-only bind mount (`mount --bind` then `mount -o remount,bind,ro`)."""
    with mounted(["--bind", str(source)], target):
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(target)], check=True, capture_output=True
        )
        yield target


def op_error(excinfo) -> str:
    assert isinstance(excinfo.value, OperationalError)
    assert excinfo.value.exit_code == ExitCode.OPERATIONAL == 8
    return str(excinfo.value)


def layer_set(base: Path):
    l0, l1, up, wk = mkdirs(base, "l0", "l1", "upper", "work")
    (l1 / "f").write_text("lower file\n")
    stack = build_stack(lowers=[str(l0), str(l1)], upper=str(up), work=str(wk))
    return stack, (l0, l1, up, wk)


# --------------------------------------------------------------------------- mounted overlays


def test_mounted_with_absolute_paths(tmp_path):
    stack, (l0, l1, up, wk) = layer_set(tmp_path / "abs")
    mnt = tmp_path / "mnt"
    run_preflight(stack, want_write=True)  # nothing mounted yet
    with kutil.mount_overlay([l0, l1], up, wk, mnt):
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=True)
        msg = op_error(excinfo)
        assert f"used by the overlay mounted on {mnt}" in msg
        assert "unmount it before repairing (checking with -n is allowed)" in msg
        pf = run_preflight(stack, want_write=False)
        assert pf.mounted_by == (str(mnt),)
        assert overlay_mounts_using(stack) == [str(mnt)]
        assert any(str(mnt) in note for note in pf.notes)
    pf = run_preflight(stack, want_write=True)
    assert pf.mounted_by == ()


@pytest.mark.parametrize("mount_at", ["beside-layers", "elsewhere"])
def test_mounted_with_relative_paths(tmp_path, monkeypatch, mount_at):
    base = tmp_path / "rel"
    l, u, w = mkdirs(base, "l", "u", "w")
    mnt = base / "m" if mount_at == "beside-layers" else tmp_path / "far" / "away" / "m"
    stack = build_stack(lowers=[str(l)], upper=str(u), work=str(w))
    with mounted(["-t", "overlay", "overlay", "-o", "lowerdir=l,upperdir=u,workdir=w"], mnt,
                 cwd=base):
        # The kernel shows the paths as given (measured on 6.18); if that ever changes,
        # this test should be revisited rather than silently pass.
        shown = kutil.mount_info(mnt)
        assert shown is not None and "lowerdir=l," in shown and "upperdir=u," in shown
        monkeypatch.chdir("/")  # our cwd is not the mount's cwd
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=True)
        msg = op_error(excinfo)
        assert f"used by the overlay mounted on {mnt}" in msg
        assert "given as relative 'u'" in msg
        pf = run_preflight(stack, want_write=False)
        assert pf.mounted_by == (str(mnt),)
        uses = {u.layer.name: u for u in find_overlay_uses(stack, parse_mountinfo())
                if u.mountpoint == str(mnt)}
        assert set(uses) == {"upper", "lower:0", "work"}
        # Measured: the overlay root has the upper root's inode number.
        assert uses["upper"].root_inode_match
    pf = run_preflight(stack, want_write=True)
    assert pf.mounted_by == ()


def test_relative_mount_of_other_layers_not_matched(tmp_path, monkeypatch):
    stack, _ = layer_set(tmp_path / "mine")
    other = tmp_path / "other"
    mkdirs(other, "lo", "up", "wo")
    mnt = other / "m"
    with mounted(["-t", "overlay", "overlay", "-o", "lowerdir=lo,upperdir=up,workdir=wo"], mnt,
                 cwd=other):
        monkeypatch.chdir("/")
        pf = run_preflight(stack, want_write=True)
        assert str(mnt) not in pf.mounted_by


def test_unrelated_overlay_sharing_only_a_lower(tmp_path):
    stack, (l0, l1, up, wk) = layer_set(tmp_path / "ours")
    ou, ow = mkdirs(tmp_path / "theirs", "upper", "work")
    mnt = tmp_path / "theirs" / "m"
    with kutil.mount_overlay([l1], ou, ow, mnt):
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=True)
        msg = op_error(excinfo)
        assert msg.startswith(f"lower:1 {l1} (its lowerdir) is used by the overlay mounted on {mnt}")
        assert f"upper {up}" not in msg
        pf = run_preflight(stack, want_write=False)
        assert pf.mounted_by == (str(mnt),)
        uses = [u for u in find_overlay_uses(stack, parse_mountinfo()) if u.mountpoint == str(mnt)]
        assert [(u.layer.name, u.option) for u in uses] == [("lower:1", "lowerdir")]


# --------------------------------------------------------------------------- read-only layers


def test_read_only_bind_mounted_lower(tmp_path):
    stack0, (l0, l1, up, wk) = layer_set(tmp_path / "s")
    with ro_bind(l1, tmp_path / "l1-ro") as l1ro:
        stack = build_stack(lowers=[str(l0), str(l1ro)], upper=str(up), work=str(wk))
        pf = run_preflight(stack, want_write=True)
        assert pf.statuses["lower:1"].read_only
        assert not pf.statuses["lower:0"].read_only
        assert not pf.statuses["upper"].read_only and not pf.statuses["work"].read_only
        assert pf.statuses["lower:1"].mountpoint == str(l1ro)
        assert pf.statuses["lower:1"].fs_type == pf.statuses["upper"].fs_type
        assert "lower:1 is read-only: checked, never written" in pf.notes
        assert pf.mounted_by == ()
        # statvfs alone knows it too (a mount table that says nothing about it).
        empty = tmp_path / "empty-mountinfo"
        empty.write_text("")
        pf = run_preflight(stack, want_write=True, mountinfo_path=str(empty))
        assert pf.statuses["lower:1"].read_only and not pf.statuses["lower:0"].read_only
        assert pf.statuses["lower:1"].fs_type == "unknown"


def test_read_only_upper(tmp_path):
    stack0, (l0, l1, up, wk) = layer_set(tmp_path / "s")
    with ro_bind(tmp_path / "s", tmp_path / "ro") as ro:
        stack = build_stack(lowers=[str(l0)], upper=str(ro / "upper"), work=str(ro / "work"))
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=True)
        assert op_error(excinfo) == (
            f"upper layer {ro / 'upper'} is on a read-only filesystem; use -n to check it"
        )
        pf = run_preflight(stack, want_write=False)
        assert pf.statuses["upper"].read_only and pf.statuses["work"].read_only
        assert not pf.statuses["lower:0"].read_only


def test_read_only_work_only(tmp_path):
    stack0, (l0, l1, up, wk) = layer_set(tmp_path / "s")
    # The work directory alone is made read-only by a ro bind mount over itself.
    with ro_bind(wk, wk):
        stack = build_stack(lowers=[str(l0)], upper=str(up), work=str(wk))
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=True)
        # A work that alone is read-only is necessarily on another mount than the upper:
        # the kernel refuses that, and a repair could not rename between them (EXDEV).
        assert op_error(excinfo).startswith(
            "workdir and upperdir must reside under the same mount"
        )
        pf = run_preflight(stack, want_write=False)
        assert pf.statuses["work"].read_only and not pf.statuses["upper"].read_only
        assert f"work {wk} is read-only" in pf.notes


# --------------------------------------------------------------------------- upper / work


def test_work_on_another_filesystem(tmp_path, make_fs):
    fs = make_fs("tmpfs")
    l, u = mkdirs(tmp_path / "s", "l", "u")
    (w,) = mkdirs(fs.mnt, "w")
    stack = build_stack(lowers=[str(l)], upper=str(u), work=str(w))
    with pytest.raises(OperationalError) as excinfo:
        run_preflight(stack, want_write=False)
    msg = op_error(excinfo)
    assert msg.startswith("upperdir and workdir must be on the same filesystem")
    assert "tmpfs" in msg


def test_upper_and_work_through_different_mounts(tmp_path):
    l, u, w = mkdirs(tmp_path / "s", "l", "u", "w")
    with mounted(["--bind", str(tmp_path / "s")], tmp_path / "bind") as b:
        stack = build_stack(lowers=[str(l)], upper=str(u), work=str(b / "w"))
        # What the kernel says about this spelling:
        with pytest.raises(kutil.OverlayMountError) as kexc:
            with kutil.mount_overlay([l], u, b / "w", tmp_path / "m"):
                pass
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=True)
        msg = op_error(excinfo)
        assert msg.startswith("workdir and upperdir must reside under the same mount")
        if kexc.value.dmesg:
            assert any("workdir and upperdir must reside under the same mount" in line
                       for line in kexc.value.dmesg)
        pf = run_preflight(stack, want_write=False)
        assert any("must reside under the same mount" in n for n in pf.notes)


def test_work_inside_upper_through_a_bind_mount(tmp_path):
    # work = <bind of upper>/w: no string prefix relation, but the same directory tree.
    l, u = mkdirs(tmp_path / "s", "l", "u")
    (u / "w").mkdir()
    with mounted(["--bind", str(u)], tmp_path / "alias") as alias:
        stack = build_stack(lowers=[str(l)], upper=str(u), work=str(alias / "w"))
        assert not stack.work.path.startswith(stack.upper.path)
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=False)
        assert op_error(excinfo).startswith("workdir and upperdir must be separate subtrees")


def test_upper_contains_bind_mounted_work_parent(tmp_path):
    # work = <bind of upper/sub>/w: its `..` chain leaves the bind mount without passing
    # through upper; only the path inside the filesystem (mountinfo root) shows the nesting.
    l, u = mkdirs(tmp_path / "s", "l", "u")
    (u / "sub" / "w").mkdir(parents=True)
    with mounted(["--bind", str(u / "sub")], tmp_path / "alias") as alias:
        stack = build_stack(lowers=[str(l)], upper=str(u), work=str(alias / "w"))
        with pytest.raises(OperationalError) as excinfo:
            run_preflight(stack, want_write=False)
        assert op_error(excinfo).startswith("workdir and upperdir must be separate subtrees")


def test_sibling_names_on_real_mount(tmp_path):
    # D7: upper=/x/upper with work=/x/up was refused by a substring test.
    l, u, w = mkdirs(tmp_path / "x", "l", "upper", "up")
    stack = build_stack(lowers=[str(l)], upper=str(u), work=str(w))
    run_preflight(stack, want_write=True)
    mnt = tmp_path / "m"
    with kutil.mount_overlay([l], u, w, mnt):  # and the kernel agrees
        pass


# --------------------------------------------------------------------------- fs types, xattrs


def test_fs_types_reported(tmp_path, make_fs):
    xfs = make_fs("xfs")
    tmpfs = make_fs("tmpfs", name="t")
    (lx,) = mkdirs(xfs.mnt, "lx")
    (lt,) = mkdirs(tmpfs.mnt, "lt")
    u, w = mkdirs(tmp_path / "s", "u", "w")
    stack = build_stack(lowers=[str(lx), str(lt)], upper=str(u), work=str(w))
    pf = run_preflight(stack, want_write=True)
    assert pf.statuses["lower:0"].fs_type == "xfs"
    assert pf.statuses["lower:1"].fs_type == "tmpfs"
    assert pf.statuses["lower:0"].mountpoint == str(xfs.mnt)
    assert all(s.xattr_ok for s in pf.statuses.values())


def test_layer_without_xattr_support(tmp_path):
    u, w = mkdirs(tmp_path / "s", "u", "w")
    with mounted(["-t", "ramfs", "ramfs"], tmp_path / "ram") as ram:
        (l,) = mkdirs(ram, "l")
        stack = build_stack(lowers=[str(l)], upper=str(u), work=str(w))
        pf = run_preflight(stack, want_write=True)
        assert pf.statuses["lower:0"].fs_type == "ramfs"
        assert pf.statuses["lower:0"].xattr_ok is False
        assert pf.statuses["upper"].xattr_ok is True
        assert any(n.startswith(f"lower:0 {l}:") and "does not support" in n for n in pf.notes)


def test_layer_on_an_overlay_mount(tmp_path):
    stack0, (l0, l1, up, wk) = layer_set(tmp_path / "outer")
    mnt = tmp_path / "merged"
    with kutil.mount_overlay([l0, l1], up, wk, mnt):
        (mnt / "inner-l").mkdir()
        u2, w2 = mkdirs(tmp_path / "s2", "u", "w")
        stack = build_stack(lowers=[str(mnt / "inner-l")], upper=str(u2), work=str(w2))
        pf = run_preflight(stack, want_write=True)  # on an overlay, not used by one
        st = pf.statuses["lower:0"]
        assert st.nested_overlay and st.fs_type == "overlay"
        assert not pf.statuses["upper"].nested_overlay
        assert pf.mounted_by == ()
        assert st.xattr_ok


def test_userxattr_layers_detected_after_real_mount(tmp_path):
    l, u, w = mkdirs(tmp_path / "s", "l", "u", "w")
    with kutil.mount_overlay([l], u, w, tmp_path / "m", options="userxattr"):
        pass
    stack = build_stack(lowers=[str(l)], upper=str(u), work=str(w))  # no userxattr hint
    ns, note = detect_namespace(stack)
    assert ns == "user"
    assert note is not None and "upper root" in note
    assert run_preflight(stack, want_write=True).namespace == "user"
    # And a default mount of fresh layers reads as trusted.
    l2, u2, w2 = mkdirs(tmp_path / "t", "l", "u", "w")
    with kutil.mount_overlay([l2], u2, w2, tmp_path / "m2"):
        pass
    stack2 = build_stack(lowers=[str(l2)], upper=str(u2), work=str(w2))
    assert detect_namespace(stack2) == ("trusted", None)
