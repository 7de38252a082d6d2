"""Scenarios for the issue-3 workdir codes (registered with @scenario()).

Every damage here also checks, before the layers are handed to ovlfsck, that the kernel
really reacts to it as the catalog says (a read-only mount, a failed mount, a cleanup
error), and installs a check that every later mount of the bed is read-WRITE: a work/work
leftover the kernel cannot clean does not fail the mount, it silently makes it read-only,
so "the mount succeeds" alone proves nothing. test_codes.py has no hook for that; the
check wraps `Bed.mounted` of this one bed (see `_require_rw`).
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager

import pytest

from .helpers import Bed, kutil, mkdir, write
from .registry import Scenario, scenario

# =========================================================================== helpers


def _read_write(m) -> bool:
    opts = kutil.mount_info(m) or ""
    return "rw" in opts.split(",")


def _require_rw(b: Bed) -> None:
    """From now on, every mount of this bed must be read-write (checked in /proc/self/mounts)."""
    plain = b.mounted

    @contextmanager
    def mounted(options=None):
        with plain(options) as m:
            opts = kutil.mount_info(m)
            assert _read_write(m), f"the kernel mounted the repaired layers read-only: {opts}"
            yield m

    b.mounted = mounted  # instance attribute: only this bed, only from the damage on


def _mount_is_read_only(b: Bed) -> list[str]:
    """Mount the damaged layers once; assert the kernel silently made the mount read-only."""
    marker = kutil.dmesg_mark()
    with b.mounted() as m:
        assert not _read_write(m), "expected the kernel to fall back to a read-only mount"
    return kutil.dmesg_overlay_since(marker)


def _file_entry(text: str) -> tuple:
    """merged_view entry of a root-owned 0644 regular file with this content."""
    data = text.encode()
    return ("f", 0o644, 0, 0, len(data), hashlib.sha256(data).hexdigest(), None)


def _simple_build(b: Bed) -> None:
    write(b.L(0, "zqd", "a"), "a\n")
    write(b.L(0, "zqf"), "f\n")
    with b.mounted() as m:
        write(m / "zqd" / "b", "b\n")  # a copy-up of zqd
        os.unlink(m / "zqf")  # a whiteout (and the kernel's spare whiteout in the workdir)


# =========================================================================== OVL701


def _ovl701():
    def damage(b: Bed):
        # Crash debris two levels deep: work/work/#zq7/b/c — the cleanup's rmdir of b fails.
        mkdir(b.W("work", "#zq7", "b", "c"))
        write(b.W("work", "#zq7", "b", "c", "data"), "written just before the crash\n")
        write(b.W("work", "#zq7", "b", "top"), "t\n")
        lines = _mount_is_read_only(b)
        assert any("mounting read-only" in ln for ln in lines), lines
        assert any("cleanup of '#zq7/b' failed (-39)" in ln for ln in lines), lines
        _require_rw(b)
    return Scenario("OVL701", _simple_build, damage, "work", "work/#zq7",
                    kernel_sig=(r"mounting read-only", r"failed to create directory .*work"))


# =========================================================================== OVL704


_VOLATILE_TEXT = "written through a volatile mount\n"


def _ovl704():
    def damage(b: Bed):
        # A real volatile mount: it leaves work/work/incompat/volatile/dirty behind.
        with b.mounted(options="volatile") as m:
            write(m / "zqvol", _VOLATILE_TEXT)
        assert os.path.isfile(b.W("work", "incompat", "volatile", "dirty"))
        # ... and every later mount fails.
        with pytest.raises(kutil.OverlayMountError) as info:
            with b.mounted():
                pass
        assert any("incompat feature 'volatile'" in ln for ln in info.value.dmesg), info.value
        _require_rw(b)

    def expect(view: dict) -> dict:
        return {**view, "zqvol": _file_entry(_VOLATILE_TEXT)}

    return Scenario("OVL704", _simple_build, damage, "work", "work/incompat", expect=expect,
                    kernel_sig=(r"incompat feature",))


# =========================================================================== OVL705


def _ovl705():
    def damage(b: Bed):
        assert not os.path.lexists(b.W("index"))
        write(b.W("index"), "not a directory\n")
        # A mount with index=on fails (ENOTDIR, no overlayfs message) ...
        with pytest.raises(kutil.OverlayMountError) as info:
            with b.mounted(options="index=on"):
                pass
        assert "Not a directory" in info.value.stderr, info.value
        # ... one without the index ignores it.
        with b.mounted() as m:
            assert _read_write(m)
        _require_rw(b)
    # The scenario mounts without the index: test_codes.py's undo after the mount (e2) puts
    # the file back, which an index=on mount makes impossible (the kernel creates a new index
    # directory at that name).
    return Scenario("OVL705", _simple_build, damage, "work", "index")


# =========================================================================== OVL707


def _ovl707():
    def build(b: Bed):
        write(b.L(0, "zqf"), "f\n")
        os.link(b.L(0, "zqf"), b.L(0, "zqf2"))
        write(b.L(0, "zqg"), "g\n")
        with b.mounted() as m:
            with open(m / "zqf", "a") as fh:
                fh.write("more\n")  # a lower hardlink: copied up through the index
            os.unlink(m / "zqg")  # the spare whiteout stays as index/#N

    def damage(b: Bed):
        mkdir(b.W("index", "#zq79", "x", "y"))
        write(b.W("index", "#zq79", "x", "y", "data"), "d\n")
        marker = kutil.dmesg_mark()
        with b.mounted() as m:
            assert _read_write(m)  # the index cleanup failure does not make it read-only ...
        lines = kutil.dmesg_overlay_since(marker)
        assert any("cleanup of '#zq79/x' failed (-39)" in ln for ln in lines), lines  # ... it logs
        assert os.path.isdir(b.W("index", "#zq79", "x", "y"))
        _require_rw(b)

    return Scenario("OVL707", build, damage, "work", "index/#zq79", options="index=on",
                    kernel_sig=(r"cleanup of '#zq",))


for _fn in (_ovl701, _ovl704, _ovl705, _ovl707):
    scenario()(_fn)
